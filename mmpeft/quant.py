"""bitsandbytes quantization of frozen encoders (QLoRA practice).

Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", NeurIPS 2023 (NF4,
double quantization, paged optimizers); Dettmers et al., "LLM.int8()", NeurIPS 2022.

transformers models are quantized at load via ``BitsAndBytesConfig``; for plain torch
encoders (EfficientNet-Lite) every ``nn.Linear`` is swapped for a bitsandbytes layer.
Convolutions, embeddings and normalisation layers stay in full precision (bitsandbytes
has no quantized convolution), which for a CNN means most weights are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import MMPeftError


def require_bitsandbytes():
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise MMPeftError(
            f"quantization needs bitsandbytes ({exc}); pip install 'bitsandbytes>=0.45' or remove "
            "encoders.<name>.quantization from the recipe"
        ) from None
    return bnb


def quantize_plain_model(model: nn.Module, quant, device: str, skip: tuple[str, ...] = ()) -> list[str]:
    """Replace each ``nn.Linear`` of a plain torch model by a 4-/8-bit bitsandbytes layer in place
    (but those whose full name is in ``skip``, such as a language model's output layer).

    Returns:
        The names of the layers replaced (may be empty: a CNN without Linear layers).
    """
    bnb = require_bitsandbytes()
    replaced = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear:
                continue
            full = f"{name}.{child_name}" if name else child_name
            if full in skip:
                continue
            if quant.bits == 4:
                new = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=child.bias is not None,
                    compute_dtype=getattr(torch, quant.compute_dtype), compress_statistics=quant.double_quant,
                    quant_type=quant.quant_type,
                )
                new.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type=quant.quant_type,
                                               compress_statistics=quant.double_quant)
            else:
                new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None, has_fp16_weights=False)
                new.weight = bnb.nn.Int8Params(child.weight.data, requires_grad=False, has_fp16_weights=False)
            if child.bias is not None:
                new.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            new = new.to(device)
            setattr(module, child_name, new)
            replaced.append(full)
    return replaced


def respect_compute_dtype(model: nn.Module, quant) -> int:
    """bitsandbytes' CPU inference path repacks 4-bit weights on AVX512-BF16 machines and
    then multiplies in bfloat16, whatever ``compute_dtype`` says. When float32 compute is
    asked for, turn that path off so eval matches training and merges are exact."""
    if quant.bits != 4 or quant.compute_dtype != "float32":
        return 0
    count = 0
    for module in model.modules():
        if type(module).__name__ == "Linear4bit" and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def prepare_for_kbit_training(encoder) -> None:
    """QLoRA preparation: keep norms (and any non-quantized float16/bfloat16 weight) in
    float32 for stable training, make input embeddings require grad so gradient
    checkpointing still reaches adapters behind frozen layers, and keep activations in
    the autocast dtype (:func:`autocast_outputs_like_linear`)."""
    for module in encoder.model.modules():
        if isinstance(module, (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)):
            module.float()
    autocast_outputs_like_linear(encoder.model)
    base = encoder.base_model()
    if hasattr(base, "enable_input_require_grads"):
        try:
            base.enable_input_require_grads()
        except (NotImplementedError, AttributeError):
            pass


def _autocast_output(module, args, output):
    device = output.device.type
    if torch.is_autocast_enabled(device) and output.is_floating_point():
        dtype = torch.get_autocast_dtype(device)
        if output.dtype != dtype:
            return output.to(dtype)
    return None


def autocast_outputs_like_linear(model: nn.Module) -> int:
    """Under autocast, make bitsandbytes layers return the autocast dtype as ``nn.Linear`` does.

    bitsandbytes returns its *input's* dtype, and under autocast the input of most layers
    is float32 (autocast runs LayerNorm in float32), so every quantized layer's output,
    and the GELU and attention activations behind it, stayed float32: twice the
    activation memory of the same model in bf16 (measured on an H100, see README).
    Returns the number of layers hooked.
    """
    count = 0
    for module in model.modules():
        if type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            module.register_forward_hook(_autocast_output)
            count += 1
    return count


def quantized_layers(model: nn.Module) -> dict[str, int]:
    """Count bitsandbytes layers by type name (for dry runs and inspect)."""
    counts: dict[str, int] = {}
    for module in model.modules():
        kind = type(module).__name__
        if kind in ("Linear4bit", "Linear8bitLt"):
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers as stored (quantized weights count packed)."""
    total = 0
    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)
        if state is not None and getattr(state, "absmax", None) is not None:
            total += state.absmax.numel() * state.absmax.element_size()
    return total
