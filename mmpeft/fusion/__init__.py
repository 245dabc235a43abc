"""Fusion heads; importing registers every built-in head in :data:`FUSIONS`."""

from . import attention, simple  # noqa: F401  (registration side effects)
from .base import FUSIONS, FusionHead, build_fusion, classifier

__all__ = ["FUSIONS", "FusionHead", "build_fusion", "classifier"]
