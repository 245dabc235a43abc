"""Build an :class:`Encoder` from a recipe's encoder block.

``model`` may be a zoo short name (``minilm``, ``efficientnet-lite0``), a local
directory (transformers format, or one written by mmpeft for a plain torch CNN)
or a hub id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..errors import MMPeftError, RecipeError
from ..quant import quantize_plain_model, respect_compute_dtype
from .base import Encoder
from .hf import HFImageEncoder, HFTextEncoder, hf_modality, load_hf_model, load_processor_config
from ..config.inputs import zoo_name
from ..config.schema import AudioConfig
from .audio import EfficientNetAudioEncoder
from .hf_audio import HFAudioEncoder
from .zoo import CNN_MARKER, CNN_ZOO, EfficientNetEncoder, load_efficientnet, minilm_path


def resolve_source(model: str) -> str:
    """Zoo short name -> a loadable path or marker; anything else unchanged."""
    name = zoo_name(model)
    if name == "minilm":
        return minilm_path()
    return model


def build_encoder(
    model: str,
    *,
    modality: Optional[str] = None,
    revision: Optional[str] = None,
    max_length: int = 32,
    image_size: Optional[int] = None,
    pooling: str = "auto",
    quantization=None,
    device: str = "cpu",
    attention: str = "auto",
    audio=None,
) -> Encoder:
    """Load a frozen pretrained encoder.

    Args:
        model: zoo name, local directory or hub id.
        modality: "text", "image" or "audio"; inferred from the model config when None.
        audio: an :class:`~mmpeft.config.AudioConfig` for audio encoders (how clips are read).
        quantization: a :class:`~mmpeft.config.QuantizationConfig` or None.
        device: where quantized weights are placed (bitsandbytes quantizes on load).

    Returns:
        An :class:`Encoder` with every base parameter frozen (``requires_grad=False``).
    """
    source = resolve_source(model)
    if zoo_name(model) in CNN_ZOO or (Path(source) / CNN_MARKER).is_file():
        backbone, meta = load_efficientnet(source)
        if zoo_name(model) == "efficientnet-lite0-audio" or meta.get("modality") == "audio" or modality == "audio":
            encoder = EfficientNetAudioEncoder(model, backbone, {**meta, "modality": "audio"}, audio or AudioConfig(), pooling)
        else:
            encoder = EfficientNetEncoder(model, backbone, meta, image_size, pooling)
        if quantization is not None:
            quantize_plain_model(encoder.model, quantization, device)
    else:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(source, revision=revision)
        except (OSError, ValueError) as exc:
            raise MMPeftError(
                f"cannot load encoder {model!r}: {str(exc).splitlines()[0]}. Use a zoo name "
                "(minilm, efficientnet-lite0, efficientnet-lite0-audio), a local transformers directory, or a hub id with internet access."
            ) from None
        kind = modality or hf_modality(config)
        hf_model = load_hf_model(source, revision, quantization, device, attention)
        if kind == "text":
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
            encoder = HFTextEncoder(model, hf_model, tokenizer, max_length, pooling)
        elif kind == "audio":
            from transformers import AutoFeatureExtractor

            try:
                extractor = AutoFeatureExtractor.from_pretrained(source, revision=revision)
            except (OSError, ValueError) as exc:
                raise MMPeftError(f"cannot load the feature extractor of audio encoder {model!r}: {str(exc).splitlines()[0]} "
                                  "(a transformers audio model directory has a preprocessor_config.json)") from None
            encoder = HFAudioEncoder(model, hf_model, extractor, audio or AudioConfig(), pooling)
        else:
            encoder = HFImageEncoder(model, hf_model, load_processor_config(source, revision), image_size, pooling)
    if quantization is not None:
        respect_compute_dtype(encoder.model, quantization)
    if modality and encoder.modality != modality:
        raise RecipeError([f"encoder {model!r} reads {encoder.modality}, but the recipe says modality: {modality}"])
    for param in encoder.parameters():
        param.requires_grad_(False)
    encoder.eval()
    return encoder
