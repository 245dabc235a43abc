"""Runs survive faults: a run killed with SIGKILL at every kind of point and resumed, as
often as it takes, ends with the bundle of the same run uninterrupted, bit for bit; Ctrl-C
and SIGTERM stop at a step with a checkpoint; one writer per output."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mmpeft.cli import app
from tests import tiny
from tests.helpers import bundle_results

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def finetune(recipe: Path, out: Path, *extra, kill_at: str = "", signal_name: str = "") -> subprocess.CompletedProcess:
    """``mmpeft finetune`` in a new process (one that may be killed), with this process's thread
    count so that its numbers are comparable to runs made here."""
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), MMPEFT_KILL_AT=kill_at,
               MMPEFT_KILL_SIGNAL=signal_name or "KILL")
    cmd = [sys.executable, "-m", "mmpeft.cli", "finetune", str(recipe), f"output.dir={out}", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)


def finetune_here(recipe: Path, out: Path, *extra):
    """The same command in this process (cheaper: no new interpreter, no imports)."""
    return runner.invoke(app, ["finetune", str(recipe), f"output.dir={out}", *extra])


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """The recipe most tests kill and resume, and its bundle trained without interruption."""
    base = tmp_path_factory.mktemp("reference")
    recipe = recipe_file(assets, base, "r")
    res = finetune_here(recipe, base / "ref")
    assert res.exit_code == 0, res.output
    return {"recipe": recipe, "bundle": base / "ref" / "tiny"}


def assert_same(a: Path, b: Path) -> None:
    (ma, ta), (mb, tb) = bundle_results(a), bundle_results(b)
    assert ma == mb
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def recipe_file(assets, tmp_path, name: str, **changes) -> Path:
    raw = tiny.recipe_dict(assets["bert"], assets["vit"], assets["data"], tmp_path, text_method="lora",
                           image_method="bitfit", epochs=3, **changes.pop("train", {}))
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def kill_and_resume(recipe: Path, out: Path, points: list[str]) -> int:
    """Kill at each point in turn (each run resuming the last), then resume to the end."""
    every = ["train.checkpoint_every=2", "--resume"]
    for point in points:
        res = finetune(recipe, out, *every, kill_at=point)
        assert res.returncode == -9, (point, res.returncode, res.stderr[-2000:])
    res = finetune_here(recipe, out, *every)
    assert res.exit_code == 0, res.output
    assert not (out / ".checkpoints").exists()  # removed once the bundle is written
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]  # leftovers of killed writes are gone
    return len(points)


def test_killed_anywhere_and_resumed_equals_uninterrupted(reference, tmp_path):
    # 5 batches an epoch, 3 epochs; checkpoints every 2 steps; each kill resumes the run before it
    points = ["data.checked", "train.step#3", "checkpoint.writing#1", "eval#1", "train.step#4", "test", "bundle.writing",
              "bundle.written"]
    kill_and_resume(reference["recipe"], tmp_path / "killed", points)
    assert_same(reference["bundle"], tmp_path / "killed" / "tiny")


def test_resume_with_grouped_batches_feature_cache_augmentation_and_workers(assets, tmp_path):
    """The data order of grouped batches, the frozen-feature cache and augmented views all
    continue exactly; augmented views collated by 2 DataLoader workers (started afresh each
    epoch, so the epoch's seed reaches them) equal the main process's, killed or not."""
    for name, changes in (("cache", {"encoders__image__peft": {"method": "none"}, "data__group_by_image": True}),
                          ("augment", {"data__augment": True}),
                          ("workers", {"data__augment": True, "train": {"num_workers": 2}})):
        recipe = recipe_file(assets, tmp_path, name, **changes)
        res = finetune_here(recipe, tmp_path / f"ref_{name}")
        assert res.exit_code == 0, res.output
        assert ("data loading: 2 DataLoader worker(s) a process" in res.output) == (name == "workers")
        kill_and_resume(recipe, tmp_path / f"killed_{name}", ["train.step#3"])
        assert_same(tmp_path / f"ref_{name}" / "tiny", tmp_path / f"killed_{name}" / "tiny")
    assert_same(tmp_path / "ref_augment" / "tiny", tmp_path / "ref_workers" / "tiny")


def test_resume_of_a_method_that_moves_the_base(assets, tmp_path):
    """PiSSA rewrites the base weights at init: a resumed run rebuilds that residual from the
    pristine base and continues exactly."""
    recipe = recipe_file(assets, tmp_path, "pissa", encoders__text__peft={"method": "lora", "init": "pissa", "rank": 4})
    res = finetune_here(recipe, tmp_path / "ref_pissa")
    assert res.exit_code == 0, res.output
    kill_and_resume(recipe, tmp_path / "killed_pissa", ["train.step#3"])
    assert_same(tmp_path / "ref_pissa" / "tiny", tmp_path / "killed_pissa" / "tiny")


@pytest.mark.parametrize("signal_name,code", [("INT", 130), ("TERM", 143)])
def test_signal_stops_at_a_step_with_a_checkpoint(reference, tmp_path, signal_name, code):
    recipe, out = reference["recipe"], tmp_path / "out"
    res = finetune(recipe, out, kill_at="train.step#3", signal_name=signal_name)
    assert res.returncode == code, res.stderr[-2000:]
    assert f"stopped by SIG{signal_name}" in res.stderr and "Traceback" not in res.stderr
    # the command that resumes this very run, not a placeholder
    assert f"Resume with: mmpeft finetune {recipe} output.dir={out} --resume" in " ".join(res.stderr.split())
    checkpoints = sorted((out / ".checkpoints" / "tiny").glob("ckpt-*"))
    assert [c.name for c in checkpoints] == ["ckpt-e0001-b000003-s00000003"]
    if signal_name == "TERM":
        return
    shutil.copytree(out / ".checkpoints" / "tiny", tmp_path / "saved")  # an interrupted run's checkpoints, for later
    # without --resume the interrupted run is not silently started again
    res = finetune_here(recipe, out)
    assert res.exit_code == 2 and "pass --resume to continue it" in res.output
    assert finetune_here(recipe, out, "--resume").exit_code == 0
    assert_same(reference["bundle"], out / "tiny")
    res = finetune_here(recipe, out, "--resume")  # complete: nothing to do
    assert res.exit_code == 0 and "nothing to resume" in res.output and "Interrupted runs" not in res.output
    shutil.copytree(tmp_path / "saved", out / ".checkpoints" / "other")  # another run's checkpoints beside it are named
    res = finetune_here(recipe, out, "--resume")
    assert res.exit_code == 0 and "Interrupted runs beside it: other" in " ".join(res.output.split()), res.output


def test_checkpoint_of_other_settings_or_a_damaged_one(reference, tmp_path):
    recipe, out = reference["recipe"], tmp_path / "out"
    assert finetune(recipe, out, "train.checkpoint_every=2", kill_at="train.step#5").returncode == -9
    folder = out / ".checkpoints" / "tiny"
    assert [c.name for c in sorted(folder.glob("ckpt-*"))] == ["ckpt-e0001-b000002-s00000002", "ckpt-e0001-b000004-s00000004"]
    res = finetune_here(recipe, out, "train.lr=0.001", "--resume")
    assert res.exit_code == 2 and "train.lr: 0.005 in the checkpoint, 0.001 now" in res.output
    # a damaged newest checkpoint (its checkpoint.json cut short) falls back to the one before and
    # says so; when training reaches that step again, the damaged folder of ours is replaced
    newest = sorted(folder.glob("ckpt-*"))[-1]
    (newest / "checkpoint.json").write_text('{"format": "mmpeft-checkp')
    res = finetune_here(recipe, out, "train.checkpoint_every=2", "--resume")
    assert res.exit_code == 0, res.output
    assert "ckpt-e0001-b000004-s00000004 is damaged" in res.output
    assert "resuming from" in res.output and "ckpt-e0001-b000002-s00000002" in res.output
    assert_same(reference["bundle"], out / "tiny")


def test_one_writer_per_output(assets, tmp_path):
    from mmpeft.files import output_lock

    recipe = recipe_file(assets, tmp_path, "r")  # writes to tmp_path/tiny
    lock = tmp_path / ".tiny.lock"
    with output_lock(lock, "x"):
        res = runner.invoke(app, ["finetune", str(recipe)])
        assert res.exit_code == 1 and "is being written by another run (pid" in res.output and "(running)" in res.output
    lock.write_text(json.dumps({"pid": 2**22 + 17, "host": "h", "started": "then", "command": "mmpeft finetune"}))
    with output_lock(lock, "x") as note:  # the recorded process is gone: taken over, and said so
        assert note and "no longer running" in note
    assert not lock.exists()  # a finished holder leaves no lock file behind
    res = runner.invoke(app, ["finetune", str(recipe), "train.epochs=1"])
    assert res.exit_code == 0 and not lock.exists() and not list(tmp_path.glob(".*.lock")), res.output


def test_signal_handler_outside_the_main_thread_is_inert():
    import threading

    from mmpeft.interrupt import stop_on_signals

    seen = []

    def body():
        with stop_on_signals() as stop:
            seen.append(bool(stop))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [False]
