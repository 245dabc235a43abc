"""Console tables and PNG plots (training curves, per-group accuracy)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .config.datasets import dataset_spec
from .config.inputs import MODALITY_FIELDS
from .quant import quantized_layers, weight_bytes
from .memory import estimate_training_memory

# Width follows the terminal (80 columns in a file or pipe); no markup, so paths and
# messages print as written; sentences are not hard-wrapped, so log lines stay whole.
console = Console(highlight=False, markup=False, soft_wrap=True)


def _fmt(n: int) -> str:
    return f"{n:,}"


def compact_names(names: list[str]) -> str:
    """``['a.0.query', 'a.1.query', 'a.0.value']`` -> ``'query x2, value x1'``."""
    counts = Counter(n.rsplit(".", 1)[-1] for n in names)
    return ", ".join(f"{k} x{v}" if v > 1 else k for k, v in counts.items())


def print_summary(rows, model, recipe, tasks: dict, splits=None) -> None:
    """Per encoder and head: method, touched modules, trainable and total parameters."""
    table = Table(title=f"{recipe.run_name}: model")
    for col in ("part", "model", "method", "trainable", "total", "%"):
        table.add_column(col, justify="right" if col in ("trainable", "total", "%") else "left",
                         overflow="fold", no_wrap=col != "model")
    total_train = sum(r.trainable for r in rows)
    total_all = sum(r.total for r in rows)
    for r in rows:
        pct = 100.0 * r.trainable / r.total if r.total else 0.0
        table.add_row(r.name, str(r.model), r.method, _fmt(r.trainable), _fmt(r.total), f"{pct:.2f}")
    table.add_row("all", "", "", _fmt(total_train), _fmt(total_all), f"{100.0 * total_train / max(1, total_all):.2f}")
    console.print(table)
    for r in rows:  # one line each, so a long list of modules neither widens nor breaks the table
        console.print(f"{r.name}: {r.method} touches {compact_names(r.touched) or '-'}")
    if dataset_spec(recipe.data.source).columns:  # which column feeds which encoder (data.encoder_fields, else its modality's)
        data = recipe.data
        console.print(f"{recipe.data.source} columns: " + ", ".join(
            f"{name} reads {data.encoder_fields.get(name, getattr(data, MODALITY_FIELDS[enc.modality]))!r}"
            for name, enc in model.encoders.items()))
    for name, enc in model.encoders.items():
        q = recipe.encoders[name].quantization
        if q is not None and not quantized_layers(enc):
            console.print(f"{name}: quantization requested, but {recipe.encoders[name].model!r} has no Linear layer to quantize "
                          f"(convolutions, embeddings and norms stay full precision); weights {weight_bytes(enc) / 1e6:.1f} MB")
        elif q is not None:
            est = estimate_training_memory(enc, recipe)
            console.print(
                f"{name}: {q.bits}-bit base ({q.quant_type if q.bits == 4 else 'int8'}), quantized layers {quantized_layers(enc)}, "
                f"weights {weight_bytes(enc) / 1e6:.1f} MB; est. peak training memory {est / 1e6:.0f} MB at batch {recipe.train.batch_size}"
                + (" (a lower bound: bitsandbytes' int8 layers held 2-4x this on an H100)" if q.bits == 8 else "")
            )
        else:
            console.print(f"{name}: float32 weights {weight_bytes(enc) / 1e6:.1f} MB; est. peak training memory "
                          f"{estimate_training_memory(enc, recipe) / 1e6:.0f} MB at batch {recipe.train.batch_size}")
        if recipe.train.gradient_checkpointing and not enc.checkpointing:
            console.print(f"{name}: {type(enc.base_model()).__name__} does not support gradient checkpointing; it runs without")
    data = f"; rows train/eval/test {len(splits.train)}/{len(splits.eval)}/{len(splits.test)}" if splits else ""
    for name, task in tasks.items():
        kind = task.settings.registry_name
        outputs = task.describe_outputs()
        reads = ", ".join(task.settings.encoders) or "every encoder"
        console.print(f"task {name}: {kind}, {outputs}, reads {reads}" + (f", weight {task.settings.weight:g}" if len(tasks) > 1 else ""))
    if data:
        console.print(data.lstrip("; "))


def epoch_lines(row: dict) -> list[str]:
    """An epoch's history row as a person reads it: time and loss on the first line, each
    validation number ``name value`` after (the machine-readable row is train_log.jsonl)."""
    head = (f"epoch {row['epoch']} (step {row['step']}): train loss {row['train_loss']:.4f}, "
            f"{row['epoch_seconds']:.1f} s, {row['samples_per_second']:.1f} rows/s, {row['data_seconds']:.1f} s waiting for data")
    tasks = [f"{k.split('.', 1)[1]} {v:.4f}" for k, v in row.items() if k.startswith("train_loss.")]
    lines = [head + (f" (per task: {', '.join(tasks)})" if tasks else "")]
    evals = [(k[len("eval_"):], v) for k, v in row.items() if k.startswith("eval_")]
    if evals:
        width = max(len(k) for k, _ in evals)
        lines += [f"  validation {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  validation {k:<{width}}  {v}"
                  for k, v in evals]
    return lines


def print_epoch(row: dict) -> None:
    console.print("\n".join(epoch_lines(row)), highlight=False, markup=False)


def print_test(metrics: dict[str, dict], tasks: dict) -> None:
    """One table of every task's test metrics (:meth:`~mmpeft.tasks.Task.table`)."""
    table = Table(title="test metrics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("n", justify="right")
    for name, task in tasks.items():
        for metric, value, n in task.table(metrics[name]):
            table.add_row(metric if len(tasks) == 1 else f"{name}.{metric}", value, n)
    console.print(table)


def save_plots(directory: Path, history: list[dict], test_metrics: dict, group_fields) -> list[str]:
    """Write training_curves.png (loss and eval accuracy per epoch) and group_accuracy.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    epochs = [r["epoch"] for r in history]
    # Overall accuracy plus the first group field (e.g. open/closed); more lines are unreadable.
    first = f"eval_{group_fields[0]}=" if group_fields else None
    acc_keys = ["eval_accuracy", "eval_exact_match"] + sorted({k for r in history for k in r if first and k.startswith(first)})
    acc_keys = [k for k in acc_keys if any(k in r for r in history)]
    if acc_keys:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    else:  # no validation split (data.eval_fraction: 0): an empty accuracy panel would say nothing
        fig, ax1 = plt.subplots(figsize=(5.5, 4))
    ax1.plot(epochs, [r["train_loss"] for r in history], marker="o", label="train loss")
    if any("eval_loss" in r for r in history):
        ax1.plot([r["epoch"] for r in history if "eval_loss" in r], [r["eval_loss"] for r in history if "eval_loss" in r], marker="o", label="eval loss")
    ax1.set_xlabel("epoch"), ax1.set_title("loss" if acc_keys else "training loss (no validation split held out)"), ax1.legend()
    for key in acc_keys:
        pts = [(r["epoch"], r[key]) for r in history if key in r]
        ax2.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=key[5:])
    if acc_keys:
        ax2.set_xlabel("epoch"), ax2.set_ylabel("accuracy / exact match (%)"), ax2.set_title("validation")
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(directory / "training_curves.png", dpi=100)
    plt.close(fig)
    written.append("training_curves.png")
    bars = [(f"{f}={v}", m["accuracy"], m["count"]) for f in group_fields for v, m in test_metrics.get("groups", {}).get(f, {}).items()
            if m["count"] >= 5 and "accuracy" in m]  # tiny groups (n < 5) say nothing and crowd the chart
    if bars:
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(bars) + 2), 4))
        ax.bar(range(len(bars)), [100 * b[1] for b in bars])
        ax.set_xticks(range(len(bars)), [f"{b[0]}\n(n={b[2]})" for b in bars], rotation=60, ha="right", fontsize=7)
        ax.axhline(100 * test_metrics.get("accuracy", 0.0), color="gray", linestyle="--", label=f"overall {100 * test_metrics['accuracy']:.1f}%")
        ax.set_ylabel("test accuracy (%)"), ax.set_ylim(0, 100), ax.legend()
        ax.set_title("test accuracy per group (groups with n >= 5)")
        fig.tight_layout()
        fig.savefig(directory / "group_accuracy.png", dpi=100)
        plt.close(fig)
        written.append("group_accuracy.png")
    return written


def sampling_line(sampler, t) -> str:
    """How an epoch's batches are shared between the tasks' datasets (a ``DatasetBatches``)."""
    rule = f"temperature (T={t.sampling_temperature:g})" if t.task_sampling == "temperature" else t.task_sampling
    parts = ", ".join(f"{name or 'data'} {rows:,} rows {share:.1%}" for name, rows, share in
                      zip(sampler.names, sampler.rows, sampler.shares()))
    return f"batches drawn by {rule}, {len(sampler)} an epoch: {parts}"
