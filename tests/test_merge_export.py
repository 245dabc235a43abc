"""Merge is verified and faithful; merged encoders load with plain transformers; ONNX parity."""

import json

import pytest
import torch
from typer.testing import CliRunner

from mmpeft.bundle.io import load_bundle
from mmpeft.bundle.writer import write_bundle
from mmpeft.bundle.merge import merge_bundle
from mmpeft.cli import app
from mmpeft.model import build_model
from tests.helpers import fixed_batch, recipe_for

runner = CliRunner()
VOCAB = ["red", "green", "blue"]


def trained_bundle(assets, tmp_path, text_method, image_method, image_kind="vit"):
    """A bundle whose trainable parameters were perturbed (as if trained), so merges are not trivial."""
    from mmpeft.config import load_recipe

    recipe = recipe_for(assets, image_kind, image_method, tmp_path)
    raw = recipe.model_dump(mode="json")
    raw["encoders"]["text"]["peft"] = text_method if isinstance(text_method, dict) else {"method": text_method}
    recipe = load_recipe(raw)
    model = build_model(recipe, len(VOCAB))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    bundle = tmp_path / "bundle"
    write_bundle(bundle, model, recipe, VOCAB, {"test": {"accuracy": 0.0}})
    return bundle, model


MERGEABLE = ["lora", {"method": "lora", "use_dora": True}, {"method": "lora", "use_rslora": True}, "ia3", "bitfit", "full", "none"]


@pytest.mark.parametrize("method", MERGEABLE, ids=lambda m: m if isinstance(m, str) else "lora-" + [k for k, v in m.items() if v is True][0])
def test_merge_within_tolerance_and_plain_transformers_loads(assets, tmp_path, method):
    bundle, model = trained_bundle(assets, tmp_path, method, method)
    out = tmp_path / "merged"
    report = merge_bundle(bundle, out)
    assert report["max_abs_logit_diff"] <= 1e-5 and report["top1_agreement"] == 1.0
    assert set(report["folded"]) == {"text", "image"} and not report["kept"]
    # merged encoders are plain transformers directories
    from transformers import AutoModel

    merged = load_bundle(out)
    inputs, _ = fixed_batch(merged.model)
    for name in ("text", "image"):
        plain = AutoModel.from_pretrained(str(out / "encoders" / name / "base")).eval()
        ours = merged.model.encoders[name].model
        kwargs = inputs[name]
        with torch.no_grad():
            assert torch.allclose(plain(**kwargs).last_hidden_state, ours(**kwargs).last_hidden_state, atol=1e-6)
    # and the merged model gives the unmerged logits
    with torch.no_grad():
        assert torch.allclose(merged.model.logits(inputs), model.eval().logits(inputs), atol=1e-5)


def test_mixed_methods_keep_unfoldable_and_predict_works(assets, tmp_path):
    bundle, model = trained_bundle(assets, tmp_path, "adapter", "prompt")
    res = runner.invoke(app, ["merge", str(bundle), "--out", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    assert "adapter cannot be folded" in res.output and "prompt cannot be folded" in res.output
    merged = load_bundle(tmp_path / "m")
    inputs, _ = fixed_batch(merged.model)
    with torch.no_grad():
        assert torch.allclose(merged.model.logits(inputs), model.eval().logits(inputs), atol=1e-5)
    report = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    assert report["kept"] == {"text": "adapter", "image": "prompt"}


def test_lora_plus_bitfit_on_cnn(assets, tmp_path):
    bundle, model = trained_bundle(assets, tmp_path, "lora", "bitfit", image_kind="effnet")
    report = merge_bundle(bundle, tmp_path / "m")
    assert report["max_abs_logit_diff"] <= 1e-5


def test_failed_verification_writes_nothing(assets, tmp_path):
    bundle, _ = trained_bundle(assets, tmp_path, "lora", "lora")
    res = runner.invoke(app, ["merge", str(bundle), "--out", str(tmp_path / "m"), "--tolerance", "0"])
    # LoRA folding changes float rounding, so a zero tolerance fails (unless bit-identical)
    if res.exit_code != 0:
        assert res.exit_code == 1 and "merge verification failed" in res.output
        assert not (tmp_path / "m").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.tmp")]


def test_onnx_export_parity(assets, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    bundle, _ = trained_bundle(assets, tmp_path, "lora", "lora")
    res = runner.invoke(app, ["export", str(bundle), "--format", "onnx", "--out", str(tmp_path / "onnx")])
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert info["onnx_max_abs_diff"] is not None and info["onnx_max_abs_diff"] < 1e-4
    assert (tmp_path / "onnx" / "model.onnx").is_file()
