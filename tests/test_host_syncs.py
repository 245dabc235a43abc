"""The training step reads nothing back from the device: on a GPU every ``loss.item()`` or
``bool(tensor)`` waits for the step's kernels, so the host cannot queue the next step's
meanwhile. Counted here on CPU (the same Python calls would sync a GPU)."""

import json
import random
import sys
from pathlib import Path

import torch
import yaml

from mmpeft.checkpoint import LoopState, RunningLoss
from mmpeft.train import finetune
from tests import tiny

PACKAGE = str(Path(__file__).resolve().parents[1] / "mmpeft")
READS = ("item", "__bool__", "__float__", "__int__", "tolist")  # each copies a value to the host


def test_running_loss_on_the_device_is_bit_identical_to_averaging_python_floats():
    rng = random.Random(0)
    losses = [torch.tensor(rng.uniform(0.1, 3.0), dtype=torch.float32) for _ in range(30)]
    task_losses = [{"a": torch.tensor(rng.uniform(0, 2)), "b": torch.tensor(rng.uniform(0, 2))} for _ in losses]
    counts = [{"a": 4, "b": 0 if i % 3 else 4} for i in range(len(losses))]
    running, tasks = 0.0, {}
    for step, (loss, each, count) in enumerate(zip(losses, task_losses, counts), 1):  # the loop as it was, on floats
        running = 0.9 * running + 0.1 * loss.item() if step > 1 else loss.item()
        for name, value in each.items():
            if count[name]:
                tasks[name] = 0.9 * tasks.get(name, value.item()) + 0.1 * value.item()
    loop = LoopState()
    averages = RunningLoss(loop)
    for i, (loss, each, count) in enumerate(zip(losses, task_losses, counts)):
        loop.step += 1
        averages.update(loss, each, count)
        if i == 11:  # a resumed run starts a new RunningLoss from the saved floats
            averages.sync()
            averages = RunningLoss(loop)
    averages.sync()
    assert loop.running == running and loop.task_running == tasks


def _count_reads(monkeypatch) -> list:
    """Patch the tensor methods that read a value to the host; record the mmpeft line that
    called each (the data pipeline excepted: its tensors are built on the host)."""
    calls = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            frame = sys._getframe(1)
            where = frame.f_code.co_filename
            if where.startswith(PACKAGE) and "/data/" not in where:
                calls.append(f"{Path(where).name}:{frame.f_lineno} {_name}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def test_training_steps_read_nothing_back_from_the_device(assets, tmp_path, monkeypatch):
    """Two runs that differ only in steps an epoch (2 vs 6, the same test rows) make the same
    host reads: none is made per step (log_every is larger than the run)."""
    reads = {}
    for rows in (8, 24):
        raw = tiny.recipe_dict(assets["bert"], assets["effnet"], assets["data"], tmp_path / str(rows), epochs=2, batch_size=4, log_every=1000)
        raw["encoders"]["image"]["image_size"] = 32
        raw["data"].update({"eval_fraction": 0, "max_train_samples": rows})
        path = tmp_path / f"r{rows}.yaml"
        path.write_text(yaml.safe_dump(raw))
        with monkeypatch.context() as patch:
            calls = _count_reads(patch)
            bundle = finetune(str(path))
        reads[rows] = sorted(calls)
        assert len(json.loads((Path(bundle) / "metrics.json").read_text())["history"]) == 2
    assert len(reads[8]) == len(reads[24]), "\n".join(sorted(set(reads[24]) - set(reads[8])) or reads[24])
    # the running loss reaches the host at the first step's log line and at each epoch's end
    assert sum(1 for c in reads[24] if c.endswith(" item")) == 3


def test_how_often_the_loop_logs_changes_no_number(assets, tmp_path):
    losses = []
    for every in (1, 1000):
        raw = tiny.recipe_dict(assets["bert"], assets["effnet"], assets["data"], tmp_path / str(every), epochs=2, batch_size=4, log_every=every)
        raw["encoders"]["image"]["image_size"] = 32
        raw["data"].update({"eval_fraction": 0, "max_train_samples": 16})
        path = tmp_path / f"r{every}.yaml"
        path.write_text(yaml.safe_dump(raw))
        history = json.loads((Path(finetune(str(path))) / "metrics.json").read_text())["history"]
        losses.append([h["train_loss"] for h in history])
    assert losses[0] == losses[1]
