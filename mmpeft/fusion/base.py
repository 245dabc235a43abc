"""Fusion-head interface and registry.

A head receives ``{modality name: EncoderOutput}`` for any number of modalities
and returns answer logits ``[B, num_outputs]``. Heads are always trainable.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from torch import nn

from ..registry import Registry

FUSIONS: Registry[type["FusionHead"]] = Registry("fusion head")


class FusionSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden_size: PositiveInt = Field(256, description="width of the fused representation")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout inside the head")

    def modality_problems(self, encoders: list[str]) -> list[str]:
        """Settings that name modalities are checked against the recipe's encoders when
        the recipe is loaded (so a typo is a recipe error, not a failure mid-build)."""
        return []


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
