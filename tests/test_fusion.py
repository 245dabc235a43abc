"""Every registered fusion head: any number of modalities, pooled-only or token inputs."""

import pytest
import torch

from mmpeft.encoders.base import EncoderOutput
from mmpeft.fusion import FUSIONS, build_fusion


def outputs(dims: dict[str, int], batch=3, tokens=5, pooled_only=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, d) in enumerate(dims.items()):
        t = 1 if pooled_only else tokens + i
        toks = torch.randn(batch, t, d, generator=g)
        mask = torch.ones(batch, t, dtype=torch.bool)
        if t > 2:
            mask[0, -1] = False  # padding
        out[name] = EncoderOutput(toks, mask, toks.mean(1))
    return out


@pytest.mark.parametrize("fusion", FUSIONS.names())
@pytest.mark.parametrize("dims", [{"text": 8, "image": 12}, {"text": 8, "image": 12, "audio": 6}])
@pytest.mark.parametrize("pooled_only", [False, True])
def test_heads_shapes_and_gradients(fusion, dims, pooled_only):
    torch.manual_seed(0)
    head = build_fusion({"type": fusion, "hidden_size": 16, "num_heads": 2} if fusion in ("cross_attention", "transformer")
                        else {"type": fusion, "hidden_size": 16}, dims, num_outputs=7)
    outs = outputs(dims, pooled_only=pooled_only)
    logits = head(outs)
    assert logits.shape == (3, 7)
    logits.sum().backward()
    assert all(p.grad is not None for p in head.parameters() if p.requires_grad)


@pytest.mark.parametrize("fusion", ["cross_attention", "transformer"])
def test_token_heads_ignore_padding(fusion):
    torch.manual_seed(0)
    dims = {"text": 8, "image": 12}
    head = build_fusion({"type": fusion, "hidden_size": 16, "num_heads": 2}, dims, 4).eval()
    outs = outputs(dims)
    ref = head(outs)
    outs["text"].tokens[0, -1] = 1e3  # a padded position: must not change the result
    assert torch.allclose(head(outs), ref, atol=1e-5)


def test_cross_attention_bidirectional_and_bad_query():
    dims = {"text": 8, "image": 12}
    head = build_fusion({"type": "cross_attention", "hidden_size": 16, "num_heads": 2, "bidirectional": True, "num_layers": 2}, dims, 4)
    assert head(outputs(dims)).shape == (3, 4)
    with pytest.raises(ValueError, match="fusion.query: 'audio' is not an encoder"):
        build_fusion({"type": "cross_attention", "query": "audio"}, dims, 4)


def test_gated_gate_mixes_modalities():
    torch.manual_seed(0)
    dims = {"text": 8, "image": 8}
    head = build_fusion({"type": "gated", "hidden_size": 16, "dropout": 0.0}, dims, 4).eval()
    outs = outputs(dims)
    z = head.gate(torch.cat([head.norms[m](outs[m].pooled) for m in head.names], -1)).view(3, 2, 16).softmax(1)
    assert torch.allclose(z.sum(1), torch.ones(3, 16))


def test_gated_gate_on_projections():
    """The projections gate is (N*H)^2 + N*H weights whatever the encoder widths, and
    computes z from [tanh(W_m x_m)] exactly."""
    torch.manual_seed(0)
    dims = {"text": 8, "image": 40}
    wide = build_fusion({"type": "gated", "hidden_size": 16}, dims, 4)
    narrow = build_fusion({"type": "gated", "hidden_size": 16, "gate_input": "projections", "dropout": 0.0}, dims, 4).eval()
    assert sum(p.numel() for p in wide.gate.parameters()) == 48 * 32 + 32
    assert sum(p.numel() for p in narrow.gate.parameters()) == 32 * 32 + 32
    outs = outputs(dims)
    hs = torch.stack([torch.tanh(narrow.proj[m](narrow.norms[m](outs[m].pooled))) for m in narrow.names], 1)
    z = narrow.gate(hs.flatten(1)).view(3, 2, 16).softmax(1)
    assert torch.allclose(narrow(outs), narrow.out(narrow.mlp((z * hs).sum(1))), atol=1e-6)
    with pytest.raises(Exception, match="gate_input"):
        build_fusion({"type": "gated", "gate_input": "raw"}, dims, 4)


def test_hadamard_is_the_product_of_projections():
    """MLB: logits = classifier(prod_m tanh(W_m LN(x_m))); a modality whose projection
    is zero silences the whole fused vector (multiplicative, not additive)."""
    torch.manual_seed(0)
    dims = {"text": 8, "image": 12, "audio": 6}
    head = build_fusion({"type": "hadamard", "hidden_size": 16, "dropout": 0.0}, dims, 5).eval()
    outs = outputs(dims)
    fused = torch.ones(3, 16)
    for m in dims:
        fused = fused * torch.tanh(head.proj[m](head.norms[m](outs[m].pooled)))
    assert torch.allclose(head(outs), head.out(fused), atol=1e-6)
    assert sum(p.numel() for p in head.parameters()) == sum(2 * d + d * 16 + 16 for d in dims.values()) + 2 * 16 + 16 * 5 + 5
    with torch.no_grad():
        head.proj["audio"].weight.zero_()
        head.proj["audio"].bias.zero_()
    assert torch.allclose(head(outs), head.out(torch.zeros(3, 16)).expand(3, 5), atol=1e-6)


def test_hadamard_attention_is_mlb_attention():
    """``attend: [image]``: image tokens are weighted by softmax_t(w . (q * tanh(V LN(v_t))))
    with q the text projection; padded tokens get no weight; only glimpses*(H+1)
    weights are added (plus the wider classifier for 2 glimpses)."""
    torch.manual_seed(0)
    dims = {"text": 8, "image": 12}
    plain = build_fusion({"type": "hadamard", "hidden_size": 16, "dropout": 0.0}, dims, 5)
    head = build_fusion({"type": "hadamard", "hidden_size": 16, "dropout": 0.0, "attend": ["image"], "glimpses": 2}, dims, 5).eval()
    outs = outputs(dims)
    q = torch.tanh(head.proj["text"](head.norms["text"](outs["text"].pooled)))  # [B, H]
    v = torch.tanh(head.proj["image"](head.norms["image"](outs["image"].tokens)))  # [B, T, H]
    scores = head.attention["image"](q[:, None] * v)  # [B, T, 2]
    mask = outs["image"].mask
    fused = []
    for b in range(3):
        weights = scores[b][mask[b]].softmax(0)  # only real tokens
        fused.append((q[b] * (weights.T @ v[b][mask[b]])).flatten())
    assert torch.allclose(head(outs), head.out(torch.stack(fused)), atol=1e-6)
    n_plain = sum(p.numel() for p in plain.parameters())
    n_head = sum(p.numel() for p in head.parameters())
    assert n_head - n_plain == 2 * (16 + 1) + 2 * 16 + 16 * 5  # attention, then LayerNorm and classifier 16 wider
    # a padded token cannot change the answer
    changed = {k: v for k, v in outs.items()}
    toks = outs["image"].tokens.clone()
    toks[0, -1] = 1e3
    changed["image"] = EncoderOutput(toks, outs["image"].mask, outs["image"].pooled)
    assert torch.equal(head(changed)[0], head(outs)[0])
    with pytest.raises(ValueError, match="fusion.attend: 'audio' is not an encoder"):
        build_fusion({"type": "hadamard", "attend": ["audio"]}, dims, 4)
    with pytest.raises(ValueError, match="at least one modality must stay pooled"):
        build_fusion({"type": "hadamard", "attend": ["image", "text"]}, dims, 4)
    with pytest.raises(Exception, match="glimpses"):
        build_fusion({"type": "hadamard", "glimpses": 0}, dims, 4)
