"""``mmpeft bench video``: does the temporal component see order? On the generated
moving-shapes clips, the same image encoder and method read one middle frame, the mean of
8 frames, and 8 frames through the temporal transformer (and, optionally, tdconv), per
seed; each run is ``mmpeft finetune`` of the recipe with those overrides, its checkpoint
chosen on the generated validation clips, its test split scored once. Accuracy is reported
per question type: direction needs the frames' order, colour and shape do not. Decoding
speed (frames/s, the clips of the test split) and training speed are measured beside them.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from ..config import load_recipe
from ..data import recipe_splits
from ..data.video import read_video
from ..errors import UsageError
from ..train import finetune
from .common import (bundle_folder, machine_info, output_folder, previous_results, recipe_fingerprint, resolved_settings,
                     write_atomic)

# what each configuration changes in the recipe's video encoder
CONFIGS = {
    "middle frame": ["encoders.video.video.frames=1", "encoders.video.video.temporal=mean", "encoders.video.video.width=null"],
    "mean of 8 frames": ["encoders.video.video.frames=8", "encoders.video.video.temporal=mean", "encoders.video.video.width=null"],
    "temporal transformer": ["encoders.video.video.frames=8", "encoders.video.video.temporal=transformer"],
    "tdconv": ["encoders.video.video.frames=8", "encoders.video.video.temporal=tdconv"],
}
TYPES = ("direction", "color", "shape")


def decoding_speed(recipe, clips: int = 100) -> dict:
    """Frames per second of decoding ``clips`` test clips as the recipe's video encoder samples them."""
    video = recipe.encoders["video"].video
    paths = list(dict.fromkeys(r.video for r in recipe_splits(recipe).test))[:clips]
    start, frames = time.perf_counter(), 0
    for path in paths:
        frames += len(read_video(path, video.frames, video.max_seconds, video.fps)[0])
    seconds = time.perf_counter() - start
    return {"clips": len(paths), "frames": frames, "seconds": round(seconds, 2), "frames_per_s": round(frames / seconds, 1)}


def run(recipe_path: str, out: str, seeds=(0, 1, 2), configs=("middle frame", "mean of 8 frames", "temporal transformer"),
        overrides=()) -> dict:
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise UsageError(f"--configs: {', '.join(map(repr, unknown))} unknown (known: {', '.join(CONFIGS)})")
    recipe = load_recipe(recipe_path, list(overrides))
    if "video" not in recipe.encoders or recipe.encoders["video"].modality != "video":
        raise UsageError(f"{recipe_path}: needs a video encoder named 'video' (recipes/moving_shapes_video.yaml)")
    folder = output_folder(out)
    cache = folder / "video.json"
    fingerprint = recipe_fingerprint(recipe)  # resumes only into runs of the same settings
    result = previous_results(cache, recipe_path, list(overrides), fingerprint) or {}
    result.update({"recipe": recipe_path, "overrides": list(overrides), "recipe_sha256": fingerprint,
                   "recipe_resolved": resolved_settings(recipe), "machine": machine_info(),
                   "decoding": decoding_speed(recipe)})
    runs = result.setdefault("runs", [])
    runs_dir = bundle_folder(out, "benchmarks/results/video_runs")
    for config in configs:
        for seed in seeds:
            if any(r["config"] == config and r["seed"] == seed for r in runs):
                continue  # kept from an interrupted run: each configuration's test split is scored once
            name = f"{config.replace(' ', '_')}_seed{seed}"
            start = time.perf_counter()
            bundle = finetune(recipe_path, list(overrides) + CONFIGS[config] + [
                f"train.seed={seed}", f"output.dir={runs_dir}", f"output.name={name}"], overwrite=True)
            seconds = time.perf_counter() - start
            stored = json.loads((Path(bundle) / "metrics.json").read_text())
            test = stored["test"]
            groups = test.get("groups", {}).get("question_type", {})
            history = stored.get("history", [])
            runs.append({"config": config, "seed": seed, "accuracy": test["accuracy"],
                         **{t: groups.get(t, {}).get("accuracy") for t in TYPES},
                         "best_epoch": stored.get("best_epoch"), "epochs": len(history), "seconds": round(seconds, 1),
                         "train_rows_per_s": round(statistics.median(h.get("samples_per_second", 0) for h in history), 1)
                         if history and "samples_per_second" in history[0] else None, "bundle": str(bundle)})
            write_atomic(cache, json.dumps(result, indent=2))
            write_atomic(folder / "video.md", markdown(result))
    write_atomic(cache, json.dumps(result, indent=2))
    write_atomic(folder / "video.md", markdown(result))
    return result


def _cell(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = 100 * statistics.mean(values)
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def markdown(result: dict) -> str:
    m, d = result["machine"], result["decoding"]
    lines = [f"Machine: {m['processor']} ({m['cpu_count']} cores), torch {m['torch']}, {m['torch_threads']} threads. "
             f"Recipe `{result['recipe']}` {' '.join(result['overrides'])}; each row: mean ± std over the seeds listed, "
             "test split scored once per run, checkpoint chosen on the generated validation clips. Chance: 25% on "
             "direction (4), 25% on colour (4), 33% on shape (3).", "",
             f"Decoding: {d['frames_per_s']} frames/s ({d['frames']} frames of {d['clips']} test clips in {d['seconds']} s, "
             "PyAV, one process).", "",
             "| frames read as | seeds | all | direction | colour | shape | train rows/s | s per run |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for config in dict.fromkeys(r["config"] for r in result["runs"]):
        rows = [r for r in result["runs"] if r["config"] == config]
        speed = [r["train_rows_per_s"] for r in rows if r["train_rows_per_s"]]
        lines.append(f"| {config} | {','.join(str(r['seed']) for r in rows)} | {_cell([r['accuracy'] for r in rows])} | "
                     f"{_cell([r['direction'] for r in rows])} | {_cell([r['color'] for r in rows])} | "
                     f"{_cell([r['shape'] for r in rows])} | {statistics.median(speed) if speed else '-'} | "
                     f"{statistics.mean(r['seconds'] for r in rows):.0f} |")
    return "\n".join(lines) + "\n"
