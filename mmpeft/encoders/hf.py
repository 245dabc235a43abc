"""Encoders backed by Hugging Face transformers models (any hub id or local dir)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..errors import MMPeftError
from .architectures import DUAL_ENCODERS, TABLE
from .base import Encoder, EncoderOutput, ImageEncoder, masked_mean


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _bnb_config(quant) -> Any:
    from transformers import BitsAndBytesConfig

    dtype = getattr(torch, quant.compute_dtype)
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=dtype,
    )


# towers of dual-encoder checkpoints that AutoModel has no entry for, by model type: the class that loads one
TOWER_CLASSES = {"siglip_text_model": "SiglipTextModel"}


def load_hf_model(source: str, revision: Optional[str], quant, device: str, attention: str = "auto") -> nn.Module:
    """``AutoModel.from_pretrained`` with offline-friendly errors and optional bitsandbytes."""
    from transformers import AutoModel

    _quiet_transformers()
    kwargs: dict[str, Any] = {}
    if revision:
        kwargs["revision"] = revision
    if attention != "auto":
        kwargs["attn_implementation"] = attention
    if quant is not None:
        kwargs["quantization_config"] = _bnb_config(quant)
        kwargs["device_map"] = {"": device}
        # QLoRA practice: weights that are not quantized (embeddings, norms) live in the compute dtype
        kwargs["dtype"] = getattr(torch, quant.compute_dtype)
    loader = AutoModel
    config = Path(source) / "config.json"
    if config.is_file():  # a tower saved alone that AutoModel does not map (a merged SigLIP text tower)
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        if model_type in TOWER_CLASSES:
            import transformers

            loader = getattr(transformers, TOWER_CLASSES[model_type])
    try:
        return loader.from_pretrained(source, **kwargs)
    except (ImportError, RuntimeError, NotImplementedError) as exc:
        if quant is None:
            raise
        raise MMPeftError(
            f"cannot load {source!r} quantized to {quant.bits} bits on {device}: {str(exc).splitlines()[0]}. "
            "bitsandbytes needs a backend for this device (CUDA, or CPU with bitsandbytes >= 0.45): "
            "pip install -U bitsandbytes, or remove encoders.<name>.quantization from the recipe"
        ) from None
    except (OSError, ValueError) as exc:
        if Path(source).exists() or "/" not in source:
            raise MMPeftError(f"cannot load encoder model {source!r}: {exc}") from None
        raise MMPeftError(
            f"cannot load encoder model {source!r} from the Hugging Face hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0]}). Without internet, use a local directory or an offline zoo "
            "model (minilm, efficientnet-lite0)."
        ) from None


def hf_modality(config) -> str:
    """What a transformers model reads: from the architecture table, else from its config."""
    model_type = getattr(config, "model_type", "")
    if model_type in DUAL_ENCODERS:
        return DUAL_ENCODERS[model_type]
    if model_type in TABLE and TABLE[model_type].modality:
        return TABLE[model_type].modality
    if hasattr(config, "num_channels") or hasattr(config, "image_size"):
        return "image"
    return "text"


def dual_head(source: str, model: nn.Module, side: str) -> dict:
    """What a dual-encoder checkpoint (CLIP, SigLIP) aligns one tower with: its projection
    weight ``[projection_dim, hidden]`` (None where the tower's pooled output is the embedding,
    as SigLIP's; or where it is quantized), the shared log logit scale and SigLIP's logit bias. A contrastive task
    over both towers of the checkpoint starts from these (:mod:`mmpeft.tasks.contrastive`)."""
    layer = getattr(model, "text_projection" if side == "text" else "visual_projection", None)
    weight = getattr(layer, "weight", None)
    usable = weight is not None and weight.is_floating_point()
    return {"source": source, "kind": model.config.model_type, "side": side,
            "projection": weight.detach().float().clone() if usable else None,
            "quantized": weight is not None and not usable,
            "logit_scale": float(model.logit_scale.detach().float()) if hasattr(model, "logit_scale") else None,
            "logit_bias": float(model.logit_bias.detach().float()) if hasattr(model, "logit_bias") else None}


class HFTextEncoder(Encoder):
    """A transformers text model (BERT, RoBERTa, MiniLM, ...) with its tokenizer."""

    modality = "text"

    def __init__(self, source: str, model: nn.Module, tokenizer, max_length: int, pooling: str = "auto"):
        super().__init__(source, pooling)
        if getattr(model.config, "model_type", "") in DUAL_ENCODERS:
            self.checkpoint_head = dual_head(source, model, "text")
            model = model.text_model  # a full dual-encoder checkpoint read as text: keep its text tower
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.arch = model.config.model_type
        self.hidden_size = model.config.hidden_size

    def sequence_length(self) -> int:
        return self.fixed_length or self.max_length  # SigLIP pads every text to its positions whatever max_length says

    def export_preprocessing(self, name: str) -> dict:
        return {"tokenizer": f"tokenizer_{name}", "max_length": self.max_length}

    def save_preprocessor(self, folder, name: str) -> None:
        self.tokenizer.save_pretrained(str(folder / f"tokenizer_{name}"))

    @property
    def fixed_length(self) -> Optional[int]:
        """The length every text is padded to where the family reads fixed-length texts (SigLIP)."""
        if self.family.text_input != "fixed":
            return None
        return int(getattr(self.model.config, "max_position_embeddings", self.max_length))

    def preprocess(self, items: list[str]) -> dict[str, torch.Tensor]:
        fixed = self.fixed_length
        enc = self.tokenizer([str(t) for t in items], padding="max_length" if fixed else True, truncation=True,
                             max_length=fixed or self.max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, inputs: dict[str, torch.Tensor]) -> EncoderOutput:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        if self.input_prompt is not None:
            embeds = self.base_model().get_input_embeddings()(ids)
            embeds, full_mask = self.input_prompt(embeds, mask)
            out = self.model(inputs_embeds=embeds, attention_mask=full_mask)
        else:  # a fixed-length family attends to its padding too, as it was trained (the mask still marks the text's tokens)
            out = self.model(input_ids=ids, attention_mask=None if self.fixed_length else mask)
        tokens = out.last_hidden_state[:, self.num_prompt_tokens :]
        bool_mask = mask.bool()
        pooling = self.family.pooling if self.pooling == "auto" else self.pooling
        if pooling == "mean":
            pooled = masked_mean(tokens, bool_mask)
        elif pooling == "cls":
            pooled = tokens[:, 0]
        else:
            pooled = out.pooler_output
        return EncoderOutput(tokens=tokens, mask=bool_mask, pooled=pooled)

    def save_base(self, directory) -> None:
        self.base_model().save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)


class HFImageEncoder(ImageEncoder):
    """A transformers vision model (ViT, CLIP/SigLIP vision tower, DINOv2, ConvNeXt, ResNet...)."""

    def __init__(self, source: str, model: nn.Module, processor_config: dict, image_size: Optional[int], pooling: str = "auto"):
        super().__init__(source, pooling)
        if getattr(model.config, "model_type", "") in DUAL_ENCODERS:
            self.checkpoint_head = dual_head(source, model, "image")
            model = model.vision_model  # a full dual-encoder checkpoint: keep its vision tower
        self.model = model
        cfg = model.config
        self.arch = cfg.model_type
        self.hidden_size = getattr(cfg, "hidden_size", None) or cfg.hidden_sizes[-1]
        self.processor_config = processor_config
        self.mean = processor_config.get("image_mean", [0.5, 0.5, 0.5])
        self.std = processor_config.get("image_std", [0.5, 0.5, 0.5])
        self.image_size = image_size or _processor_size(processor_config) or getattr(cfg, "image_size", 224)

    def encode_pixels(self, pixel_values: torch.Tensor) -> EncoderOutput:
        out = self.model(pixel_values=pixel_values)
        hidden = out.last_hidden_state
        if hidden.dim() == 4:  # CNN feature map [B, C, H, W] -> tokens [B, HW, C]
            tokens = hidden.flatten(2).transpose(1, 2)
        else:
            tokens = hidden
            if self.num_prompt_tokens:
                o, p = self.family.prompt_offset, self.num_prompt_tokens  # VPT tokens sit after [CLS] where there is one
                tokens = torch.cat([tokens[:, :o], tokens[:, o + p :]], dim=1)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        pooling = self.pooling
        if pooling == "auto":  # a CNN's feature map has the model's own pooling; unknown ViT-likes: [CLS]
            pooling = "pooler" if hidden.dim() == 4 else (TABLE[self.arch].pooling if self.arch in TABLE else "cls")
        if pooling == "pooler" and getattr(out, "pooler_output", None) is not None:
            pooled = out.pooler_output.flatten(1)
        elif pooling == "cls":
            pooled = tokens[:, 0]
        else:
            pooled = tokens.mean(1)
        return EncoderOutput(tokens=tokens, mask=mask, pooled=pooled)

    def save_base(self, directory) -> None:
        self.base_model().save_pretrained(directory)
        config = dict(self.processor_config)
        config.setdefault("image_mean", self.mean)
        config.setdefault("image_std", self.std)
        (Path(directory) / "preprocessor_config.json").write_text(json.dumps(config, indent=2))


def _processor_size(cfg: dict) -> Optional[int]:
    for key in ("crop_size", "size"):
        val = cfg.get(key)
        if isinstance(val, int):
            return val
        if isinstance(val, dict):
            for k in ("height", "shortest_edge", "width"):
                if k in val:
                    return int(val[k])
    return None


def load_processor_config(source: str, revision: Optional[str]) -> dict:
    """The model's preprocessor_config.json as a dict ({} when it has none)."""
    path = Path(source) / "preprocessor_config.json"
    if path.is_file():
        return json.loads(path.read_text())
    if Path(source).exists():
        return {}
    try:
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(source, revision=revision).to_dict()
    except Exception:  # noqa: BLE001 - fall back to neutral normalisation
        return {}
