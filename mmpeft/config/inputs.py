"""What a recipe's encoders read, known before any model loads (torch-free): the zoo's
short names and their modalities, and the manifest columns a recipe needs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

# zoo short names (and accepted spellings) -> the canonical name
ZOO_ALIASES = {
    "minilm": "minilm",
    "all-minilm-l6-v2": "minilm",
    "sentence-transformers/all-minilm-l6-v2": "minilm",
    "efficientnet-lite0": "efficientnet-lite0",
    "efficientnet_lite0": "efficientnet-lite0",
    "efficientnet-lite0-audio": "efficientnet-lite0-audio",
    "efficientnet_lite0_audio": "efficientnet-lite0-audio",
}
ZOO_MODALITIES = {"minilm": "text", "efficientnet-lite0": "image", "efficientnet-lite0-audio": "audio"}
MODALITIES = ("text", "image", "audio", "video")


def zoo_name(model: str) -> Optional[str]:
    return ZOO_ALIASES.get(model.lower())


CNN_MARKER = "mmpeft_encoder.json"  # what mmpeft writes beside a plain torch CNN's weights


# what the transformers model types of mmpeft/encoders/architectures.py read (a test keeps the two in step)
MODEL_TYPE_MODALITIES = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra", "distilbert", "deberta-v2", "clip_text_model",
                     "siglip_text_model"), "text"),
    **dict.fromkeys(("vit", "deit", "dinov2", "clip_vision_model", "siglip_vision_model", "convnext", "resnet", "clip",
                     "siglip"), "image"),
    **dict.fromkeys(("wav2vec2", "hubert", "wavlm", "whisper", "audio-spectrogram-transformer", "clap_audio_model", "clap"),
                    "audio"),
}


def encoder_modality(cfg) -> Optional[str]:
    """An encoder block's modality: its ``modality`` key, else the zoo's, else what a CNN
    folder written by mmpeft says, else what a local transformers folder's model type reads,
    else None (a hub id: known only once the model's config is read)."""
    if cfg.modality or zoo_name(cfg.model):
        return cfg.modality or ZOO_MODALITIES[zoo_name(cfg.model)]
    folder = Path(cfg.model).expanduser()
    marker, config = folder / CNN_MARKER, folder / "config.json"
    try:
        meta = json.loads(marker.read_text()) if marker.is_file() else None
        hf = json.loads(config.read_text()) if meta is None and config.is_file() else {}
    except (OSError, ValueError):
        return None  # the loader reports an unreadable folder with its path
    if meta is not None:
        return meta.get("modality", "image") if isinstance(meta, dict) else None
    return MODEL_TYPE_MODALITIES.get(hf.get("model_type")) if isinstance(hf, dict) else None


MODALITY_FIELDS = {"image": "image_field", "text": "text_field", "audio": "audio_field", "video": "video_field"}  # data: keys of each column


def own_columns(recipe, data, names=None) -> dict[str, tuple[str, str]]:
    """``{encoder: (modality, column)}`` of the encoders ``names`` (default all) that read a
    column of their own in the data block ``data`` (``data.encoder_fields``; one naming its
    modality's own column reads it as every such encoder does, and is not listed)."""
    columns = {}
    for name in (names if names is not None else recipe.encoders):
        column, kind = data.encoder_fields.get(name), encoder_modality(recipe.encoders[name])
        if column is not None and kind is not None and column != getattr(data, MODALITY_FIELDS[kind]):
            columns[name] = (kind, column)
    return columns


def recipe_inputs(recipe, names=None, own=()) -> tuple[str, ...]:
    """The modalities whose manifest columns every row must have (of the encoders ``names``;
    default all), but for the encoders ``own`` that read a column of their own
    (:func:`own_columns`). An encoder whose modality is not known yet counts as text and
    image (the columns of an image-text recipe)."""
    names = list(names if names is not None else recipe.encoders)
    kinds = {encoder_modality(recipe.encoders[n]) for n in names if n not in own}
    if None in kinds:
        kinds = (kinds - {None}) | {"text", "image"}
    return tuple(m for m in MODALITIES if m in kinds)
