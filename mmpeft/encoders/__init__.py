"""Encoders: frozen pretrained backbones (transformers, offline zoo) behind one interface,
image preprocessing, and the architecture table the methods read."""

from .architectures import TABLE as ARCHITECTURES, Architecture, architecture
from .base import Encoder, EncoderOutput, masked_mean
from .build import build_encoder, resolve_source
from .targets import leaf_names, match_targets

__all__ = [
    "Encoder", "EncoderOutput", "masked_mean", "build_encoder", "resolve_source",
    "ARCHITECTURES", "Architecture", "architecture", "leaf_names", "match_targets",
]
