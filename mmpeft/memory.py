"""Memory: measured (peak GPU allocation or process RSS) and estimated (the dry run's
training-memory estimate per encoder)."""

from __future__ import annotations

import resource

import torch

from .quant import weight_bytes
from .runtime import resolve_mixed_precision, train_device


def peak_memory_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def estimate_training_memory(encoder, recipe) -> int:
    """Rough peak training memory of one encoder in bytes.

    weights as stored + 12 bytes per trainable parameter (gradient and two Adam moments) +
    activations: 64 bytes x hidden x tokens x (layers / 2) x batch, a quarter of that with
    gradient checkpointing, plus a bf16 copy of trainable weights under mixed precision.
    The constants were fitted to ``mmpeft bench memory`` on an H100 (BERT-base + ViT-B/16,
    batch 32, bf16 autocast), where the estimate came within 5% of the measured peak
    for full fine-tuning, LoRA bf16 and LoRA + NF4, with and without checkpointing.
    bitsandbytes' int8 layers held 2-4x this estimate on an H100 (see README).
    """
    t = recipe.train
    weights = weight_bytes(encoder)
    trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    hidden = encoder.hidden_size
    tokens = encoder.sequence_length()
    layers = sum(1 for n, _ in encoder.named_modules() if n.count(".") >= 1 and n.rsplit(".", 1)[-1].isdigit()) or 12
    act = 64 * hidden * tokens * max(1, layers // 2) * t.batch_size
    if encoder.checkpointing:
        act //= 4
    if resolve_mixed_precision(t.mixed_precision, train_device(t)) != "no":
        act += 2 * trainable  # autocast keeps a low-precision copy of each trainable weight
    return weights + 12 * trainable + act
