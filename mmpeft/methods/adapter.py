"""Bottleneck adapters (transformers) and residual 1x1-convolution adapters (CNNs).

Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML 2019: a
bottleneck (down-projection, non-linearity, up-projection, skip connection) after
the attention output projection and after the feed-forward output of every layer.
Pfeiffer et al., "AdapterFusion", EACL 2021: after the feed-forward output only.
Rebuffi et al., "Learning multiple visual domains with residual adapters", NeurIPS
2017: a 1x1 convolution with a skip connection after each block of a CNN.

The up-projection (or the 1x1 convolution) is zero-initialised, so the adapted
encoder equals the frozen one before training. Adapters cannot be folded into the
base weights (they add a non-linearity); merged exports keep them as modules.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

from ..config.methods import AdapterSettings
from ..errors import RecipeError
from .base import METHODS, PeftMethod

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "swish": nn.SiLU}


class Bottleneck(nn.Module):
    """``x + up(act(down(x)))`` on the last dimension; ``up`` starts at zero."""

    def __init__(self, dim: int, bottleneck: int, activation: str):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


class ConvAdapter(nn.Module):
    """Residual adapter ``x + conv1x1(x)`` on ``[B, C, H, W]``; the conv starts at zero."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


def _apply_to_output(module, args, output):
    adapter = module.mmpeft_adapter
    if isinstance(output, tuple):
        return (adapter(output[0]),) + output[1:]
    return adapter(output)


def _layer_index(name: str) -> Optional[int]:
    found = re.findall(r"\.(\d+)(?:\.|$)", "." + name)
    return int(found[0]) if found else None


def _out_channels(block: nn.Module) -> int:
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]
    return bns[-1].num_features if bns else convs[-1].out_channels


@METHODS.register("adapter")
class BottleneckAdapter(PeftMethod):
    """Bottleneck adapters after attention / FFN outputs (Houlsby, Pfeiffer); residual 1x1 convs in CNNs."""

    Settings = AdapterSettings
    paper = "Houlsby et al. 2019 (arXiv:1902.00751); Pfeiffer et al. 2021 (arXiv:2005.00247); Rebuffi et al. 2017 (arXiv:1705.08045)"

    def apply(self, encoder) -> None:
        s = self.settings
        model = encoder.model
        family = encoder.family
        cnn = family.cnn_blocks is not None
        if cnn:
            patterns = [s.ffn_modules or family.cnn_blocks]
        else:
            attn = s.attention_modules or family.adapter_attention
            ffn = s.ffn_modules or family.adapter_ffn
            if ffn is None or (s.placement == "houlsby" and attn is None):
                raise RecipeError([
                    f"{self.where}: no default adapter placement for architecture {encoder.arch!r}; set attention_modules "
                    "and ffn_modules (regexes over module names)"
                ])
            patterns = [ffn] + ([attn] if s.placement == "houlsby" else [])
        targets = [(n, m) for n, m in model.named_modules() if n and any(re.fullmatch(p, n) for p in patterns)]
        if s.layers is not None:
            targets = [(n, m) for n, m in targets if _layer_index(n) in set(s.layers)]
        if not targets:
            raise RecipeError([f"{self.where}: adapter placement {patterns} matches no module of {encoder.source!r}"])
        for p in encoder.parameters():
            p.requires_grad_(False)
        for name, module in targets:
            if cnn:
                adapter = ConvAdapter(_out_channels(module))
            else:
                dim = module.out_features
                adapter = Bottleneck(dim, s.bottleneck_size or max(1, dim // s.reduction_factor), s.activation)
            module.mmpeft_adapter = adapter  # registered as a child: saved/loaded with the encoder
            module.register_forward_hook(_apply_to_output)
        self.touched = [n for n, _ in targets]

    @contextmanager
    def base_only(self, encoder):
        """Take the adapters out of the base model for the block (a merge saves the base
        without them and keeps them beside it)."""
        holders = [m for m in encoder.base_model().modules() if "mmpeft_adapter" in m._modules]
        taken = [m._modules.pop("mmpeft_adapter") for m in holders]
        try:
            yield
        finally:
            for module, adapter in zip(holders, taken):
                module._modules["mmpeft_adapter"] = adapter
