"""Token-level heads: ``cross_attention`` and ``transformer`` (early fusion)."""

from __future__ import annotations

import torch
from torch import nn

from ..config.fusion import AttentionSettings, CrossAttentionSettings
from ..encoders.base import masked_mean
from .base import FUSIONS, FusionHead, classifier


class CrossLayer(nn.Module):
    """Pre-norm cross-attention block: x += Attn(x, ctx); x += FFN(x)."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_ff = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * width, width))

    def forward(self, x, x_mask, ctx, ctx_mask):
        kv = self.norm_kv(ctx)
        attn, _ = self.attn(self.norm_q(x), kv, kv, key_padding_mask=~ctx_mask, need_weights=False)
        x = x + attn
        return x + self.ff(self.norm_ff(x))


@FUSIONS.register("cross_attention")
class CrossAttentionHead(FusionHead):
    """Tokens of the ``query`` modality attend to the tokens of all other modalities
    (optionally the reverse too), as in the co-attention layers of ViLBERT (Lu et al.
    2019) and LXMERT (Tan & Bansal 2019); then masked mean pooling and a classifier."""

    Settings = CrossAttentionSettings
    paper = "Lu et al. 2019 (ViLBERT), Tan & Bansal 2019 (LXMERT)"

    def __init__(self, input_dims, num_outputs, settings: CrossAttentionSettings):
        super().__init__(input_dims, num_outputs, settings)
        w = settings.hidden_size
        self.query = settings.query
        self.others = [m for m in input_dims if m != self.query]
        self.proj = nn.ModuleDict({m: nn.Linear(d, w) for m, d in input_dims.items()})
        self.q_layers = nn.ModuleList(CrossLayer(w, settings.num_heads, settings.dropout) for _ in range(settings.num_layers))
        self.r_layers = nn.ModuleList(
            CrossLayer(w, settings.num_heads, settings.dropout) for _ in range(settings.num_layers if settings.bidirectional else 0)
        )
        self.out = classifier(w * (2 if settings.bidirectional else 1), num_outputs, settings.dropout)

    def forward(self, outputs) -> torch.Tensor:
        q = self.proj[self.query](outputs[self.query].tokens)
        q_mask = outputs[self.query].mask
        ctx = torch.cat([self.proj[m](outputs[m].tokens) for m in self.others], dim=1)
        ctx_mask = torch.cat([outputs[m].mask for m in self.others], dim=1)
        q0, ctx0 = q, ctx
        for layer in self.q_layers:
            q = layer(q, q_mask, ctx0, ctx_mask)
        pooled = [masked_mean(q, q_mask)]
        if self.r_layers:
            for layer in self.r_layers:
                ctx = layer(ctx, ctx_mask, q0, q_mask)
            pooled.append(masked_mean(ctx, ctx_mask))
        return self.out(torch.cat(pooled, dim=-1))


@FUSIONS.register("transformer")
class TransformerHead(FusionHead):
    """Early fusion (single-stream, as in VisualBERT / UNITER): every modality's tokens
    are projected to a common width, tagged with a learned modality embedding, and
    concatenated behind a learned [CLS] token; a small transformer encoder runs
    multimodal self-attention and the [CLS] output is classified."""

    Settings = AttentionSettings
    paper = "Li et al. 2019 (VisualBERT), Chen et al. 2020 (UNITER)"

    def __init__(self, input_dims, num_outputs, settings: AttentionSettings):
        super().__init__(input_dims, num_outputs, settings)
        w = settings.hidden_size
        self.names = list(input_dims)
        self.proj = nn.ModuleDict({m: nn.Linear(d, w) for m, d in input_dims.items()})
        self.modality_embed = nn.ParameterDict({m: nn.Parameter(torch.zeros(w)) for m in self.names})
        self.cls = nn.Parameter(torch.zeros(1, 1, w))
        nn.init.normal_(self.cls, std=0.02)
        for p in self.modality_embed.values():
            nn.init.normal_(p, std=0.02)
        layer = nn.TransformerEncoderLayer(
            w, settings.num_heads, 2 * w, settings.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, settings.num_layers, enable_nested_tensor=False)
        self.out = classifier(w, num_outputs, settings.dropout)

    def forward(self, outputs) -> torch.Tensor:
        seqs = [self.proj[m](outputs[m].tokens) + self.modality_embed[m] for m in self.names]
        masks = [outputs[m].mask for m in self.names]
        batch = seqs[0].shape[0]
        x = torch.cat([self.cls.expand(batch, -1, -1)] + seqs, dim=1)
        mask = torch.cat([torch.ones(batch, 1, dtype=torch.bool, device=x.device)] + masks, dim=1)
        x = self.encoder(x, src_key_padding_mask=~mask)
        return self.out(x[:, 0])
