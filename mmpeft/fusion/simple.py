"""Heads on pooled features: ``concat`` (late fusion MLP), ``gated`` (GMU) and
``hadamard`` (low-rank bilinear pooling)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from .base import FUSIONS, FusionHead, FusionSettings, classifier


class GatedSettings(FusionSettings):
    gate_input: Literal["inputs", "projections"] = Field(
        "inputs", description="what the gates see: the normalised encoder outputs (the paper) or the tanh projections "
        "(N*hidden wide: far fewer parameters when an encoder's output is wide)")


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
    With two modalities this is the paper's sigmoid gate.

    ``gate_input: projections`` computes the gates from ``[h_1..h_N]`` instead: the
    paper's gate has ``sum(D_m) * N * H`` weights, which for EfficientNet's 1,280
    channels is most of the head; gating on the projections costs ``(N * H)^2``."""

    Settings = GatedSettings
    paper = "Arevalo et al. 2017, arXiv:1702.01992"

    def __init__(self, input_dims, num_outputs, settings: GatedSettings):
        super().__init__(input_dims, num_outputs, settings)
        h = settings.hidden_size
        self.names = list(input_dims)
        self.gate_on_projections = settings.gate_input == "projections"
        self.norms = nn.ModuleDict({m: nn.LayerNorm(d) for m, d in input_dims.items()})
        self.proj = nn.ModuleDict({m: nn.Linear(d, h) for m, d in input_dims.items()})
        gate_width = h * len(self.names) if self.gate_on_projections else sum(input_dims.values())
        self.gate = nn.Linear(gate_width, h * len(self.names))
        # As in the paper, the fused vector feeds an MLP classifier (a linear one cannot
        # express "does what the question asks match what the image shows").
        self.mlp = nn.Sequential(nn.Dropout(settings.dropout), nn.Linear(h, h), nn.GELU())
        self.out = classifier(h, num_outputs, settings.dropout)

    def forward(self, outputs) -> torch.Tensor:
        xs = [self.norms[m](outputs[m].pooled) for m in self.names]
        hs = torch.stack([torch.tanh(self.proj[m](x)) for m, x in zip(self.names, xs)], dim=1)  # [B, N, H]
        gate_in = hs.flatten(1) if self.gate_on_projections else torch.cat(xs, dim=-1)
        z = self.gate(gate_in).view(hs.shape).softmax(dim=1)  # [B, N, H]
        return self.out(self.mlp((z * hs).sum(1)))


@FUSIONS.register("hadamard")
class HadamardHead(FusionHead):
    """Low-rank bilinear pooling (MLB; Kim et al., "Hadamard Product for Low-rank
    Bilinear Pooling", ICLR 2017, arXiv:1610.04325): ``f = P(tanh(U x_t) * tanh(V x_v))``,
    generalised to N modalities as the elementwise product of every modality's
    projection. Multiplicative interactions let a linear classifier ask "does the
    image show what the question asks about", which additive fusion cannot; and
    with no gate the head is just the projections and the classifier."""

    paper = "Kim et al. 2017, arXiv:1610.04325"

    def __init__(self, input_dims, num_outputs, settings: FusionSettings):
        super().__init__(input_dims, num_outputs, settings)
        h = settings.hidden_size
        self.names = list(input_dims)
        self.norms = nn.ModuleDict({m: nn.LayerNorm(d) for m, d in input_dims.items()})
        self.proj = nn.ModuleDict({m: nn.Linear(d, h) for m, d in input_dims.items()})
        self.drop = nn.Dropout(settings.dropout)
        self.out = classifier(h, num_outputs, settings.dropout)

    def forward(self, outputs) -> torch.Tensor:
        fused = None
        for m in self.names:
            h = torch.tanh(self.proj[m](self.drop(self.norms[m](outputs[m].pooled))))  # [B, H]
            fused = h if fused is None else fused * h
        return self.out(fused)
