"""Heads on pooled features: ``concat`` (late fusion MLP), ``gated`` (GMU) and
``hadamard`` (low-rank bilinear pooling)."""

from __future__ import annotations

import torch
from torch import nn

from ..config.fusion import FusionSettings, GatedSettings, HadamardSettings
from .base import FUSIONS, FusionHead, classifier


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
    with no gate the head is just the projections and the classifier.

    ``attend: [image]`` is the paper's attention model (its section 4): each image
    token is projected like the pooled vector, scored by ``w_g . (q * tanh(V v_i))``
    where ``q`` is the product of the other modalities' projections, and the
    softmax-weighted token projection replaces the pooled one. The projections are
    shared with the pooled path, so attention adds only ``glimpses * (hidden + 1)``
    weights (plus the wider classifier when ``glimpses > 1``)."""

    Settings = HadamardSettings
    paper = "Kim et al. 2017, arXiv:1610.04325"

    def __init__(self, input_dims, num_outputs, settings: HadamardSettings):
        super().__init__(input_dims, num_outputs, settings)
        h = settings.hidden_size
        self.names = list(input_dims)
        self.attend = list(dict.fromkeys(settings.attend))
        self.glimpses = settings.glimpses if self.attend else 1
        self.norms = nn.ModuleDict({m: nn.LayerNorm(d) for m, d in input_dims.items()})
        self.proj = nn.ModuleDict({m: nn.Linear(d, h) for m, d in input_dims.items()})
        self.attention = nn.ModuleDict({m: nn.Linear(h, self.glimpses) for m in self.attend})
        self.drop = nn.Dropout(settings.dropout)
        self.out = classifier(h * self.glimpses, num_outputs, settings.dropout)

    def project(self, m: str, x: torch.Tensor) -> torch.Tensor:
        """``[..., D_m] -> [..., H]``: LayerNorm, dropout, linear, tanh."""
        return torch.tanh(self.proj[m](self.drop(self.norms[m](x))))

    def forward(self, outputs) -> torch.Tensor:
        guide = None  # product of the pooled (non-attended) projections: [B, H]
        for m in self.names:
            if m not in self.attend:
                h = self.project(m, outputs[m].pooled)
                guide = h if guide is None else guide * h
        fused = guide.unsqueeze(1)  # [B, 1 or G, H]
        for m in self.attend:
            tokens = self.project(m, outputs[m].tokens)  # [B, T, H]
            scores = self.attention[m](self.drop(guide.unsqueeze(1) * tokens))  # [B, T, G]
            scores = scores.masked_fill(~outputs[m].mask.unsqueeze(-1), torch.finfo(scores.dtype).min)
            glimpse = torch.einsum("btg,bth->bgh", scores.softmax(dim=1), tokens)  # [B, G, H]
            fused = fused * glimpse
        return self.out(fused.flatten(1))
