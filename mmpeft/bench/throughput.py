"""``mmpeft bench throughput``: what the toolkit costs over a hand-written loop, what each
pipeline feature buys, and how cost grows with data.

1. Reference loop: the recipe's own model (same encoders, PEFT layers, head), optimizer
   and precision, fed with ready-made batches already on the device, in a plain loop
   (:mod:`.reference`): the ceiling for this model on this machine.
2. ``mmpeft finetune`` on real data through the whole pipeline (decoding, preprocessing,
   collation, transfer, the train step, progress and logging): samples/s of its second
   epoch (the first also fills the image caches) and the share of the epoch spent waiting
   for batches.
3. The same with one feature changed at a time (workers, the image cache, the frozen-
   feature cache, eager attention instead of SDPA, gradient checkpointing, torch.compile).
4. Scaling: epoch time per row for 1k / 4k / 16k rows; and a generated manifest of
   1,000,000 rows loaded, checked and trained for one step, with its time and peak memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from ..config import load_recipe
from ..data import recipe_splits
from ..errors import Interrupted, MMPeftError, UsageError
from ..model import build_model
from ..profiling import summary_lines
from ..runtime import make_accelerator
from ..tasks import recipe_task_set
from ..train import finetune
from .device import GpuBusy, base_sized_overrides
from .reference import largest_batch, peak_gpu_mib, reference_loop
from .scoring import scoring_speed
from .common import cpu_ticks, machine_info, output_folder, steal_line, steal_percent, write_atomic


def feature_cache(recipe: str, base: list, work: Path) -> dict:
    """Both encoders frozen (``none``), with and without the frozen-feature cache."""
    frozen = ["encoders.text.peft={method: none}", "encoders.image.peft={method: none}"]
    cached = pipeline(recipe, base + frozen, work, "frozen_cached")
    plain = pipeline(recipe, base + frozen + ["train.cache_frozen_features=false"], work, "frozen_plain")
    return {"cached": cached, "not_cached": plain, "second_epoch_speedup": (
        round(plain["epoch_seconds"][1] / cached["epoch_seconds"][1], 2) if "error" not in cached and "error" not in plain else None)}


def pipeline(recipe_path: str, overrides: list, out: Path, name: str, epochs: int = 2) -> dict:
    """``mmpeft finetune`` for ``epochs`` epochs of the same rows; the last epoch's figures."""
    ov = list(overrides) + [f"train.epochs={epochs}", "data.eval_fraction=0", "data.max_test_samples=256", "output.plots=false",
                            "train.checkpoint_every=null", "train.checkpoint_minutes=null", f"output.dir={out}", f"output.name={name}"]
    start, ticks = time.perf_counter(), cpu_ticks()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        with GpuBusy() if cuda else nullcontext() as busy:
            bundle = finetune(load_recipe(recipe_path, ov), overwrite=True)
    except Interrupted:
        raise  # Ctrl-C or SIGTERM stops the benchmark, not just this configuration
    except (MMPeftError, RuntimeError) as exc:
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    history = json.loads((Path(bundle) / "metrics.json").read_text())["history"]
    first, second = history[0], history[-1]
    return {"samples_per_second": second["samples_per_second"], "first_epoch_samples_per_second": first["samples_per_second"],
            "epoch_seconds": [h["epoch_seconds"] for h in history], "data_share": round(second["data_seconds"] / second["epoch_seconds"], 3),
            "wall_seconds": round(time.perf_counter() - start, 1), "cpu_steal_pct": steal_percent(ticks, cpu_ticks()),
            "gpu_busy": busy.share(second["ended_at"] - second["epoch_seconds"], second["ended_at"]) if cuda else None,
            **({"gpu_busy_error": busy.error} if cuda and busy.error else {}),
            "peak_gpu_mib": peak_gpu_mib()}


def profiled(recipe: str, overrides: list, work: Path) -> dict:
    """A finetune run with ``train.profile_steps`` set: its bundle's profile summary (the
    profiler's own overhead makes its samples/s no figure to compare)."""
    row = pipeline(recipe, overrides, work, "profiled")
    bundle = work / "profiled" / "profile.json"
    if "error" in row or not bundle.is_file():
        return {"error": row.get("error", "the run wrote no profile")}
    return {**json.loads(bundle.read_text()), "data_share": row["data_share"], "gpu_busy": row["gpu_busy"]}


def alternating_runs(recipe: str, base: list, steps: int, work: Path) -> tuple[dict, dict]:
    """The reference loop and the recipe's own ``mmpeft finetune``, twice each in the order
    reference, finetune, finetune, reference, so that the drift of this shared VM's speed
    from one minute to the next (about 20%) reaches both alike; each keeps its faster run,
    as timeit keeps its best, and both runs' figures. (Measured once each, the ratio of two
    runs the same day read 0.87x and 1.02x.)"""
    references, finetunes = [], []
    for which in ("reference", "finetune", "finetune", "reference"):
        if which == "reference":
            references.append(reference_loop(load_recipe(recipe, base), steps))
        else:
            finetunes.append(pipeline(recipe, base, work, f"own{len(finetunes)}"))
    reference = dict(max(references, key=lambda r: r["samples_per_second"]),
                     runs_samples_per_second=[r["samples_per_second"] for r in references])
    measured = [r for r in finetunes if "samples_per_second" in r]
    own = dict(max(measured, key=lambda r: r["samples_per_second"]) if measured else finetunes[0],
               runs_samples_per_second=[r.get("samples_per_second") for r in finetunes])
    return reference, own


def trainable_of(recipe_path: str, overrides: list) -> list[str]:
    recipe = load_recipe(recipe_path, overrides)
    make_accelerator(recipe)
    splits = recipe_splits(recipe)
    model = build_model(recipe, recipe_task_set(recipe, splits.train))
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


TOGGLES = [
    ("1 DataLoader worker", ["train.num_workers=1"]),
    ("2 DataLoader workers", ["train.num_workers=2"]),
    ("no image cache (decode every time)", ["data.image_cache_mb=1"]),
    ("eager attention instead of SDPA", ["encoders.text.attention=eager"]),
    ("gradient checkpointing", ["train.gradient_checkpointing=true"]),
    ("torch.compile", ["train.compile=true"]),
]
# on a GPU the data pipeline competes with the GPU, not with the model's own threads
CUDA_TOGGLES = [  # the default there: half the cores in workers, at most 8
    ("no DataLoader workers (the main process collates)", ["train.num_workers=0"]),
    ("2 DataLoader workers", ["train.num_workers=2"]),
    ("no pinned memory (pageable copies)", ["train.pin_memory=false"]),
] + TOGGLES[2:]


def manifest_rows(out: Path, rows: int, recipe: str) -> Path:
    """A generated manifest of ``rows`` rows over 64 small images, and ``recipe`` reading it."""
    folder = out / f"manifest_{rows}"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(64):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "images" / f"{i}.png")
    answers = ["red", "green", "blue", "yes", "no"]
    with open(folder / "train.jsonl", "w") as handle:
        for i in range(rows):
            handle.write(json.dumps({"image": f"images/{i % 64}.png", "question": f"what color is shape {i % 97} ?",
                                     "answer": answers[i % 5]}) + "\n")
    (folder / "test.jsonl").write_text("".join(json.dumps({"image": f"images/{i}.png", "question": "what color ?",
                                                           "answer": answers[i % 5]}) + "\n" for i in range(64)))
    raw = yaml.safe_load(Path(recipe).read_text())
    raw["data"] = {"source": "manifest", "train": str(folder / "train.jsonl"), "test": str(folder / "test.jsonl")}
    if isinstance(raw.get("task"), dict):
        raw["task"].pop("group_fields", None)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(raw))
    return folder / "recipe.yaml"


def first_step(recipe: Path, out: Path, name: str) -> dict:
    """``mmpeft finetune`` in its own process until its first optimizer step, where it stops
    itself (SIGSTOP): seconds to that step, and that process's own peak resident memory.

    The peak is read from /proc (VmHWM, which starts afresh at exec), not from wait4's
    ru_maxrss: Linux carries ru_maxrss over from the forking parent, so a child of a big
    benchmark process would report the parent's size."""
    env = dict(os.environ, MMPEFT_KILL_AT="train.step#1", MMPEFT_KILL_SIGNAL="STOP")
    cmd = [sys.executable, "-m", "mmpeft.cli", "finetune", str(recipe), "data.max_train_samples=null", "data.eval_fraction=0",
           "output.plots=false", f"output.dir={out}", f"output.name={name}", "--overwrite"]
    log = out / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:  # a file, not a pipe: a full pipe would block the run before its first step
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env)
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
        seconds = time.perf_counter() - start
    if not os.WIFSTOPPED(status):
        proc.returncode = os.waitstatus_to_exitcode(status)
        raise MMPeftError(f"the run {name} did not reach its first step:\n{log.read_text()[-2000:]}")
    status_lines = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
    peak_kib = next(int(line.split()[1]) for line in status_lines if line.startswith("VmHWM:"))
    proc.kill()
    proc.wait()
    return {"seconds_to_first_step": round(seconds, 1), "peak_rss_mib": round(peak_kib / 1024, 1)}


def scaling_runs(recipe: str, overrides: list, work: Path, sizes, rounds: int = 2) -> list[dict]:
    """Epoch time against training rows. This shared VM's speed drifts by ~10% from minute to
    minute, enough to fake a non-linearity when each size runs once at its own minutes: so
    every size runs ``rounds`` times, in alternating order (smallest first, then largest
    first), two epochs each, and a size's figure is its fastest epoch after the first (which
    also fills the image cache) over all its runs: the least noisy estimate, as timeit's."""
    runs = {n: [] for n in sizes}
    for i in range(rounds):
        for n in (sizes if i % 2 == 0 else tuple(reversed(sizes))):
            runs[n].append(pipeline(recipe, overrides + [f"data.max_train_samples={n}"], work, f"rows{n}_{i}", epochs=2))
    found = []
    for n in sizes:
        failed = next((r["error"] for r in runs[n] if "error" in r), None)
        if failed:  # said in the table; the other sizes' figures are kept
            found.append({"rows": n, "error": failed})
            continue
        best = min(s for r in runs[n] for s in r["epoch_seconds"][1:])
        found.append({"rows": n, "epoch_seconds": [r["epoch_seconds"] for r in runs[n]], "best_epoch_seconds": best,
                      "seconds_per_1k_rows": round(1000 * best / n, 2), "cpu_steal_pct_of_runs": [r.get("cpu_steal_pct") for r in runs[n]]})
    return found


def run(recipe: str, out: str, steps: int = 40, overrides=(),
        scaling=(1000, 4000, 16000), rows_test=(10_000, 1_000_000), toggles=None, encoders: str = "recipe",
        memory_budget_gib: float | None = None, features: bool = True, profile_steps: int = 0) -> dict:
    """The whole benchmark. ``encoders``: "recipe" (its own), "base" (BERT-base + ViT-B/16-sized,
    LoRA, 224 px: the GPU configuration) or "small" (those architectures, tiny: a CPU check).
    ``memory_budget_gib`` (CUDA): run at the largest batch whose training steps fit in that
    much GPU memory. ``features`` false: the recipe's own settings only (no toggled rows, no
    feature-cache pair). Empty ``scaling`` / ``rows_test`` skip those parts. ``profile_steps``:
    one more finetune run with that many steps of its second epoch under ``torch.profiler``."""
    cuda = torch.cuda.is_available()
    if memory_budget_gib is not None and not cuda:
        raise UsageError("--memory-budget-gb: the largest batch within a GPU memory budget needs a CUDA GPU; none is visible")
    toggles = [] if not features else toggles if toggles is not None else (CUDA_TOGGLES if cuda else TOGGLES)
    out_path = output_folder(out)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            overrides = list(overrides)
            if encoders != "recipe":
                overrides += base_sized_overrides(work / "bases", small=encoders == "small")
            result = {"recipe": recipe, "encoders": encoders, "machine": machine_info(), "steps": steps}
            partial = out_path / "throughput.partial.json"

            def done(key: str, value) -> None:  # each figure is printed and kept as it comes: a killed run keeps what it measured
                print(json.dumps({key: value}), flush=True)
                write_atomic(partial, json.dumps(result, indent=2))

            if memory_budget_gib is not None:
                result["memory_budget"] = largest_batch(recipe, overrides, memory_budget_gib)
                overrides.append(f"train.batch_size={result['memory_budget']['batch_size']}")
                done("memory_budget", result["memory_budget"])
            base = overrides + [f"data.max_train_samples={steps * load_recipe(recipe, overrides).train.batch_size}"]
            result["overrides"] = [o.replace(str(work), "<tmp>") for o in base]
            reference, own = alternating_runs(recipe, base, steps, work)
            result["reference"] = {k: v for k, v in reference.items() if k != "trainable"}
            result["same_trainable_parameters"] = reference["trainable"] == trainable_of(recipe, base)
            done("reference", result["reference"])
            result["scoring"] = scoring_speed(work / "own1")  # the bundle of the second timed finetune
            done("scoring", result["scoring"])
            if profile_steps:  # right after the timed pair: why finetune is where it is, before the optional rows
                result["profile"] = profiled(recipe, base + [f"train.profile_steps={profile_steps}", f"train.profile_skip={steps}"],
                                             work)
                done("profile", result["profile"])
            result["pipeline"] = []
            for label, extra in [("mmpeft finetune (the recipe's settings)", None)] + list(toggles):
                measured = own if extra is None else pipeline(recipe, base + extra, work, f"t{len(result['pipeline'])}")
                row = {"configuration": label, **measured}
                if "samples_per_second" in row:
                    row["vs_reference"] = round(row["samples_per_second"] / result["reference"]["samples_per_second"], 3)
                    row["achieved_tflops"] = round(row["samples_per_second"] * reference["gflops_per_sample"] / 1e3, 4)
                result["pipeline"].append(row)
                done("pipeline", row)
            result["feature_cache"] = feature_cache(recipe, base, work) if features else None
            done("feature_cache", result["feature_cache"])
            result["scaling"] = scaling_runs(recipe, overrides, work, scaling) if scaling else []
            done("scaling", result["scaling"])
            per_row = [r["seconds_per_1k_rows"] for r in result["scaling"] if "error" not in r]
            result["scaling_spread_pct"] = (round(100 * (max(per_row) - min(per_row)) / (sum(per_row) / len(per_row)), 1)
                                            if len(per_row) > 1 else None)
            result["manifest_rows"] = []
            for n in rows_test:
                r = {"rows": n, **first_step(manifest_rows(work, n, recipe), work / "runs", f"rows{n}")}
                result["manifest_rows"].append(r)
                done("manifest_rows", r)
    finally:
        if memory_budget_gib is not None:  # the cap was this benchmark's, not the process's
            torch.cuda.set_per_process_memory_fraction(1.0, 0)
    write_atomic(out_path / "throughput.json", json.dumps(result, indent=2))
    write_atomic(out_path / "throughput.md", markdown(result))
    partial.unlink(missing_ok=True)
    return result


def _percent(share) -> str:
    return "-" if share is None else f"{100 * share:.0f}%"


def markdown(r: dict) -> str:
    m = r["machine"]
    ref = r["reference"]
    gpu = ref.get("peak_gpu_mib") is not None  # measured on a GPU: its busy share and memory are columns
    lines = [f"`mmpeft bench throughput` on {m['cuda'] or m['processor']} ({m['cpu_count']} cores, torch {m['torch']}, "
             f"{m['torch_threads']} threads); recipe `{r['recipe']}` (encoders: {r.get('encoders', 'recipe')}) with "
             f"`{' '.join(r['overrides'])}`: {r['steps']} steps of the same rows; finetune figures are its second epoch (the "
             f"first also fills the image caches). The reference loop trains the same parameters: {r['same_trainable_parameters']}."
             + (f" The reference loop and the recipe's own finetune ran twice each (reference, finetune, finetune, reference); "
                f"each row is the faster run: reference {' / '.join(map(str, ref['runs_samples_per_second']))}, finetune "
                f"{' / '.join(map(str, r['pipeline'][0]['runs_samples_per_second']))} samples/s."
                if "runs_samples_per_second" in ref else "")]
    if r.get("memory_budget"):
        b = r["memory_budget"]
        tried = ", ".join(f"{p['batch_size']} {'fits' if p['fits'] else 'does not'}" for p in b["probes"])
        lines += ["", f"Batch {b['batch_size']}: the largest multiple of 8 whose training steps fit in {b['budget_gib']} GiB "
                      f"(CUDA allocations capped there for every run below; tried {tried})."]
    extra = " GPU busy | peak GPU MiB |" if gpu else ""
    lines += ["", "| configuration | samples/s | vs reference | waiting for data | 1st epoch samples/s |" + extra,
              "|---|---:|---:|---:|---:|" + ("---:|---:|" if gpu else ""),
              f"| reference loop (ready-made batches, a plain loop) | {ref['samples_per_second']} | 1.000 | - | - |"
              + (f" - | {ref['peak_gpu_mib']} |" if gpu else "")]
    for row in r["pipeline"]:
        if "error" in row:
            lines.append(f"| {row['configuration']} | failed: {row['error']} | | | |" + (" | |" if gpu else ""))
            continue
        busy = f" {_percent(row.get('gpu_busy'))} | {row['peak_gpu_mib']} |" if gpu else ""
        lines.append(f"| {row['configuration']} | {row['samples_per_second']} | {row['vs_reference']:.3f} | "
                     f"{100 * row['data_share']:.1f}% | {row['first_epoch_samples_per_second']} |" + busy)
    if r.get("scoring"):
        sc, train = r["scoring"], r["pipeline"][0].get("samples_per_second")
        lines += ["", f"Scoring (the pass `mmpeft evaluate` makes over the bundle's test rows, model loading excluded, batch "
                      f"{sc['batch_size']}): " + "; ".join(
                          f"{p['pass']} {p['rows_per_second']} rows/s ({p['rows']} rows, {p['opening_images_seconds']} s of it "
                          f"decoding and checking images" + (f", {p['rows_per_second'] / train:.2f}x training's rows/s" if train else "")
                          + ")" for p in sc["passes"]) + ". Cold: every image decoded first, as one `evaluate` does; warm: "
                      "the decoded images and pixels cached, as a training epoch after the first has them."]
    mfu = (f"model FLOPs utilisation {100 * ref['mfu']:.1f}% of the GPU's peak" if ref["mfu"] is not None
           else "model FLOPs utilisation: reported on a listed GPU only (no peak figure for this device)")
    base = r["pipeline"][0]
    lines += ["", f"FLOPs per training sample (forward + backward, counted by `torch.utils.flop_counter`): "
              f"{ref['gflops_per_sample']} GFLOP; the reference loop achieves {ref['achieved_tflops']} TFLOP/s, "
              f"finetune {base.get('achieved_tflops', '-')} TFLOP/s; {mfu}."]
    if gpu:
        lines += ["", "GPU busy: NVML's utilisation (the share of time a kernel ran, as nvidia-smi shows it), sampled every "
                      "0.1 s over the second epoch."]
    if r.get("profile"):
        p = r["profile"]
        lines += ["", "Where a finetune step's time goes (one more run, its second epoch under `torch.profiler`; "
                      f"{_percent(p.get('data_share'))} of that epoch waiting for data):", ""]
        lines += [f"Profile failed: {p['error']}."] if "error" in p else summary_lines(p)
    fc = r["feature_cache"]
    if fc is not None and fc["second_epoch_speedup"] is None:
        lines += ["", f"Frozen encoders: failed ({fc['cached'].get('error') or fc['not_cached'].get('error')})."]
    elif fc is not None:
        lines += ["", f"Frozen encoders (`none` on both), second epoch: {fc['cached']['epoch_seconds'][1]} s with the frozen-feature "
                      f"cache, {fc['not_cached']['epoch_seconds'][1]} s without: {fc['second_epoch_speedup']}x."]
    if r["scaling"]:
        lines += ["", "Epoch time against training rows: every size ran twice, two epochs a run, the sizes in alternating order "
                  "(smallest first, then largest first) so that the machine's drift over the minutes reaches all of them; a size's "
                  "figure is its fastest second epoch.", "",
                  "| train rows | epochs 1 / 2 of each run, s | fastest second epoch, s per 1k rows |", "|---:|---|---:|"]
        for s in r["scaling"]:
            if "error" in s:
                lines.append(f"| {s['rows']:,} | failed: {s['error']} | |")
                continue
            runs = "; ".join(" / ".join(str(x) for x in run) for run in s["epoch_seconds"])
            lines.append(f"| {s['rows']:,} | {runs} | {s['seconds_per_1k_rows']} |")
        lines += ["", f"Spread of the time per row: {r['scaling_spread_pct']}% of its mean." if r["scaling_spread_pct"] is not None
                  else "Spread of the time per row: fewer than two sizes ran."]
    steal = [x.get("cpu_steal_pct") for x in r["pipeline"] + ([fc["cached"], fc["not_cached"]] if fc else [])]
    steal += [v for s in r["scaling"] for v in s.get("cpu_steal_pct_of_runs", [])]
    lines += ["", steal_line(steal)]
    if r["manifest_rows"]:
        lines += ["", "| manifest rows | load, check, build, first step (s) | peak memory MiB |", "|---:|---:|---:|"]
        for s in r["manifest_rows"]:
            lines.append(f"| {s['rows']:,} | {s['seconds_to_first_step']} | {s['peak_rss_mib']} |")
    return "\n".join(lines) + "\n"
