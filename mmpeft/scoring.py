"""Running a loader through the model and scoring its outputs, task by task (training,
evaluation and the benchmarks share it)."""

from __future__ import annotations

import contextlib

import torch

from . import faults
from .config import Recipe
from .config.tasks import recipe_tasks, task_dataset
from .progress import progress
from .runtime import inference_autocast
from .tasks import summary_row


@torch.no_grad()
def predict_logits(model, loader, accelerator, desc: str = "eval", use_cache: bool = False, fault: str = ""):
    """Run ``loader`` through the model. Returns ``({task: outputs [N, width]}, index [N])`` on
    every process. ``fault`` names the :mod:`~mmpeft.faults` point reached after the first batch."""
    model.eval()
    collected: dict[str, list] = {}
    all_index = []
    several = accelerator.num_processes > 1
    for batch in progress(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
        out = model(batch["inputs"], batch.get("keys") if use_cache else None)
        out, index = {name: t.float() for name, t in out.items()}, batch["index"]
        if several:
            # Not gather_for_metrics: it trims the last batch by len(rows) % batch size, which is wrong
            # for batches of uneven size (one dataset at a time). Rows repeated to even out the
            # processes are dropped by their index below instead.
            out = {name: accelerator.pad_across_processes(t, dim=0) for name, t in out.items()}
            index = accelerator.pad_across_processes(index, dim=0, pad_index=-1)
            out, index = accelerator.gather((out, index))
        for name, t in out.items():
            collected.setdefault(name, []).append(t.cpu())
        all_index.append(index.cpu())
        if fault:
            faults.point(fault)
    outputs, index = {name: torch.cat(parts) for name, parts in collected.items()}, torch.cat(all_index)
    if several:
        keep = index >= 0
        outputs, index = {name: t[keep] for name, t in outputs.items()}, index[keep]
        ordered, order = torch.sort(index, stable=True)
        first = torch.ones_like(ordered, dtype=torch.bool)
        first[1:] = ordered[1:] != ordered[:-1]
        outputs, index = {name: t[order[first]] for name, t in outputs.items()}, ordered[first]
    return outputs, index


def score(outputs: dict, index, samples, tasks: dict, group_fields: dict[str, list]) -> dict[str, dict]:
    """Every task's metrics from its outputs (``outputs[task]``, ``index``: each output row's row
    in ``samples``). A task is scored on the rows that have its target (every row for a task
    without one); rows are put in their original order first, so results never depend on
    batching or on how processes split the data."""
    ordered = in_order(outputs, index, samples)
    return {name: task.score(*task_rows(ordered, task), group_fields.get(name, ())) for name, task in tasks.items()}


def in_order(outputs: dict, index, samples) -> tuple:
    """``({task: outputs}, rows)`` put back in the rows' original order (``index``: each output's row in ``samples``)."""
    order = index.argsort()
    return {name: t[order] for name, t in outputs.items()}, [samples[i] for i in index[order].tolist()]


def task_rows(ordered: tuple, task) -> tuple:
    """A task's outputs and rows, of the rows it learns from (:meth:`~mmpeft.tasks.Task.has`)."""
    outputs, rows = ordered[0][task.name], ordered[1]
    keep = [i for i, r in enumerate(rows) if task.has(r)]
    if len(keep) < len(rows):
        outputs = outputs[torch.tensor(keep, dtype=torch.long)]
    return outputs, [rows[i] for i in keep]


def flat_metrics(tasks: dict, metrics: dict[str, dict]) -> dict[str, float]:
    """One row of headline numbers: a single task's as they are (``accuracy``, ``macro_f1``,
    per-group accuracy, ``loss``), several tasks' as ``<task>.<metric>``."""
    row = {}
    for name, task in tasks.items():
        m = metrics[name]
        numbers = summary_row(m, list(m.get("groups", {}))) if "accuracy" in m and "macro_f1" in m else task.headline(m)
        numbers = {**numbers, "loss": m["loss"]}
        row.update(numbers if len(tasks) == 1 else {f"{name}.{k}": v for k, v in numbers.items()})
    return row


def prepare_tasks(model, tasks: dict, device, recipe: Recipe | None = None) -> None:
    """What tasks need from the model before scoring or answering (:meth:`~mmpeft.tasks.Task.prepare`:
    a contrastive task's class embeddings, ...), under the recipe's inference autocast."""
    for task in tasks.values():
        autocast = inference_autocast(recipe, device.type if hasattr(device, "type") else str(device)) if recipe \
            else contextlib.nullcontext()
        task.prepare(model, device, autocast)


def select_metric(recipe: Recipe, tasks: dict) -> tuple[str, str, bool]:
    """``(task, metric, higher is better)`` of ``train.select``, else the first task's own metric."""
    if recipe.train.select:
        name, _, metric = recipe.train.select.partition(".")
    else:
        name = next(iter(tasks))
        metric = tasks[name].settings.metric
    return name, metric, metric not in tasks[name].settings.lower_is_better


def groups_to_report(recipe: Recipe, samples) -> dict[str, list[str]]:
    """The row fields each task reports per group: the task's own, else every group its rows carry."""
    first = {}  # each dataset's first row
    for s in samples:
        first.setdefault(s.dataset, s)
    every = {key: sorted(row.groups) for key, row in first.items()}
    return {name: list(settings.group_fields) or every.get(task_dataset(name, settings), [])
            for name, settings in recipe_tasks(recipe).items()}
