"""Integration: the medical recipe for a few steps on a small slice of the shared VQA-RAD data."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmpeft.cli import app

ROOT = Path(__file__).resolve().parents[1]
VQA_RAD = ROOT.parent / "shared" / "vqa_rad"


@pytest.mark.skipif(not (VQA_RAD / "trainset.json").is_file(), reason="VQA-RAD not present at ../shared/vqa_rad")
def test_medical_recipe_few_steps(assets, tmp_path):
    res = CliRunner().invoke(app, [
        "finetune", str(ROOT / "recipes" / "medical_vqa.yaml"),
        f"data.root={VQA_RAD}", f"encoders.text.model={assets['bert']}", f"encoders.image.model={assets['effnet']}",
        "encoders.image.image_size=32", "data.max_train_samples=64", "data.max_eval_samples=16", "data.max_test_samples=40",
        "train.epochs=1", "train.batch_size=16", f"output.dir={tmp_path}", "output.plots=true",
    ])
    assert res.exit_code == 0, res.output
    bundle = tmp_path / "medical_vqa"
    metrics = json.loads((bundle / "metrics.json").read_text())
    test = metrics["test"]
    assert test["count"] == 40
    assert set(test["groups"]) == {"answer_type", "question_type", "image_organ"}
    assert set(test["groups"]["answer_type"]) <= {"OPEN", "CLOSED"}
    assert test["out_of_vocab"] > 0  # unseen answers are kept and scored wrong
    assert (bundle / "training_curves.png").is_file() and (bundle / "group_accuracy.png").is_file()
    res = CliRunner().invoke(app, ["evaluate", str(bundle), f"data.root={VQA_RAD}"])
    assert res.exit_code == 0 and "reproduced" in res.output, res.output


def test_missing_root_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(app, ["finetune", str(ROOT / "recipes" / "medical_vqa.yaml"), f"data.root={tmp_path / 'none'}"])
    assert res.exit_code == 2
    assert "VQA-RAD not found" in res.output and "CC0" in res.output and "data.root" in res.output


def shipped_adapters():
    return sorted(p for p in (ROOT / "adapters").glob("vqa_rad_*") if (p / "manifest.json").is_file())


def test_adapters_are_shipped():
    assert shipped_adapters(), "the shipped VQA-RAD adapters are missing from adapters/"


@pytest.mark.skipif(not (VQA_RAD / "trainset.json").is_file(), reason="VQA-RAD not present at ../shared/vqa_rad")
@pytest.mark.parametrize("bundle", shipped_adapters(), ids=lambda p: p.name)
def test_shipped_adapter_reproduces_and_predicts(monkeypatch, bundle):
    monkeypatch.chdir(ROOT)  # its recipe reads ../shared/vqa_rad relative to the project root
    res = CliRunner().invoke(app, ["evaluate", str(bundle), f"data.root={VQA_RAD}"])
    assert res.exit_code == 0 and "reproduced" in res.output, res.output
    image = sorted((VQA_RAD / "images").iterdir())[0]
    res = CliRunner().invoke(app, ["predict", str(bundle), "--image", str(image), "--question", "is this a ct scan?"])
    assert res.exit_code == 0, res.output
    card = (bundle / "README.md").read_text()
    assert "not for diagnosis" in card.lower() and f"mmpeft predict {bundle.name} " in card


@pytest.mark.skipif(not (VQA_RAD / "trainset.json").is_file(), reason="VQA-RAD not present at ../shared/vqa_rad")
def test_benchmark_runs_side_by_side(assets, tmp_path):
    """`mmpeft bench vqa-rad --jobs 2` on tiny encoders and a slice of VQA-RAD: both runs
    train at once, the table keeps the benchmark's order, the results say how they ran."""
    res = CliRunner().invoke(app, [
        "bench", "vqa-rad", "--recipe", str(ROOT / "recipes" / "medical_vqa_15ep.yaml"), "--configs", "bitfit,head only", "--seeds", "0", "--jobs", "2", "--out", str(tmp_path / "out"),
        f"data.root={VQA_RAD}", f"encoders.text.model={assets['bert']}", f"encoders.image.model={assets['effnet']}",
        "encoders.image.image_size=32", "data.max_train_samples=48", "data.max_eval_samples=16", "data.max_test_samples=40",
        "train.epochs=1", "train.batch_size=16", "output.plots=false",
    ])
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "out" / "vqa_rad.json").read_text())
    assert sorted(r["config"] for r in result["runs"]) == ["bitfit", "head only"]
    assert all(r["jobs"] == 2 for r in result["runs"])
    assert [r["config"] for r in result["summary"]] == ["head only", "bitfit"]
    assert "up to 2 runs at a time" in (tmp_path / "out" / "vqa_rad.md").read_text()
    for r in result["runs"]:
        metrics = json.loads((tmp_path / "out" / "runs" / f"{r['config'].replace(' ', '_')}_s0" / "metrics.json").read_text())
        assert r["overall"] == metrics["test"]["accuracy"]


FSDD = ROOT.parent / "shared" / "fsdd"


@pytest.mark.skipif(not (FSDD / "recordings").is_dir(), reason="FSDD not present at ../shared/fsdd")
def test_shipped_spoken_digit_adapter_reproduces_and_predicts(monkeypatch):
    """The audio bundle shipped beside the VQA-RAD ones: its 300 test recordings score exactly
    as stored, and a spoken "zero" is read as 0 (the downgrade attack of issue 35 read it as 3)."""
    bundle = ROOT / "adapters" / "spoken_digits"
    monkeypatch.chdir(ROOT)
    res = CliRunner().invoke(app, ["evaluate", str(bundle), f"data.root={FSDD}"])
    assert res.exit_code == 0 and "reproduced" in res.output, res.output
    res = CliRunner().invoke(app, ["predict", str(bundle), "--audio", str(FSDD / "recordings" / "0_george_0.wav")])
    assert res.exit_code == 0 and res.output.split()[0] == "0", res.output
