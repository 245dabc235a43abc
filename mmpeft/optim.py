"""The optimizer and learning-rate schedule every training run (and the benchmarks'
reference loop) is built with."""

from __future__ import annotations

import math

import torch

from .quant import require_bitsandbytes


def cosine_with_warmup(optimizer, warmup: int, total: int):
    """Linear warm-up to the base learning rate, then cosine decay to zero."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(model, t):
    """AdamW with separate learning rates for adapters and head; no decay on biases/norms."""
    groups = []
    for params, lr in ((model.adapter_parameters(), t.lr), (model.head_parameters(), t.head_lr)):
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups += [g for g in ({"params": decay, "lr": lr, "weight_decay": t.weight_decay},
                               {"params": no_decay, "lr": lr, "weight_decay": 0.0}) if g["params"]]
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups)
    bnb = require_bitsandbytes()
    cls = bnb.optim.AdamW8bit if t.optimizer == "adamw_8bit" else bnb.optim.PagedAdamW8bit
    return cls(groups)
