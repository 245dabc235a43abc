"""``mmpeft bench methods``: fine-tune the quickstart with each method on one side at a time.

The other encoder stays frozen (``none``) so each row isolates one method on one
encoder; a method that cannot adapt an encoder (VeRA on a CNN) gets a row saying why. A run
of a subset (``--methods``) adds its rows to the results measured with the same settings.
Every registered method runs (:func:`~mmpeft.bench.common.benchmark_methods`),
with the recipe's learning rates, except methods that train the base weights (``full``),
which use their own ``default_lr``. Prints and writes (JSON + Markdown) method, side,
trainable parameters, test accuracy and seconds per epoch.
"""

from __future__ import annotations

import json
from pathlib import Path


from ..config import load_recipe
from ..methods import METHODS
from ..model import method_refusal
from ..progress import progress
from ..train import finetune
from .common import (benchmark_methods, bundle_folder, choose, cpu_ticks, machine_info, output_folder, previous_results,
                     recipe_fingerprint, resolved_settings, steal_line, steal_percent, write_atomic)


def run(recipe: str, out: str, methods=None, sides=("image", "text"),
        overrides=(), work_dir: str | None = None) -> list[dict]:
    work_dir = work_dir or bundle_folder(out, "benchmarks/runs")  # another --out keeps its bundles apart
    methods = choose(methods, benchmark_methods(), "--methods")
    sides = choose(sides, ("image", "text"), "--sides")
    base = list(overrides)
    loaded = load_recipe(recipe, base)  # also reports a bad override before anything is written
    fingerprint = recipe_fingerprint(loaded)
    rows = []
    out_path = output_folder(out)
    cache = out_path / "methods.json"
    prev = previous_results(cache, recipe, base, fingerprint)  # resume: keep rows measured with the same settings
    done = {(r["side"], r["method"]): r for r in prev["rows"]} if prev else {}
    jobs = [(side, m) for side in sides for m in methods]
    # rows of the same settings that this run did not ask for stay (an interrupted run loses none)
    kept = [r for key, r in done.items() if key not in set(jobs)]
    for side, method in progress(jobs, desc="methods", unit="run"):
        if (side, method) in done:
            rows.append(done[(side, method)])
            continue
        other = "text" if side == "image" else "image"
        ov = base + [f"encoders.{side}.peft={{method: {method}}}", f"encoders.{other}.peft={{method: none}}",
                     f"output.dir={work_dir}", f"output.name={side}_{method}", "output.plots=false"]
        if not METHODS.get(method).keeps_base_frozen:  # a pretrained base needs a far smaller learning rate
            ov.append(f"train.lr={METHODS.get(method).default_lr}")
        r = load_recipe(recipe, ov)
        refusal = method_refusal(r, side)
        if refusal:  # recorded, so the table says why the row is empty
            rows.append({"side": side, "method": method, "refused": refusal})
            continue
        ticks = cpu_ticks()
        bundle = finetune(r, overwrite=True)
        manifest = json.loads((Path(bundle) / "manifest.json").read_text())
        metrics = json.loads((Path(bundle) / "metrics.json").read_text())
        enc = manifest["encoders"][side]
        secs = [h["epoch_seconds"] for h in metrics["history"]]
        size = sum(i["bytes"] for k, i in manifest["files"].items() if k.startswith(f"encoders/{side}/"))
        rows.append({
            "side": side, "method": method, "trainable": enc["trainable_parameters"], "encoder_total": enc["total_parameters"],
            "head_trainable": manifest["head"]["parameters"], "test_accuracy": metrics["test"]["accuracy"],
            "seconds_per_epoch": sum(secs) / len(secs), "adapter_bytes": size,
            "cpu_steal_pct": steal_percent(ticks, cpu_ticks()),
        })
        write_atomic(cache, json.dumps({"recipe": recipe, "overrides": base, "recipe_sha256": fingerprint,
                                        "recipe_resolved": resolved_settings(loaded), "machine": machine_info(),
                                        "rows": rows + kept}, indent=2))
    order = {(sd, m): i for i, (sd, m) in enumerate((sd, m) for sd in ("image", "text") for m in benchmark_methods())}
    rows += kept
    rows.sort(key=lambda r: order.get((r["side"], r["method"]), len(order)))
    result = {"recipe": recipe, "overrides": base, "recipe_sha256": fingerprint, "recipe_resolved": resolved_settings(loaded),
              "machine": machine_info(), "rows": rows}
    write_atomic(cache, json.dumps(result, indent=2))
    write_atomic(out_path / "methods.md", markdown(result))
    return rows


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"Quickstart recipe `{result['recipe']}` with overrides `{' '.join(result['overrides']) or '(none)'}`; "
             f"{m['processor']}, {m['cpu_count']} cores, torch {m['torch']} ({m['torch_threads']} threads).", "",
             "| side | method | trainable params (encoder) | % of encoder | adapter file bytes | test accuracy | s / epoch |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if "refused" in r:
            lines.append(f"| {r['side']} | {r['method']} | refused: {r['refused']} | | | | |")
            continue
        pct = 100 * r["trainable"] / max(1, r["encoder_total"])
        lines.append(f"| {r['side']} | {r['method']} | {r['trainable']:,} | {pct:.2f} | {r['adapter_bytes']:,} | "
                     f"{100 * r['test_accuracy']:.2f} | {r['seconds_per_epoch']:.1f} |")
    steal = steal_line([r.get("cpu_steal_pct") for r in result["rows"]])
    return "\n".join(lines + ([""] + [steal] if steal else [])) + "\n"
