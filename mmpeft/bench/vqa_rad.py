"""``mmpeft bench vqa-rad``: the medical recipe with each method on both encoders, over seeds.

Each run is a separate ``mmpeft finetune`` process, which reports its own peak memory
(process peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on GPU). Results are appended to ``vqa_rad.json`` after every run, so an interrupted
benchmark resumes where it stopped. Prints and writes (JSON + Markdown) mean +- std of
open / closed / overall test accuracy, trainable parameters, peak memory and wall
time per epoch, with the settings beside the table.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ..config import load_recipe
from ..errors import MMPeftError, UsageError
from ..methods import METHODS
from ..model import method_refusal
from .common import (benchmark_methods, bundle_folder, choose, cpu_ticks, machine_info, output_folder, previous_results,
                     recipe_fingerprint, resolved_settings, side_by_side, steal_line, steal_percent, threads_per_run, write_atomic)


def configurations() -> dict[str, str]:
    """Configuration name -> the method both encoders get: every registered method, the
    ones that train nothing in the encoders named "head only". Each method trains at its
    own ``default_lr`` (full fine-tuning needs a much smaller one)."""
    return {("head only" if not METHODS.get(m).trains_encoder else m): m for m in benchmark_methods()}


PUBLISHED = [("MEVF-BAN", 43.9, 75.1, 62.6), ("MMBERT", 63.1, 77.9, 72.0), ("PubMedCLIP", 60.1, 80.0, 72.1), ("M3AE", 67.2, 83.5, 77.0)]


def run(recipe: str, out: str, configs=None, seeds=(0, 1, 2),
        overrides=(), work_dir: str | None = None, jobs: int = 1) -> dict:
    """Run (or resume) the benchmark; see the module docstring.

    Bundles go to ``work_dir``: by default ``benchmarks/runs/vqa_rad`` for the default
    ``out`` and ``<out>/runs`` for any other, so a second benchmark (other overrides,
    another ``--out``) never overwrites the first one's bundles. ``jobs`` runs train at
    a time (on a GPU one small run leaves it mostly idle); each then gets the CPU cores
    divided among the jobs, and its timings are those of a shared machine.
    """
    work_dir = work_dir or bundle_folder(out, "benchmarks/runs/vqa_rad")
    if jobs < 1:
        raise UsageError("--jobs: must be at least 1")
    # bad input stops here, before anything is written or trained
    base = list(overrides)
    table = configurations()
    chosen = choose(configs, list(table), "--configs")
    loaded = load_recipe(recipe, base)
    out_path = output_folder(out)
    cache = out_path / "vqa_rad.json"
    fingerprint = recipe_fingerprint(loaded)
    prev = previous_results(cache, recipe, base, fingerprint)
    runs: list[dict] = prev["runs"] if prev else []
    done = {(r["config"], r["seed"]) for r in runs}
    recipe_methods = {n: e.peft["method"] for n, e in loaded.encoders.items()}
    refused = refusals(recipe, base, recipe_methods, {c: table[c] for c in chosen})
    # seed-major, so a benchmark stopped part-way still has every configuration at the seeds it reached
    jobs_todo = [(c, s) for s in seeds for c in chosen if (c, s) not in done and c not in refused]
    env = dict(os.environ)
    if jobs > 1:  # share the cores among the runs instead of oversubscribing them
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads_per_run(jobs))
    header = {"recipe": recipe, "overrides": base, "recipe_sha256": fingerprint, "recipe_resolved": resolved_settings(loaded),
              "machine": machine_info()}

    def record(job, row):
        runs.append(dict(row, jobs=jobs))
        write_atomic(cache, json.dumps({**header, "runs": runs}, indent=2))

    # a failed run stops the benchmark: the runs in flight finish and are kept, no new ones start
    side_by_side(jobs_todo, jobs, lambda job: _train(recipe, base, recipe_methods, table[job[0]], *job, work_dir, env), record,
                 "vqa-rad runs")
    result = {**header, "settings": settings(loaded), "runs": runs, "summary": summarize(runs),
              "refused": {**(prev or {}).get("refused", {}), **refused}}
    write_atomic(cache, json.dumps(result, indent=2))
    write_atomic(out_path / "vqa_rad.md", markdown(result))
    return result


def method_overrides(base: list, recipe_methods: dict, method: str) -> list[str]:
    """``base`` plus ``method`` on every encoder (the recipe's own settings kept where its
    method is the one benchmarked)."""
    return list(base) + [f"encoders.{side}.peft={{method: {method}}}" for side in ("text", "image")
                         if side in recipe_methods and recipe_methods[side] != method]


def refusals(recipe: str, base: list, recipe_methods: dict, configs: dict) -> dict[str, str]:
    """Configuration -> why its method cannot adapt one of the encoders (VeRA on a CNN, say):
    recorded beside the table instead of stopping the benchmark."""
    found = {}
    for config, method in configs.items():
        loaded = load_recipe(recipe, method_overrides(base, recipe_methods, method))
        for side in loaded.encoders:
            reason = method_refusal(loaded, side)
            if reason:
                found[config] = f"{side}: {reason}"
                break
    return found


def _train(recipe: str, base: list, recipe_methods: dict, method: str, config: str, seed: int, work_dir: str, env: dict) -> dict:
    """One benchmark run (``method`` on both encoders) as its own ``mmpeft finetune`` process;
    returns its result row."""
    name = f"{config.replace(' ', '_')}_s{seed}"
    ov = method_overrides(base, recipe_methods, method)
    ov += [f"train.seed={seed}", f"train.lr={METHODS.get(method).default_lr}", f"output.dir={work_dir}", f"output.name={name}"]
    start, ticks = time.perf_counter(), cpu_ticks()
    # --resume: a run the benchmark was interrupted in continues from its last checkpoint
    proc = subprocess.Popen([sys.executable, "-m", "mmpeft.cli", "finetune", recipe, *ov, "--overwrite", "--resume"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log, _ = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise MMPeftError(f"run {name} failed (the runs before it are kept in the results file; the same command "
                          f"resumes):\n{log[-3000:]}")
    bundle = Path(work_dir) / name
    metrics = json.loads((bundle / "metrics.json").read_text())
    manifest = json.loads((bundle / "manifest.json").read_text())
    groups = metrics["test"]["groups"]["answer_type"]
    trainable = sum(e["trainable_parameters"] for e in manifest["encoders"].values()) + manifest["head"]["parameters"]
    total = sum(e["total_parameters"] for e in manifest["encoders"].values()) + manifest["head"]["parameters"]
    return {
        "config": config, "seed": seed, "open": groups["OPEN"]["accuracy"], "closed": groups["CLOSED"]["accuracy"],
        "overall": metrics["test"]["accuracy"], "trainable": trainable, "total": total,
        "peak_rss_mib": _peak_rss_mib(log), "epoch_seconds": statistics.mean(h["epoch_seconds"] for h in metrics["history"]),
        "epochs": len(metrics["history"]), "best_epoch": metrics["best_epoch"], "wall_seconds": wall,
        "cpu_steal_pct": steal_percent(ticks, cpu_ticks()),
        "question_type": {k: v["accuracy"] for k, v in metrics["test"]["groups"].get("question_type", {}).items()},
    }


def settings(r) -> str:
    """The training settings every run shares (from the loaded recipe), printed beside the table."""
    img = r.encoders.get("image")
    txt = r.encoders.get("text")
    t = r.train
    lrs = ", ".join(f"{m} {METHODS.get(m).default_lr:g}" for m in benchmark_methods())
    extra = "".join(f", {k} {v}" for k, v in r.fusion.items() if k not in ("type", "hidden_size", "dropout"))
    return (f"text {txt.model if txt else '-'} (max {txt.max_length if txt else '-'} tokens), image "
            f"{img.model if img else '-'} at {img.image_size if img else '-'} px; {r.fusion.get('type')} head (hidden "
            f"{r.fusion.get('hidden_size', 'default')}{extra}); {t.epochs} epochs ({_selection(r)}), batch {t.batch_size}, AdamW, encoder lr per method "
            f"({lrs}), head lr {t.head_lr:g}, label smoothing {t.label_smoothing:g}")


def _selection(r) -> str:
    """How each run's checkpoint is chosen, in words."""
    if not r.data.eval_fraction and not r.data.eval:
        return "no validation split: the last epoch"
    held = f"the {r.data.eval_fraction:.0%} validation split" if not r.data.eval else "the validation file"
    stop = f"early stopping patience {r.train.early_stopping_patience}" if r.train.early_stopping_patience else "no early stopping"
    return f"best checkpoint on {held}, {stop}"


def _peak_rss_mib(log: str) -> float | None:
    for line in reversed(log.splitlines()):
        if line.startswith("peak memory:"):
            return float(line.split()[2])
    return None


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    known = list(configurations())
    # table order, whatever order runs ended in (configurations no longer registered go last)
    order = [c for c in known if any(r["config"] == c for r in runs)]
    order += sorted({r["config"] for r in runs} - set(known))
    for config in order:
        rs = [r for r in runs if r["config"] == config]

        def ms(key):
            vals = [100 * r[key] for r in rs]
            return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

        rows.append({
            "config": config, "seeds": len(rs), "open": ms("open"), "closed": ms("closed"), "overall": ms("overall"),
            "trainable": rs[0]["trainable"], "trainable_pct": 100 * rs[0]["trainable"] / rs[0]["total"],
            "peak_mib": max((r["peak_rss_mib"] or 0) for r in rs), "epoch_seconds": statistics.mean(r["epoch_seconds"] for r in rs),
        })
    return rows


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"Recipe `{result['recipe']}`, overrides `{' '.join(result['overrides']) or '(none)'}`; "
             f"{m['cuda'] or m['processor']}, {m['cpu_count']} CPU cores, torch {m['torch']} ({m.get('torch_threads', '?')} threads)"
             f"{_sharing(result.get('runs', []))}. Test split: 451 questions (179 open, 272 closed); mean ± std over seeds.", ""]
    if result.get("settings"):
        lines += [f"Settings: {result['settings']}.", ""]
    lines += [
             "| configuration | seeds | open | closed | overall | trainable params | % of total | peak memory MiB | s / epoch |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["summary"]:
        f = lambda v: f"{v[0]:.1f} ± {v[1]:.1f}"  # noqa: E731
        lines.append(f"| {r['config']} | {r['seeds']} | {f(r['open'])} | {f(r['closed'])} | {f(r['overall'])} | "
                     f"{r['trainable']:,} | {r['trainable_pct']:.2f} | {r['peak_mib']:.0f} | {r['epoch_seconds']:.1f} |")
    for config, reason in result.get("refused", {}).items():
        lines.append(f"| {config} | refused: {_cell(reason)} | | | | | | | |")
    for name, o, c, a in PUBLISHED:
        lines.append(f"| {name} (published) | | {o} | {c} | {a} | | | | |")
    check = goals(result["summary"])
    steal = steal_line([r.get("cpu_steal_pct") for r in result.get("runs", [])])
    return "\n".join(lines + ([""] + [check] if check else []) + ([""] + [steal] if steal else [])) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def _sharing(runs: list[dict]) -> str:
    jobs = max((r.get("jobs", 1) for r in runs), default=1)
    return f"; up to {jobs} runs at a time (timings per run, on a shared machine)" if jobs > 1 else ""


def goals(summary: list[dict]) -> str:
    """The issue's goals checked against the best PEFT configuration (by mean overall accuracy),
    and against full fine-tuning (the configuration whose method trains the base weights)."""
    methods = {c: METHODS.get(m) for c, m in configurations().items()}
    peft = [r for r in summary if r["config"] in methods and methods[r["config"]].trains_encoder
            and methods[r["config"]].keeps_base_frozen]
    if not peft:
        return ""
    best = max(peft, key=lambda r: r["overall"][0])
    full = next((r for r in summary if r["config"] in methods and not methods[r["config"]].keeps_base_frozen), None)
    mark = lambda ok: "met" if ok else "missed"  # noqa: E731
    parts = [f"overall >= 72: {best['overall'][0]:.1f} ({mark(best['overall'][0] >= 72)})",
             f"closed >= 80: {best['closed'][0]:.1f} ({mark(best['closed'][0] >= 80)})",
             f"trainable <= 2%: {best['trainable_pct']:.2f}% ({mark(best['trainable_pct'] <= 2)})"]
    if full:
        gap = full["overall"][0] - best["overall"][0]
        parts.append(f"within 1 point of full fine-tuning ({full['overall'][0]:.1f}): {gap:+.1f} ({mark(gap <= 1)})")
    else:
        parts.append("within 1 point of full fine-tuning: full not run yet")
    return f"Goals, best PEFT configuration `{best['config']}` ({best['seeds']} seed(s)): " + "; ".join(parts) + "."
