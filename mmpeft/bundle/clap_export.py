"""ONNX export of CLAP's feature fusion (Wu et al. 2023, "Large-scale Contrastive
Language-Audio Pretraining with Feature Fusion and Keyword-to-Caption Augmentation").

transformers' HTSAT patch embedding runs the attentional feature fusion only on the clips
longer than the window, chosen by ``if len(is_longer_idx) > 0`` and an indexed write: the
tracer records whichever branch the example batch took, so a graph traced on short clips
would answer long ones wrongly (and one traced on long clips fails on a batch without
any). For the export, :func:`branch_free_fusion` swaps in a forward that computes both
views for every clip and keeps the fused one where ``is_longer`` is set. In eval mode each
clip's result is the same as the original's (the fusion block's batch norms use their
running statistics), and the export's parity checks compare the graph with PyTorch on
short, long and mixed batches.
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F


def _fused_patch_embed(self, hidden_states, is_longer_idx=None):
    batch = hidden_states.shape[0]
    rows = torch.arange(batch, device=hidden_states.device)
    longer = (torch.zeros(batch, dtype=torch.bool, device=hidden_states.device) if is_longer_idx is None
              else (rows[:, None] == is_longer_idx[None, :]).any(1))
    global_view = self.proj(hidden_states[:, 0:1])
    local = hidden_states[:, 1:].contiguous()  # the three crops, each through the local convolution
    b, c, h, w = local.shape
    local = self.mel_conv2d(local.view(b * c, 1, h, w))
    _, features, h, w = local.shape
    local = local.view(b, c, features, h, w).permute(0, 2, 3, 1, 4).contiguous().flatten(3)
    local = F.pad(local, (0, global_view.size(-1) - local.size(-1)), "constant", 0)
    out = torch.where(longer[:, None, None, None], self.fusion_model(global_view, local), global_view)
    if self.flatten:
        out = out.flatten(2).transpose(1, 2)
    return self.norm(out)


@contextmanager
def branch_free_fusion(model: torch.nn.Module):
    """Within the block, every fused CLAP patch embedding in ``model`` runs without
    data-dependent branches; yields how many there are."""
    patched = [m for m in model.modules()
               if type(m).__name__ == "ClapAudioPatchEmbed" and getattr(m, "enable_fusion", False)]
    for module in patched:
        module.forward = types.MethodType(_fused_patch_embed, module)
    try:
        yield len(patched)
    finally:
        for module in patched:
            del module.forward  # the class's own forward again
