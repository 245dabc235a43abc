"""Fusion-head interface and registry.

A head receives ``{modality name: EncoderOutput}`` for any number of modalities
and returns answer logits ``[B, num_outputs]``. Heads are always trainable. Each head's
recipe settings are registered under its name in :mod:`mmpeft.config.fusion`.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from ..config.fusion import FusionSettings
from ..registry import Registry

FUSIONS: Registry[type["FusionHead"]] = Registry("fusion head")


class FusionHead(nn.Module):
    Settings: ClassVar[type[FusionSettings]] = FusionSettings
    paper: ClassVar[str] = ""
    registry_name: ClassVar[str]

    def __init__(self, input_dims: dict[str, int], num_outputs: int, settings: FusionSettings):
        super().__init__()
        problems = settings.modality_problems(list(input_dims))  # for heads built without a recipe
        if problems:
            raise ValueError("; ".join(problems))
        self.input_dims = dict(input_dims)
        self.num_outputs = num_outputs
        self.settings = settings


def classifier(width: int, num_outputs: int, dropout: float) -> nn.Sequential:
    """The answer classifier every head ends with: LayerNorm -> Dropout -> Linear."""
    return nn.Sequential(nn.LayerNorm(width), nn.Dropout(dropout), nn.Linear(width, num_outputs))


def build_fusion(settings: dict, input_dims: dict[str, int], num_outputs: int) -> FusionHead:
    """Build the head named by ``settings['type']``.

    Args:
        settings: resolved ``fusion:`` block (``type`` plus that head's settings).
        input_dims: feature width per modality name.
        num_outputs: number of answers / labels.
    """
    cls = FUSIONS.get(settings.get("type", "gated"))
    parsed = cls.Settings.model_validate({k: v for k, v in settings.items() if k != "type"})
    return cls(input_dims, num_outputs, parsed)
