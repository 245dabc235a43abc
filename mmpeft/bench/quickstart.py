"""``mmpeft bench quickstart``: time the quickstart end to end and check its accuracy target."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..train import finetune
from .common import machine_info, output_folder, write_atomic


def run(recipe: str, out: str, overrides=(), target: float = 0.97,
        budget_s: float = 600.0) -> dict:
    out_path = output_folder(out)
    start = time.perf_counter()
    bundle = finetune(recipe, overrides=list(overrides) + ["output.name=quickstart_bench"], overwrite=True)
    wall = time.perf_counter() - start
    metrics = json.loads((Path(bundle) / "metrics.json").read_text())
    result = {
        "recipe": recipe, "overrides": list(overrides), "machine": machine_info(),
        "wall_seconds": round(wall, 1), "test_accuracy": metrics["test"]["accuracy"],
        "test_groups": metrics["test"]["groups"], "epochs_run": len(metrics["history"]),
        "seconds_per_epoch": [r["epoch_seconds"] for r in metrics["history"]],
        "target_accuracy": target, "budget_seconds": budget_s,
        "meets_accuracy": metrics["test"]["accuracy"] >= target, "meets_time": wall <= budget_s,
    }
    write_atomic(out_path / "quickstart.json", json.dumps(result, indent=2))
    return result
