"""Heads on pooled features: ``concat`` (late fusion MLP) and ``gated`` (GMU)."""

from __future__ import annotations

import torch
from torch import nn

from .base import FUSIONS, FusionHead, FusionSettings, classifier


@FUSIONS.register("concat")
class ConcatHead(FusionHead):
    """Concatenate each modality's normalised pooled vector, then a 2-layer MLP."""

    paper = "late fusion baseline"

    def __init__(self, input_dims, num_outputs, settings: FusionSettings):
        super().__init__(input_dims, num_outputs, settings)
        self.norms = nn.ModuleDict({m: nn.LayerNorm(d) for m, d in input_dims.items()})
        total = sum(input_dims.values())
        self.mlp = nn.Sequential(nn.Linear(total, settings.hidden_size), nn.GELU(), nn.Dropout(settings.dropout))
        self.out = classifier(settings.hidden_size, num_outputs, settings.dropout)

    def forward(self, outputs) -> torch.Tensor:
        x = torch.cat([self.norms[m](outputs[m].pooled) for m in self.input_dims], dim=-1)
        return self.out(self.mlp(x))


@FUSIONS.register("gated")
class GatedHead(FusionHead):
    """Gated Multimodal Unit (Arevalo et al., "Gated Multimodal Units for Information
    Fusion", ICLR-W 2017), generalised to N modalities: ``h_m = tanh(W_m x_m)``,
    per-dimension gates ``z = softmax_m(W_z [x_1..x_N])`` and ``h = sum_m z_m * h_m``.
    With two modalities this is the paper's sigmoid gate."""

    paper = "Arevalo et al. 2017, arXiv:1702.01992"

    def __init__(self, input_dims, num_outputs, settings: FusionSettings):
        super().__init__(input_dims, num_outputs, settings)
        h = settings.hidden_size
        self.names = list(input_dims)
        self.norms = nn.ModuleDict({m: nn.LayerNorm(d) for m, d in input_dims.items()})
        self.proj = nn.ModuleDict({m: nn.Linear(d, h) for m, d in input_dims.items()})
        self.gate = nn.Linear(sum(input_dims.values()), h * len(self.names))
        # As in the paper, the fused vector feeds an MLP classifier (a linear one cannot
        # express "does what the question asks match what the image shows").
        self.mlp = nn.Sequential(nn.Dropout(settings.dropout), nn.Linear(h, h), nn.GELU())
        self.out = classifier(h, num_outputs, settings.dropout)

    def forward(self, outputs) -> torch.Tensor:
        xs = [self.norms[m](outputs[m].pooled) for m in self.names]
        hs = torch.stack([torch.tanh(self.proj[m](x)) for m, x in zip(self.names, xs)], dim=1)  # [B, N, H]
        z = self.gate(torch.cat(xs, dim=-1)).view(hs.shape).softmax(dim=1)  # [B, N, H]
        return self.out(self.mlp((z * hs).sum(1)))
