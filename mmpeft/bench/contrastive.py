"""``mmpeft bench contrastive``: a contrastive recipe trained against its own untrained
floor, side by side: the same encoders with the same (random, seeded) projections scored
before any step, then ``mmpeft finetune`` of the recipe. Both are scored once on the test
split; the checkpoint is chosen on the validation rows held out of the training split.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..config import TASK_SETTINGS, load_recipe
from ..data import recipe_splits
from ..data.batching import Collator, ImageStore, make_loader
from ..errors import UsageError
from ..model import build_model
from ..runtime import fresh_accelerator
from ..scoring import predict_logits, prepare_tasks, score
from ..tasks import recipe_task_set
from ..train import finetune
from .common import machine_info, output_folder, write_atomic

COLUMNS = ("recall@1", "recall@5", "recall@10", "median_rank", "zero_shot_accuracy")


def floor(recipe) -> dict[str, dict]:
    """Test metrics of the recipe's model before training (projections as initialised)."""
    splits = recipe_splits(recipe)
    tasks = recipe_task_set(recipe, splits.train)
    model = build_model(recipe, tasks)
    store = ImageStore.for_encoders(model.encoders.values(), recipe.data.image_cache_mb)
    loader = make_loader(splits.test, Collator(splits.test, dict(model.encoders.items()), tasks, store),
                         recipe.train.eval_batch_size, False, 0)
    accelerator = fresh_accelerator(cpu=True)
    prepare_tasks(model, tasks, torch.device("cpu"))
    outputs, index = predict_logits(model, loader, accelerator, desc="floor")
    return score(outputs, index, splits.test, tasks, {})


def run(recipe_path: str, out: str, overrides=()) -> dict:
    recipe = load_recipe(recipe_path, list(overrides))
    kinds = {n: b["type"] for n, b in (recipe.tasks or {"answer": recipe.task}).items()}
    aligning = {n for n, kind in kinds.items() if TASK_SETTINGS.get(kind).aligns_inputs}
    if not aligning:
        raise UsageError(f"{recipe_path}: has no contrastive task (its tasks: {kinds})")
    folder = output_folder(out)
    start = time.perf_counter()
    before = floor(recipe)
    floor_seconds = time.perf_counter() - start
    start = time.perf_counter()
    bundle = finetune(recipe_path, list(overrides) + ["output.name=contrastive_bench"], overwrite=True)
    train_seconds = time.perf_counter() - start
    stored = json.loads((Path(bundle) / "metrics.json").read_text())
    after = stored["tasks"]
    rows = []
    for name in kinds:
        if name in aligning:
            rows.append({"task": name, "model": "untrained projections (floor)", **{k: before[name].get(k) for k in COLUMNS}})
            rows.append({"task": name, "model": "trained (mmpeft finetune)", **{k: after[name].get(k) for k in COLUMNS}})
    result = {"recipe": recipe_path, "overrides": list(overrides), "machine": machine_info(), "rows": rows,
              "test_rows": after[next(iter(after))]["count"], "floor_seconds": round(floor_seconds, 1),
              "train_seconds": round(train_seconds, 1), "epochs": len(stored["history"]), "best_epoch": stored["best_epoch"],
              "history": stored["history"], "bundle": str(bundle), "directions": {n: {k: v for k, v in after[n].items() if "_to_" in k}
                                                                                    for n in after if n in aligning}}
    write_atomic(folder / "contrastive.json", json.dumps(result, indent=2))
    write_atomic(folder / "contrastive.md", markdown(result))
    return result


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"Machine: {m['processor']} ({m['cpu_count']} cores), torch {m['torch']}, {m['torch_threads']} threads. "
             f"Recipe `{result['recipe']}` {' '.join(result['overrides'])}; {result['test_rows']} test rows, scored once per "
             f"row of the table; checkpoint chosen on validation rows held out of the training split (best epoch "
             f"{result['best_epoch']} of {result['epochs']}); training {result['train_seconds']:.0f} s.", "",
             "| task | model | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * len(COLUMNS)]
    for row in result["rows"]:
        cells = [("-" if row[k] is None else f"{row[k]:.1f}" if k == "median_rank" else f"{100 * row[k]:.1f}") for k in COLUMNS]
        lines.append(f"| {row['task']} | {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
