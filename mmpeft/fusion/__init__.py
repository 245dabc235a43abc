"""Fusion heads; importing registers every built-in head in :data:`FUSIONS`."""

from .base import FUSIONS, FusionHead, FusionSettings
from . import attention, simple  # noqa: F401  (registration side effects)


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


__all__ = ["FUSIONS", "FusionHead", "FusionSettings", "build_fusion"]
