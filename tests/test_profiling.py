"""``train.profile_steps``: a few steps under torch.profiler, their summary kept in the
bundle; profiling changes no number the run computes."""

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mmpeft.bundle.io import read_manifest, verify_files
from mmpeft.config import load_recipe
from mmpeft.profiling import StepProfiler, summary_lines, union_us
from mmpeft.train import finetune
from tests import tiny
from tests.helpers import bundle_results


def test_union_counts_overlapping_spans_once():
    assert union_us([]) == 0
    assert union_us([(0, 2), (1, 3), (5, 6)]) == 4
    assert union_us([(0, 10), (1, 3), (2, 4)]) == 10
    assert union_us([(5, 6), (0, 1)]) == 2


@pytest.mark.parametrize("steps, skip, total, profiled", [(3, 2, 10, 3), (3, 2, 5, 2), (2, 0, 8, 2), (3, 4, 5, 0)])
def test_profiles_the_steps_after_skip_and_one_warm_up(steps, skip, total, profiled):
    """Three matrix products a step: the summary counts exactly the profiled steps' calls; a
    loop that ends inside the window reports the steps it profiled, one that ends before it none."""
    a = torch.randn(16, 16)
    with StepProfiler(steps, skip, torch.device("cpu")) as prof:
        for _ in range(total):
            for _ in range(3):
                a = torch.tanh(a @ a)
            prof.step()
    assert prof.summary["steps"] == profiled
    if not profiled:
        assert "before the profiled ones" in prof.summary["note"] and summary_lines(prof.summary)[0].endswith(".")
        return
    mm = next(r for r in prof.summary["top_host"] if r["name"] == "aten::mm")
    assert mm["calls"] == 3 * profiled
    assert prof.summary["device_busy_share"] is None and prof.summary["top_device"] == []  # no GPU here
    assert prof.summary["wall_ms_per_step"] > 0 and "aten::mm" in prof.table
    assert summary_lines(prof.summary)[0].startswith(f"{profiled} steps under `torch.profiler`")


def test_an_inactive_profiler_does_nothing():
    with StepProfiler(0, 2, torch.device("cpu")) as prof:
        for _ in range(5):
            prof.step()
    assert prof.summary is None and prof._prof is None


def test_a_profiled_run_computes_the_same_and_keeps_its_profile_in_the_sealed_bundle(assets, tmp_path):
    raw = tiny.recipe_dict(assets["bert"], assets["vit"], assets["data"], tmp_path / "out", epochs=2)
    plain = finetune(load_recipe(raw, [f"output.dir={tmp_path / 'plain'}"]))
    profiled = finetune(load_recipe(raw, [f"output.dir={tmp_path / 'profiled'}", "train.profile_steps=2", "train.profile_skip=1"]))
    plain_metrics, plain_tensors = bundle_results(plain)
    prof_metrics, prof_tensors = bundle_results(profiled)
    assert plain_metrics == prof_metrics
    assert plain_tensors.keys() == prof_tensors.keys() and all(torch.equal(plain_tensors[k], prof_tensors[k]) for k in plain_tensors)
    summary = json.loads((profiled / "profile.json").read_text())
    assert summary["steps"] == 2 and summary["top_host"] and "Self CPU" in (profiled / "profile.txt").read_text()
    manifest = read_manifest(profiled)
    verify_files(profiled, manifest)  # sealed with the rest: listed and hashed
    assert "profile.json" in manifest["files"] and not (plain / "profile.json").exists()


def test_bench_profile_steps_out_of_range_is_a_usage_error(tmp_path):
    from mmpeft.cli import app

    res = CliRunner().invoke(app, ["bench", "throughput", "--recipe", "recipes/quickstart.yaml", "--steps", "4", "--profile-steps", "4",
                                   "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "--profile-steps 4" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "b").exists()


def test_recipe_bounds_name_the_key():
    raw = yaml.safe_load("encoders: {text: {model: minilm}}")
    with pytest.raises(Exception) as err:
        load_recipe(raw, ["train.profile_steps=-1"])
    assert "train.profile_steps" in str(err.value)
