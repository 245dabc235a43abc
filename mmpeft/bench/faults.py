"""``mmpeft bench faults``: kill-and-resume trials.

The recipe is trained once without interruption (the reference). Each trial then trains it
again, killing the run with SIGKILL at random moments (after a random delay, wherever the
run happens to be: loading data, in an epoch, evaluating, testing, writing the bundle) as
often as asked, resuming with ``--resume`` after each kill, and finally letting it finish.
The trial counts as identical when its test metrics (timings aside) and every tensor of its
bundle equal the reference's. One JSON line per trial; a summary with the machine.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..config import load_recipe
from ..errors import MMPeftError
from .common import machine_info, output_folder, write_atomic

TIMING = ("epoch_seconds", "samples_per_second", "data_seconds")


def _command(recipe: str, overrides: list, out: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "mmpeft.cli", "finetune", recipe, *overrides, f"output.dir={out}", "output.plots=false",
            *(["--resume"] if resume else [])]


def _result(bundle: Path) -> tuple[dict, dict]:
    metrics = json.loads((bundle / "metrics.json").read_text())
    for row in metrics["history"]:
        for key in TIMING:
            row.pop(key, None)
    tensors = {f"{f.relative_to(bundle)}:{k}": v for f in sorted(bundle.rglob("*.safetensors")) for k, v in load_file(str(f)).items()}
    return metrics, tensors


def identical(a: Path, b: Path) -> bool:
    (ma, ta), (mb, tb) = _result(a), _result(b)
    return ma == mb and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def run(recipe: str, out: str, trials: int = 5, kills: int = 2, seed: int = 0, overrides=(), checkpoint_every: int = 5) -> dict:
    """Run the reference and ``trials`` kill-and-resume trials; returns the summary."""
    overrides = list(overrides) + [f"train.checkpoint_every={checkpoint_every}"]
    name = load_recipe(recipe, overrides).run_name  # a bad recipe stops here, before any run
    out_path = output_folder(out)
    env = dict(os.environ)
    start = time.perf_counter()
    ref = subprocess.run(_command(recipe, overrides, out_path / "reference", False), capture_output=True, text=True, env=env)
    if ref.returncode != 0:
        raise MMPeftError(f"the reference run failed:\n{ref.stderr[-2000:]}")
    reference_seconds = time.perf_counter() - start
    rng = random.Random(seed)
    rows = []
    for trial in range(trials):
        folder = out_path / f"trial{trial}"
        killed_at = []
        for _ in range(kills):
            delay = rng.uniform(0.05, 1.0) * reference_seconds
            proc = subprocess.Popen(_command(recipe, overrides, folder, True), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True, env=env)
            try:
                proc.wait(timeout=delay)
                killed_at.append(None)  # it finished before the kill came
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed_at.append(round(delay, 1))
        final = subprocess.run(_command(recipe, overrides, folder, True), capture_output=True, text=True, env=env)
        same = final.returncode == 0 and identical(out_path / "reference" / name, folder / name)
        row = {"trial": trial, "killed_after_seconds": killed_at, "final_rc": final.returncode, "identical": same}
        if final.returncode != 0:
            row["error"] = final.stderr[-600:]
        print(json.dumps(row), flush=True)
        rows.append(row)
    summary = {"recipe": recipe, "overrides": overrides, "machine": machine_info(), "reference_seconds": round(reference_seconds, 1),
               "trials": trials, "kills_per_trial": kills, "kills": sum(1 for r in rows for k in r["killed_after_seconds"] if k),
               "identical": sum(r["identical"] for r in rows), "rows": rows}
    write_atomic(out_path / "faults.json", json.dumps(summary, indent=2))
    m = summary["machine"]
    write_atomic(out_path / "faults.md", (
        f"Kill-and-resume trials of `{recipe}` with `{' '.join(overrides)}` on {m['cuda'] or m['processor']} "
        f"({m['cpu_count']} cores, torch {m['torch']}): reference {summary['reference_seconds']} s; {trials} trials, "
        f"{summary['kills']} SIGKILLs at random moments (each followed by `--resume`); "
        f"{summary['identical']} of {trials} ended bit-identical to the reference (test metrics and every tensor).\n"))
    return summary
