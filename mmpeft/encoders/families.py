"""Encoder families: how a recipe's ``model`` string is recognised and loaded. Each family
is one class and one registration; :func:`~.build.build_encoder` asks each, in ``order``,
whether it ``claims`` the model, and the first that does builds it. What a loaded
encoder's architecture supports (default LoRA targets, adapter placements, prompt tuning)
is the architecture table's business (:mod:`.architectures`), not the family's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..config.inputs import zoo_name
from ..config.schema import AudioConfig
from ..errors import MMPeftError
from ..quant import quantize_plain_model
from ..registry import Registry
from .audio import EfficientNetAudioEncoder
from .base import Encoder
from .hf import HFImageEncoder, HFTextEncoder, hf_modality, load_hf_model, load_processor_config
from .hf_audio import HFAudioEncoder
from .zoo import CNN_MARKER, CNN_ZOO, EfficientNetEncoder, load_efficientnet


@dataclass
class EncoderOptions:
    """An encoder block's loading settings (see :class:`~mmpeft.config.EncoderConfig`)."""

    modality: Optional[str] = None
    revision: Optional[str] = None
    max_length: int = 32
    image_size: Optional[int] = None
    pooling: str = "auto"
    quantization: Any = None
    device: str = "cpu"
    attention: str = "auto"
    audio: Any = None


class EncoderFamily:
    """Recognises and loads one family of encoders."""

    order: int = 100  # asked in this order: a catch-all family comes last

    def claims(self, model: str, source: str) -> bool:
        raise NotImplementedError

    def build(self, model: str, source: str, options: EncoderOptions) -> Encoder:
        """The encoder, its base weights loaded (freezing and checks are the caller's)."""
        raise NotImplementedError


ENCODER_FAMILIES: Registry[type[EncoderFamily]] = Registry("encoder family")


def family_for(model: str, source: str) -> EncoderFamily:
    """The first registered family, in ``order``, that claims ``model``."""
    for name in sorted(ENCODER_FAMILIES.names(), key=lambda n: (ENCODER_FAMILIES.get(n).order, n)):
        family = ENCODER_FAMILIES.get(name)()
        if family.claims(model, source):
            return family
    raise MMPeftError(f"no encoder family loads {model!r} (families: {', '.join(ENCODER_FAMILIES.names())})")


@ENCODER_FAMILIES.register("efficientnet_lite")
class EfficientNetFamily(EncoderFamily):
    """EfficientNet-Lite CNNs: the offline zoo entries (efficientnet-lite0/1/2, the
    spectrogram CNN efficientnet-lite0-audio) and folders mmpeft saved them to (merge)."""

    order = 10

    def claims(self, model: str, source: str) -> bool:
        return zoo_name(model) in CNN_ZOO or (Path(source) / CNN_MARKER).is_file()

    def build(self, model: str, source: str, options: EncoderOptions) -> Encoder:
        backbone, meta = load_efficientnet(source)
        if zoo_name(model) == "efficientnet-lite0-audio" or meta.get("modality") == "audio" or options.modality == "audio":
            encoder = EfficientNetAudioEncoder(model, backbone, {**meta, "modality": "audio"}, options.audio or AudioConfig(),
                                               options.pooling)
        else:
            encoder = EfficientNetEncoder(model, backbone, meta, options.image_size, options.pooling)
        if options.quantization is not None:
            quantize_plain_model(encoder.model, options.quantization, options.device)
        return encoder


@ENCODER_FAMILIES.register("transformers")
class TransformersFamily(EncoderFamily):
    """Any transformers model by hub id or local folder (the zoo's MiniLM is one): text,
    vision and audio towers, told apart by their config (or the recipe's ``modality``)."""

    order = 1000  # anything no other family claims

    def claims(self, model: str, source: str) -> bool:
        return True

    def build(self, model: str, source: str, options: EncoderOptions) -> Encoder:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(source, revision=options.revision)
        except (OSError, ValueError) as exc:
            raise MMPeftError(
                f"cannot load encoder {model!r}: {str(exc).splitlines()[0]}. Use a zoo name (minilm, efficientnet-lite0, "
                "efficientnet-lite0-audio), a local transformers directory, or a hub id with internet access.") from None
        kind = options.modality or hf_modality(config)
        hf_model = load_hf_model(source, options.revision, options.quantization, options.device, options.attention)
        if kind == "text":
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(source, revision=options.revision)
            return HFTextEncoder(model, hf_model, tokenizer, options.max_length, options.pooling)
        if kind == "audio":
            from transformers import AutoFeatureExtractor

            try:
                extractor = AutoFeatureExtractor.from_pretrained(source, revision=options.revision)
            except (OSError, ValueError) as exc:
                raise MMPeftError(f"cannot load the feature extractor of audio encoder {model!r}: {str(exc).splitlines()[0]} "
                                  "(a transformers audio model directory has a preprocessor_config.json)") from None
            return HFAudioEncoder(model, hf_model, extractor, options.audio or AudioConfig(), options.pooling)
        return HFImageEncoder(model, hf_model, load_processor_config(source, options.revision), options.image_size,
                              options.pooling)
