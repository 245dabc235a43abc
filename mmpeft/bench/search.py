"""``mmpeft bench search``: many named recipe variants x seeds, several runs at a time.

A search file names a recipe, overrides shared by every variant, the seeds, and the
variants (each a list of overrides; later overrides win)::

    recipe: recipes/medical_vqa.yaml
    base: ["train.epochs=25"]
    seeds: [0, 1, 2]
    configs:
      lr_1e-3: {overrides: [train.lr=0.001]}
      lr_2e-3: {overrides: [train.lr=0.002], seeds: [0, 1, 2, 3, 4]}
      recipe_as_is: {base: false}

Every run is its own ``mmpeft finetune`` process, ``--jobs`` of them at a time (a GPU
sits mostly idle under one small run, whose speed is bound by one CPU core's Python).
One JSON line per finished run goes to ``<out>/results.jsonl`` (so an interrupted search
resumes: runs already there are skipped), and ``<out>/summary.md`` gets mean +- std per
variant. ``<out>/settings.json`` keeps each variant's resolved settings: a variant whose
settings changed since (its overrides, or the recipe file) is refused rather than mixed
with its old runs. Choosing a variant by its *test* accuracy is selection on the test split: the
summary prints validation accuracy beside it for that reason.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ..config import load_recipe, recipe_tasks
from ..errors import MMPeftError, UsageError
from .common import (machine_info, output_folder, recipe_fingerprint, resolved_settings, side_by_side, stored_fingerprint,
                     threads_per_run, write_atomic)

SEARCH_KEYS = {"recipe", "base", "seeds", "configs"}
RATES = ("accuracy", "recall", "f1", "auroc", "precision")  # metric names that are shares, shown in %
CONFIG_KEYS = {"overrides", "seeds", "base"}


def load_search(path: str) -> dict:
    """Read and check a search file; every problem names the file and the key."""
    where = Path(path)
    if not where.is_file():
        raise UsageError(f"{path}: search file not found")
    try:
        raw = yaml.safe_load(where.read_text())
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML ({exc})") from None
    problems = []
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: expected a mapping with keys {', '.join(sorted(SEARCH_KEYS))}")
    problems += [f"{k}: unknown key (allowed: {', '.join(sorted(SEARCH_KEYS))})" for k in raw if k not in SEARCH_KEYS]
    if not isinstance(raw.get("recipe"), str):
        problems.append("recipe: required, the path of a recipe file")
    base = raw.get("base", [])
    if not _strings(base):
        problems.append("base: expected a list of key.path=value overrides")
    seeds = raw.get("seeds", [0])
    if not _ints(seeds):
        problems.append("seeds: expected a list of integers")
    configs = raw.get("configs")
    if not isinstance(configs, dict) or not configs:
        problems.append("configs: required, a mapping of variant name -> {overrides: [...]}")
        configs = {}
    variants = {}
    for name, spec in configs.items():
        spec = spec or {}
        if not isinstance(spec, dict):
            problems.append(f"configs.{name}: expected a mapping with keys {', '.join(sorted(CONFIG_KEYS))}")
            continue
        problems += [f"configs.{name}.{k}: unknown key (allowed: {', '.join(sorted(CONFIG_KEYS))})" for k in spec if k not in CONFIG_KEYS]
        own = spec.get("overrides", [])
        if not _strings(own):
            problems.append(f"configs.{name}.overrides: expected a list of key.path=value overrides")
        if not _ints(spec.get("seeds", seeds)):
            problems.append(f"configs.{name}.seeds: expected a list of integers")
        if not isinstance(spec.get("base", True), bool):
            problems.append(f"configs.{name}.base: expected true or false")
        if not problems:
            shared = list(base) if spec.get("base", True) else []
            variants[str(name)] = {"overrides": shared + list(own), "seeds": list(spec.get("seeds", seeds))}
    if problems:
        raise UsageError(f"{len(problems)} problem(s) in {path}:\n" + "\n".join(f"  - {p}" for p in problems))
    return {"recipe": raw["recipe"], "configs": variants}


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _ints(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def run(search_file: str, out: str, jobs: int = 1, threads: int | None = None, overrides=(), only=None) -> list[dict]:
    """Run (or resume) a search; returns every result row, finished earlier or now.

    Args:
        search_file: the search YAML (see the module docstring).
        out: folder for ``results.jsonl``, ``summary.md`` and the bundles (``<out>/runs``).
        jobs: runs at a time.
        threads: torch/OpenMP threads per run (default: the CPU cores shared among the jobs).
        overrides: applied to every run after the variant's own (e.g. ``data.root=...``).
        only: names of variants to run (default: all).
    """
    search = load_search(search_file)
    names = list(search["configs"])
    if only:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise UsageError(f"--only: unknown variant(s) {', '.join(unknown)} (in {search_file}: {', '.join(names)})")
        names = [n for n in names if n in only]
    if jobs < 1:
        raise UsageError("--jobs: must be at least 1")
    # every variant must load before anything trains: a typo fails now, not an hour in
    run_overrides = {name: search["configs"][name]["overrides"] + list(overrides) for name in names}
    loaded = {}
    for name in names:
        try:
            loaded[name] = load_recipe(search["recipe"], run_overrides[name])
        except MMPeftError as exc:
            raise UsageError(f"{search_file}: variant {name!r} does not load:\n{exc}") from None
    out_path = output_folder(out)
    results, settings_file = out_path / "results.jsonl", out_path / "settings.json"
    stored = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    for name in names:  # resume only into runs made with the same settings (data location and output aside)
        if name in stored and stored_fingerprint({"recipe_resolved": stored[name]}) != recipe_fingerprint(loaded[name]):
            raise UsageError(f"{out_path} holds runs of variant {name!r} made with other settings; resuming would mix "
                             "them. Pass another --out, or rename the variant")
    stored.update({name: resolved_settings(loaded[name]) for name in names})
    write_atomic(settings_file, json.dumps(stored, indent=1))
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()] if results.is_file() else []
    done = {(r["name"], r["seed"]) for r in rows if r.get("rc") == 0}
    todo = [(n, s) for n in names for s in search["configs"][n]["seeds"] if (n, s) not in done]
    todo.sort(key=lambda job: job[1])  # seed-major: a stopped search has every variant at its first seeds
    threads = threads or threads_per_run(jobs)
    m = machine_info()
    where = {"machine": f"{m['cuda'] or m['processor']}, {m['cpu_count']} CPU cores, torch {m['torch']}", "jobs": jobs, "threads": threads}
    failed: list[dict] = []

    def record(job, row):  # a failed run is a result too: the search goes on without it
        row.update(where)
        rows.append(row)
        if row["rc"] != 0:
            failed.append(row)
        with results.open("a") as handle:  # one whole line per run; a crash loses at most the runs in flight
            handle.write(json.dumps(row) + "\n")

    # what each variant's other tasks report (their declared metrics), compared beside the first task's accuracy
    others = {name: {task: [m for m in settings.metrics if m != "loss"]
                     for task, settings in list(recipe_tasks(loaded[name]).items())[1:]} for name in names}
    side_by_side(todo, jobs, lambda job: _train(search["recipe"], run_overrides[job[0]], *job, out_path, threads,
                                                others[job[0]]), record, "search runs")
    write_atomic(out_path / "summary.md", markdown(search_file, search, rows, list(overrides)))
    if failed:  # the others' results are kept; a new call retries only these
        failed_names = ", ".join(f"{r['name']}_s{r['seed']}" for r in failed)
        first = failed[0]
        said = _last_error(out_path / "logs" / f"{first['name']}_s{first['seed']}.log")
        said = f"; {first['name']}_s{first['seed']} said: {said}" if said else ""
        raise MMPeftError(f"{len(failed)} of {len(todo)} run(s) failed: {failed_names}{said}; see their logs in {out_path / 'logs'} "
                          f"(the other results are in {results}; run the same command again to retry the failed ones)")
    return rows


def _last_error(log: Path) -> str:
    """A failed run's own message: from its last line starting with 'error:' (the CLI
    wraps long messages over several lines) to the end, or its last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.startswith("error:")]
    return " ".join(lines[starts[-1]:])[:600] if starts else (lines[-1][:600] if lines else "")


def _train(recipe: str, overrides: list, name: str, seed: int, out: Path, threads: int, others: dict) -> dict:
    tag = f"{name}_s{seed}"
    (out / "logs").mkdir(exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "mmpeft.cli", "finetune", recipe, *overrides, f"train.seed={seed}",
           f"output.dir={out / 'runs'}", f"output.name={tag}", "--overwrite", "--resume"]  # an interrupted run continues
    start = time.perf_counter()
    with (out / "logs" / f"{tag}.log").open("w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    row = {"name": name, "seed": seed, "overrides": overrides, "rc": rc, "seconds": round(time.perf_counter() - start, 1)}
    if rc != 0:
        return row
    metrics = json.loads((out / "runs" / tag / "metrics.json").read_text())
    history = metrics["history"]
    first = next(iter(metrics.get("tasks") or {"answer": None}))  # the first task's (the only one's) accuracy is compared
    if "accuracy" not in metrics["test"]:
        return {**row, "rc": 2, "error": f"the first task ({first}) reports no accuracy: a search compares accuracies"}
    answer_type = metrics["test"].get("groups", {}).get("answer_type", {})
    row.update(overall=metrics["test"]["accuracy"], best_epoch=metrics["best_epoch"], epochs=len(history),
               answer_type={k: v["accuracy"] for k, v in answer_type.items()},
               eval=[h.get("eval_accuracy", h.get(f"eval_{first}.accuracy")) for h in history], train_loss=[round(h["train_loss"], 4) for h in history],
               epoch_seconds=[round(h["epoch_seconds"], 1) for h in history])
    if others:  # {task: {metric: test value}} of the tasks after the first
        row["others"] = {task: {m: metrics["tasks"][task].get(m) for m in reported} for task, reported in others.items()}
    return row


def summarize(rows: list[dict], order: list[str]) -> list[dict]:
    """Mean +- sample std per variant over its successful runs, in the search file's order."""
    table = []
    for name in order:
        rs = sorted((r for r in rows if r["name"] == name and r.get("rc") == 0), key=lambda r: r["seed"])
        if not rs:
            continue

        def ms(values):
            values = [100 * v for v in values]
            return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

        best_eval = [max(e for e in r["eval"] if e is not None) for r in rs if any(e is not None for e in r["eval"])]
        table.append({
            "name": name, "seeds": [r["seed"] for r in rs], "overall": ms([r["overall"] for r in rs]),
            "open": ms([r["answer_type"]["OPEN"] for r in rs]) if all("OPEN" in r["answer_type"] for r in rs) else None,
            "closed": ms([r["answer_type"]["CLOSED"] for r in rs]) if all("CLOSED" in r["answer_type"] for r in rs) else None,
            "eval": ms(best_eval) if len(best_eval) == len(rs) else None,
            "best_epochs": [r["best_epoch"] for r in rs], "epochs": [r["epochs"] for r in rs],
        })
    return table


def _other_tasks(rows: list[dict], order: list[str]) -> list[str]:
    """A table per task after the first (multi-task variants): mean ± std over seeds of each metric it reports."""
    lines = []
    tasks = dict.fromkeys(t for r in rows if r.get("rc") == 0 for t in r.get("others", {}))
    for task in tasks:
        metrics = list(dict.fromkeys(m for r in rows if r.get("rc") == 0 for m in r.get("others", {}).get(task, {})))
        lines += ["", f"Task `{task}` on the same runs (test split; accuracies, recalls, F1, AUROC and AP in %):", "",
                  "| variant | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
        for name in order:
            rs = [r["others"][task] for r in rows if r["name"] == name and r.get("rc") == 0 and task in r.get("others", {})]
            if not rs:
                continue
            cells = []
            for m in metrics:
                values = [v for v in (r.get(m) for r in rs) if isinstance(v, (int, float)) and v == v]
                scale = 100 if any(w in m for w in RATES) else 1  # rates in %, ranks, errors and correlations as they are
                values = [scale * v for v in values]
                cells.append("-" if not values else f"{statistics.mean(values):.1f} ± "
                             f"{statistics.stdev(values) if len(values) > 1 else 0.0:.1f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def markdown(search_file: str, search: dict, rows: list[dict], overrides: list) -> str:
    f = lambda v: f"{v[0]:.1f} ± {v[1]:.1f}" if v else "-"  # noqa: E731
    machines = "; ".join(sorted({r.get("machine", "machine not recorded") for r in rows})) or "no runs yet"
    jobs = sorted({r["jobs"] for r in rows if "jobs" in r})
    threads = sorted({r["threads"] for r in rows if "threads" in r})
    span = lambda v: "?" if not v else str(v[0]) if len(v) == 1 else f"{v[0]}-{v[-1]}"  # noqa: E731
    lines = [f"Search `{search_file}` on recipe `{search['recipe']}`; {machines}; {span(jobs)} run(s) at a time, "
             f"{span(threads)} thread(s) each; extra overrides `{' '.join(overrides) or '(none)'}`. Mean ± std over seeds; "
             "'validation' is the best validation accuracy of each run (what its best checkpoint was chosen by; '-' where "
             "no validation split was held out).", ""]
    summary = summarize(rows, list(search["configs"]))
    # open / closed: only where the data has answer types (VQA-RAD's), not as empty columns
    typed = any(r["open"] or r["closed"] for r in summary)
    lines += ["| variant | seeds | " + ("open | closed | overall" if typed else "test accuracy") + " | validation | best epoch / epochs run |",
              "|---|---|" + ("---:|---:|---:|" if typed else "---:|") + "---:|---|"]
    for r in summary:
        epochs = ", ".join(f"{b}/{e}" for b, e in zip(r["best_epochs"], r["epochs"]))
        scores = f"{f(r['open'])} | {f(r['closed'])} | {f(r['overall'])}" if typed else f(r["overall"])
        lines.append(f"| {r['name']} | {','.join(map(str, r['seeds']))} | {scores} | {f(r['eval'])} | {epochs} |")
    lines += _other_tasks(rows, list(search["configs"]))
    lines += ["", "Variants:", ""] + [f"- `{n}`: `{' '.join(c['overrides']) or '(the recipe as it is)'}`"
                                      for n, c in search["configs"].items()]
    return "\n".join(lines) + "\n"
