"""The throughput benchmark's CPU path on tiny models (every column produced; the reference
loop trains exactly finetune's parameters), and pipeline features that change no number."""

import time
from pathlib import Path

import pytest
import torch
import yaml

from mmpeft.bench import throughput
from mmpeft.bench.device import GpuBusy, largest_fitting
from mmpeft.config import load_recipe
from mmpeft.train import finetune
from tests import tiny
from tests.helpers import bundle_results

def tiny_recipe(assets, tmp_path) -> Path:
    raw = tiny.recipe_dict(assets["bert"], assets["vit"], assets["data"], tmp_path / "out", epochs=1)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_benchmark_produces_every_figure(assets, tmp_path):
    recipe = tiny_recipe(assets, tmp_path)
    toggles = [t for t in throughput.TOGGLES if "compile" not in t[0]]  # compiling takes minutes on CPU: the command runs it
    result = throughput.run(str(recipe), str(tmp_path / "bench"), steps=2, scaling=(16, 32), rows_test=(500,), toggles=toggles)
    assert result["same_trainable_parameters"] is True
    assert result["reference"]["samples_per_second"] > 0 and result["reference"]["steps"] == 2
    assert result["reference"]["gflops_per_sample"] > 0 and result["reference"]["achieved_tflops"] > 0
    assert result["reference"]["mfu"] is None  # no GPU peak to divide by on a CPU
    # the reference and the recipe's own finetune ran twice each; each row keeps its faster run
    assert len(result["reference"]["runs_samples_per_second"]) == 2 and len(result["pipeline"][0]["runs_samples_per_second"]) == 2
    assert result["reference"]["samples_per_second"] == max(result["reference"]["runs_samples_per_second"])
    assert result["pipeline"][0]["samples_per_second"] == max(result["pipeline"][0]["runs_samples_per_second"])
    assert [r["configuration"] for r in result["pipeline"]][1:] == [label for label, _ in toggles]
    for row in result["pipeline"]:
        assert row["samples_per_second"] > 0 and 0 <= row["data_share"] <= 1 and row["vs_reference"] > 0, row
    assert result["feature_cache"]["second_epoch_speedup"] > 0
    assert [r["rows"] for r in result["scaling"]] == [16, 32] and result["scaling_spread_pct"] >= 0
    for size in result["scaling"]:  # two runs of two epochs each, and the figure is the fastest second epoch
        assert [len(run) for run in size["epoch_seconds"]] == [2, 2]
        assert size["best_epoch_seconds"] == min(run[1] for run in size["epoch_seconds"])
    assert result["manifest_rows"][0]["rows"] == 500 and result["manifest_rows"][0]["peak_rss_mib"] > 0
    table = (tmp_path / "bench" / "throughput.md").read_text()
    assert "reference loop" in table and "eager attention" in table and "per 1k rows" in table and "GFLOP" in table and "ran twice each" in table


def run_results(recipe: Path, out: Path, *overrides):
    return bundle_results(finetune(load_recipe(recipe, [f"output.dir={out}", *overrides])))


@pytest.mark.parametrize("feature", [["data.image_cache_mb=1"], ["train.num_workers=2"], ["train.pin_memory=true"]])
def test_pipeline_features_change_no_number(assets, tmp_path, feature):
    """A tiny image cache (every image decoded again), DataLoader workers and pinned memory
    give bit-identical losses, metrics and weights on CPU."""
    recipe = tiny_recipe(assets, tmp_path)
    plain_metrics, plain_tensors = run_results(recipe, tmp_path / "plain", "train.epochs=2")
    other_metrics, other_tensors = run_results(recipe, tmp_path / "other", "train.epochs=2", *feature)
    assert plain_metrics == other_metrics
    assert plain_tensors.keys() == other_tensors.keys() and all(torch.equal(plain_tensors[k], other_tensors[k]) for k in plain_tensors)


def test_image_cache_stays_within_its_budget(tmp_path):
    import numpy as np
    from PIL import Image

    from mmpeft.data.batching import ImageStore

    store = ImageStore(max_side=64, cache_mb=1)  # 1 MiB: about 80 images of 64x64
    paths = []
    for i in range(300):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((64, 64, 3), i % 256, dtype=np.uint8)).save(path)
        paths.append(str(path))
    first = [np.asarray(store.get(p)).copy() for p in paths]
    assert store.cached_bytes <= 2**20
    again = [np.asarray(store.get(p)) for p in paths]  # dropped ones are decoded again, to the same pixels
    assert all((a == b).all() for a, b in zip(first, again))


def test_scaling_alternates_sizes_keeps_the_fastest_second_epoch_and_names_a_failure(monkeypatch, tmp_path):
    calls = []

    def fake_pipeline(recipe, overrides, out, name, epochs):
        n = int(overrides[-1].split("=")[1])
        calls.append(n)
        if n == 30:
            return {"error": "RuntimeError: out of memory"}
        second = {10: [5.0, 3.0], 20: [4.0, 6.0]}[n][len([c for c in calls if c == n]) - 1]
        return {"epoch_seconds": [9.0, second], "cpu_steal_pct": 0.5}

    monkeypatch.setattr(throughput, "pipeline", fake_pipeline)
    found = throughput.scaling_runs("r.yaml", [], tmp_path, (10, 20, 30))
    assert calls == [10, 20, 30, 30, 20, 10]  # smallest first, then largest first
    assert found[0] == {"rows": 10, "epoch_seconds": [[9.0, 5.0], [9.0, 3.0]], "best_epoch_seconds": 3.0,
                        "seconds_per_1k_rows": 300.0, "cpu_steal_pct_of_runs": [0.5, 0.5]}
    assert found[1]["best_epoch_seconds"] == 4.0 and found[1]["seconds_per_1k_rows"] == 200.0
    assert found[2] == {"rows": 30, "error": "RuntimeError: out of memory"}


def test_largest_fitting_finds_the_largest_multiple_of_8_that_fits():
    for threshold in (8, 9, 63, 64, 100, 1000, 4096, 5000):
        tried = []

        def fits(b):
            tried.append(b)
            return b <= threshold

        assert largest_fitting(fits, limit=4096) == min(threshold // 8 * 8, 4096), threshold
        assert len(tried) <= 2 * 10  # doubling, then bisection: logarithmic in the limit
    assert largest_fitting(lambda b: False) == 0
    assert largest_fitting(lambda b: b <= 40, limit=24) == 24  # the limit (the training rows) caps the search


def test_gpu_busy_averages_the_samples_of_a_window():
    values = iter([0, 50, 100, 100, 100] + [100] * 1000)
    with GpuBusy(read=lambda: next(values), interval=0.01) as busy:
        time.sleep(0.2)
    first, last = busy.samples[0][0], busy.samples[-1][0]
    assert [u for _, u in busy.samples[:3]] == [0.0, 50.0, 100.0]
    assert busy.share(first, first) == 0.0  # only the first sample
    assert busy.share(busy.samples[3][0], last) == 1.0
    assert busy.share(last + 1, last + 2) is None


def test_base_sized_path_and_gpu_columns(assets, tmp_path):
    """The GPU configuration's path (BERT / ViT-B/16 architectures at 224 px with LoRA) runs here
    at a tiny size; the table gains the GPU columns where the figures are a GPU's."""
    recipe = tiny_recipe(assets, tmp_path)
    result = throughput.run(str(recipe), str(tmp_path / "bench"), steps=2, scaling=(), rows_test=(), encoders="small", features=False,
                            profile_steps=1)
    assert result["same_trainable_parameters"] is True
    # one more run with one step of its second epoch under torch.profiler (after the first's 2 and one warm-up)
    assert result["profile"]["steps"] == 1 and result["profile"]["top_host"] and result["profile"]["device_busy_share"] is None
    assert "encoders.image.image_size=224" in result["overrides"] and "encoders.text.model=<tmp>/bases/bert-base" in result["overrides"]
    assert result["reference"]["peak_gpu_mib"] is None and result["pipeline"][0]["gpu_busy"] is None
    table = (tmp_path / "bench" / "throughput.md").read_text()
    assert not (tmp_path / "bench" / "throughput.partial.json").exists()  # complete: only the finished files stay
    assert result["pipeline"][1:] == [] and result["feature_cache"] is None  # --no-features: the recipe's own settings only
    assert "GPU busy" not in table and "per 1k rows" not in table and "manifest rows" not in table and "Frozen" not in table
    result["reference"]["peak_gpu_mib"] = 900.0
    result["pipeline"][0].update(gpu_busy=0.834, peak_gpu_mib=1200.5)
    result["memory_budget"] = {"budget_gib": 16.0, "batch_size": 48, "probes": [{"batch_size": 8, "fits": True}, {"batch_size": 64, "fits": False}]}
    table = throughput.markdown(result)
    assert "| GPU busy | peak GPU MiB |" in table and " 83% | 1200.5 |" in table and "Batch 48" in table and "64 does not" in table
    assert "Where a finetune step's time goes" in table and "host ms (self, all steps)" in table
    result["profile"].update(device_ms_per_step=20.0, device_busy_share=0.25, kernel_launches_per_step=2279.0,
                             top_device=[{"name": "aten::copy_", "calls": 9, "host_self_ms": 1.0, "device_self_ms": 80.9}])
    table = throughput.markdown(result)
    assert "a GPU kernel or copy ran 20.0 ms (25%); 2279.0 kernel launches a step" in table and "| `aten::copy_` | 9 | 80.9 |" in table


def test_memory_budget_without_a_gpu_is_a_usage_error(tmp_path):
    from typer.testing import CliRunner

    from mmpeft.cli import app

    res = CliRunner().invoke(app, ["bench", "throughput", "--recipe", "recipes/quickstart.yaml", "--memory-budget-gb", "16", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "needs a CUDA GPU" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["bench", "throughput", "--recipe", "recipes/quickstart.yaml", "--encoders", "huge", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "expected recipe, base or small" in res.output


def test_a_killed_benchmark_keeps_what_it_measured(assets, tmp_path, monkeypatch):
    import json

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(throughput, "feature_cache", killed)
    with pytest.raises(KeyboardInterrupt):
        throughput.run(str(tiny_recipe(assets, tmp_path)), str(tmp_path / "bench"), steps=2, scaling=(), rows_test=(), toggles=[])
    kept = json.loads((tmp_path / "bench" / "throughput.partial.json").read_text())
    assert kept["reference"]["samples_per_second"] > 0 and kept["pipeline"][0]["samples_per_second"] > 0
    assert not (tmp_path / "bench" / "throughput.json").exists()


def test_gpu_busy_without_nvml_says_why_and_keeps_going():
    def no_nvml():
        raise ModuleNotFoundError("pynvml does not seem to be installed")

    with GpuBusy(read=no_nvml, interval=0.01) as busy:
        time.sleep(0.05)
    assert busy.samples == [] and busy.share(0, time.time()) is None and "pynvml" in busy.error


def test_default_workers_none_on_a_cpu_half_the_cores_on_a_gpu(monkeypatch):
    from mmpeft.config.schema import TrainConfig
    from mmpeft.runtime import num_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    auto, fixed = TrainConfig(), TrainConfig(num_workers=3)
    assert auto.num_workers is None
    assert [num_workers(auto, "cpu"), num_workers(auto, "cuda"), num_workers(auto, "cuda", processes=4)] == [0, 8, 2]
    assert num_workers(fixed, "cuda") == num_workers(fixed, "cpu") == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert num_workers(auto, "cuda") == 0  # one core: collate in the main process
