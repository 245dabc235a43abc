"""Build an :class:`Encoder` from a recipe's encoder block.

``model`` may be a zoo short name (``minilm``, ``efficientnet-lite0``), a local
directory (transformers format, or one written by mmpeft for a plain torch CNN)
or a hub id.
"""

from __future__ import annotations

from typing import Optional

from ..config.inputs import zoo_name
from ..config.schema import VideoConfig
from ..errors import RecipeError
from ..quant import respect_compute_dtype
from .base import Encoder
from .families import EncoderOptions, family_for
from .video import as_video
from .zoo import minilm_path


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
    video=None,
) -> Encoder:
    """Load a frozen pretrained encoder.

    Args:
        model: zoo name, local directory or hub id.
        modality: "text", "image" or "audio"; inferred from the model config when None.
        audio: an :class:`~mmpeft.config.AudioConfig` for audio encoders (how clips are read).
        video: a :class:`~mmpeft.config.VideoConfig` for video encoders (``modality: video``:
            the image encoder ``model`` read frame by frame, :mod:`.video`).
        quantization: a :class:`~mmpeft.config.QuantizationConfig` or None.
        device: where quantized weights are placed (bitsandbytes quantizes on load).

    Returns:
        An :class:`Encoder` with every base parameter frozen (``requires_grad=False``).
    """
    source = resolve_source(model)
    # a video encoder is an image encoder read frame by frame: the model's own config says it reads images
    reads_video, modality = modality == "video", (None if modality == "video" else modality)
    options = EncoderOptions(modality, revision, max_length, image_size, pooling, quantization, device, attention, audio)
    encoder = family_for(model, source).build(model, source, options)
    if quantization is not None:
        respect_compute_dtype(encoder.model, quantization)
    if modality and encoder.modality != modality:
        raise RecipeError([f"encoder {model!r} reads {encoder.modality}, but the recipe says modality: "
                           f"{'video (frames through an image encoder)' if reads_video else modality}"])
    if reads_video:
        as_video(encoder, video or VideoConfig())
    for param in encoder.parameters():
        param.requires_grad_(False)
    encoder.eval()
    return encoder
