"""What every benchmark command shares: the machine it ran on, CPU steal, subset options,
resumable results keyed by resolved settings, side-by-side runs, atomic writes."""

from __future__ import annotations

import difflib
import json
import os
import platform
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


from ..checkpoint import run_settings
from ..config import EncoderConfig, load_recipe
from ..errors import RecipeError, UsageError
from ..files import atomic_text_file, json_fingerprint
from ..methods import METHODS
from ..progress import progress


def benchmark_methods() -> list[str]:
    """Every registered method, in the order the benchmarks compare them: the ones that
    train nothing in the encoder (the floor), the recipes' default method, the other PEFT
    methods by name, then the ones that train the base weights (the reference). A newly
    registered method is included."""
    default = EncoderConfig.model_fields["peft"].default_factory()["method"]

    def rank(name):
        cls = METHODS.get(name)
        return (0 if not cls.trains_encoder else 3 if not cls.keeps_base_frozen else 1 if name == default else 2, name)

    return sorted(METHODS.names(), key=rank)


def machine_info() -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    info["processor"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def cpu_ticks() -> list[int] | None:
    """Aggregate CPU time counters from Linux ``/proc/stat`` (user, nice, system, idle,
    iowait, irq, softirq, steal, ...), or None where there is no such file."""
    try:
        with open("/proc/stat") as handle:
            fields = handle.readline().split()
    except OSError:
        return None
    return [int(x) for x in fields[1:]] if fields and fields[0] == "cpu" and len(fields) > 8 else None


def steal_percent(start: list[int] | None, end: list[int] | None) -> float | None:
    """Share of CPU time the hypervisor gave to other guests between two :func:`cpu_ticks`
    readings. On a shared VM this, not the code, can make a run several times slower, so
    benchmarks record it beside their timings."""
    if not start or not end:
        return None
    delta = [b - a for a, b in zip(start[:8], end[:8])]
    total = sum(delta)
    return round(100 * delta[7] / total, 1) if total > 0 else None


def steal_line(values) -> str:
    """One sentence on host CPU steal over the runs that recorded it ('' if none did)."""
    seen = [v for v in values if v is not None]
    if not seen:
        return ""
    return (f"Host CPU steal (time the VM's cores were given to other guests) during the runs: {min(seen):.0f}-{max(seen):.0f}% "
            f"({len(seen)} of {len(values)} runs measured); timings of runs with high steal are slower for that reason alone.")


def choose(requested, available, option: str) -> list:
    """Check a benchmark's subset option before any run starts (a typo would otherwise fail
    only when its turn comes, after the runs before it). ``None`` means all of ``available``."""
    if requested is None:
        return list(available)
    chosen = [str(r).strip() for r in requested]
    for name in chosen:
        if name not in available:
            close = difflib.get_close_matches(name, list(available), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UsageError(f"{option}: unknown {name!r}{hint} (available: {', '.join(available)})")
    return chosen


def parse_ints(text: str, option: str, example: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)``, with an error that names the command-line option."""
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise UsageError(f"{option}: expected comma-separated integers such as {example} (got {text!r})") from None


def parse_seeds(text: str) -> tuple[int, ...]:
    return parse_ints(text, "--seeds", "0,1,2")


def resolved_settings(loaded) -> dict:
    """A resolved recipe (every default filled in) as JSON data, without where the data
    lives and where bundles go: what a benchmark's results depend on."""
    d = loaded.model_dump(mode="json")
    d.pop("output", None)
    d.get("data", {}).pop("root", None)
    return d


def recipe_fingerprint(loaded) -> str:
    """SHA-256 of the settings a run's result depends on, so a benchmark resumes only into
    results made with the same settings, even if the recipe file was edited in between.
    Those that change nothing computed (DataLoader workers, logging, checkpoints, the
    device: :data:`~mmpeft.checkpoint.NEUTRAL_SETTINGS`) are left out, as a checkpoint
    leaves them out: changing them, or their defaults, does not stop a resume."""
    return json_fingerprint(run_settings(loaded))


def stored_fingerprint(prev: dict) -> str | None:
    """The fingerprint of a results file's settings *as today's schema resolves them*: a
    setting added since (absent from the file) takes its default on both sides, so it does
    not stop a resume, while any recorded value that differs still does."""
    if "recipe_resolved" not in prev:
        return prev.get("recipe_sha256")
    try:
        return recipe_fingerprint(load_recipe(prev["recipe_resolved"]))
    except RecipeError:  # a setting that no longer exists: not the same settings
        return None


def previous_results(cache: Path, recipe: str, overrides: list, fingerprint: str) -> dict | None:
    """The results file a benchmark resumes from, or None if there is none yet.

    Raises:
        UsageError: the file holds results of another recipe or other overrides (resuming
            would mix them, and starting over would overwrite them).
    """
    if not cache.is_file():
        return None
    prev = json.loads(cache.read_text())
    # files from before fingerprints were recorded match on recipe path and overrides
    same = (stored_fingerprint(prev) == fingerprint if "recipe_sha256" in prev or "recipe_resolved" in prev
            else prev.get("overrides") == overrides and prev.get("recipe") == recipe)
    if not same:
        raise UsageError(f"{cache} holds runs of another recipe or other overrides (recipe {prev.get('recipe')}, "
                         f"overrides {' '.join(prev.get('overrides') or []) or '(none)'}); resuming would mix them. "
                         "Pass another --out, or move that file away to start over")
    return prev


def output_folder(out: str) -> Path:
    """Create a benchmark's ``--out`` folder before any run, so a folder that cannot be
    made is reported at once (as a usage error) and not after the runs have trained."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create that folder ({exc.strerror}); choose a writable folder") from None
    return path


def bundle_folder(out: str, default: str) -> str:
    """Where a benchmark keeps the bundles it trains: ``default`` for the default
    ``--out`` (benchmarks/results), ``<out>/runs`` for any other, so a second benchmark
    (other overrides, another ``--out``) never overwrites the first one's bundles."""
    return default if Path(out) == Path("benchmarks/results") else str(Path(out) / "runs")


def threads_per_run(jobs: int) -> int:
    """The CPU cores divided among ``jobs`` runs side by side (at least one each)."""
    return max(1, (os.cpu_count() or 1) // jobs)


def side_by_side(todo: list, jobs: int, train, record, desc: str) -> None:
    """Call ``train(job)`` for every job, ``jobs`` at a time in threads (each job starts
    its own process, so threads suffice), and ``record(job, result)`` one at a time in
    the order they finish, so the caller can append and save without races.

    The first exception stops the rest: queued jobs are cancelled, the jobs in flight
    finish (and are recorded), then it is raised.
    """
    lock = threading.Lock()
    bar = progress(total=len(todo), desc=desc, unit="run")

    def one(job):
        result = train(job)
        with lock:
            record(job, result)
            bar.update(1)

    try:
        with ThreadPoolExecutor(jobs) as pool:
            futures = [pool.submit(one, job) for job in todo]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    finally:
        bar.close()


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file, so an interrupted benchmark never leaves half a file."""
    with atomic_text_file(path) as handle:
        handle.write(text)
