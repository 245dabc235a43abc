"""What training, evaluation, prediction and the benchmarks share at run time: where a
recipe runs and under which precision, the accelerator, running a loader through the
model, scoring, and memory (measured and estimated).

Nothing here trains; ``mmpeft evaluate`` and ``mmpeft predict`` use this module without
importing the training loop.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource

import torch

from . import faults
from .config import Recipe
from .errors import RecipeError
from .progress import progress
from .quant import require_bitsandbytes, weight_bytes
from .config.tasks import recipe_tasks, task_dataset
from .tasks import summary_row


def train_device(t) -> str:
    """Where a recipe's ``train`` block trains: "cuda" or "cpu" (``auto``: CUDA when visible)."""
    return "cuda" if t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available()) else "cpu"


def resolve_mixed_precision(setting: str, device: str) -> str:
    if setting != "auto":
        return setting
    if device == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def inference_autocast(recipe: Recipe, device: str):
    """The autocast a bundle's model ran under when it was trained and scored, for
    evaluating or predicting on ``device`` (a bf16-trained model scored in float32 gives
    other numbers). fp16 is CUDA-only, so elsewhere it falls back to float32."""
    precision = resolve_mixed_precision(recipe.train.mixed_precision, device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None or (precision == "fp16" and device != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=dtype)


def fresh_accelerator(**settings):
    """An ``Accelerator`` with these settings, even if this process made another before.

    accelerate keeps one process-wide state and refuses a second Accelerator with other
    settings ("AcceleratorState has already been initialized"), so ``mmpeft.finetune`` of
    a bf16 recipe after a float32 one (or ``evaluate`` after a GPU run) failed in one
    Python process. Each run gets its own state; the distributed (partial) state is kept.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(**settings)


def make_accelerator(recipe: Recipe):
    t = recipe.train
    device = train_device(t)
    if t.device == "cuda" and not torch.cuda.is_available():
        raise RecipeError(["train.device: 'cuda' but no CUDA GPU is visible; set train.device=cpu or auto"])
    precision = resolve_mixed_precision(t.mixed_precision, device)
    if precision == "fp16" and device == "cpu":
        raise RecipeError(["train.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on CPU"])
    from accelerate.utils import DataLoaderConfiguration

    return fresh_accelerator(cpu=device == "cpu", mixed_precision=precision, gradient_accumulation_steps=t.gradient_accumulation_steps,
                             dataloader_config=DataLoaderConfiguration(non_blocking=pin_memory(t, device)))  # copies overlap compute


def num_workers(train, device: str, processes: int = 1) -> int:
    """``train.num_workers``, or by default: none on a CPU, where workers only take cores from
    the compute threads (0.89x with one on 2 cores, ``mmpeft bench throughput``); on a GPU half
    the cores each process may use, at most 8, so that decoding and resizing run while the
    GPU computes (an H100 run with none was bound by its main process's preprocessing)."""
    if train.num_workers is not None:
        return train.num_workers
    if device != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores // (2 * max(1, processes))))


def agree_across_processes(accelerator, stop, due: bool) -> tuple[bool, bool]:
    """(stop now, checkpoint now), the same on every process. A checkpoint gathers from all
    processes and a stop must end all of them at the same step, so a signal that reached one
    process, or a ``checkpoint_minutes`` timer that ran out on one process's clock a moment
    before the others', counts for all (deciding apart, one would wait in a collective the
    others never join)."""
    if accelerator.num_processes == 1:
        return bool(stop), bool(stop) or due
    flags = torch.tensor([1.0 if stop else 0.0, 1.0 if due else 0.0], device=accelerator.device)
    any_stop, any_due = (accelerator.reduce(flags, reduction="sum") > 0).tolist()
    return any_stop, any_stop or any_due


def pin_memory(train, device: str) -> bool:
    """``train.pin_memory``, or on by default where batches are copied to a GPU."""
    return train.pin_memory if train.pin_memory is not None else device == "cuda"


@torch.no_grad()
def predict_logits(model, loader, accelerator, desc: str = "eval", use_cache: bool = False, fault: str = ""):
    """Run ``loader`` through the model. Returns ``(logits [N, C], index [N])`` on every process.
    ``fault`` names the :mod:`~mmpeft.faults` point reached after the first batch."""
    model.eval()
    all_logits, all_index = [], []
    several = accelerator.num_processes > 1
    for batch in progress(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
        logits, index = model(batch["inputs"], batch.get("keys") if use_cache else None).float(), batch["index"]
        if several:
            # Not gather_for_metrics: it trims the last batch by len(rows) % batch size, which is wrong
            # for batches of uneven size (one dataset at a time). Rows repeated to even out the
            # processes are dropped by their index below instead.
            logits = accelerator.pad_across_processes(logits, dim=0)
            index = accelerator.pad_across_processes(index, dim=0, pad_index=-1)
            logits, index = accelerator.gather((logits, index))
        all_logits.append(logits.cpu())
        all_index.append(index.cpu())
        if fault:
            faults.point(fault)
    logits, index = torch.cat(all_logits), torch.cat(all_index)
    if several:
        logits, index = logits[index >= 0], index[index >= 0]
        ordered, order = torch.sort(index, stable=True)
        first = torch.ones_like(ordered, dtype=torch.bool)
        first[1:] = ordered[1:] != ordered[:-1]
        logits, index = logits[order[first]], ordered[first]
    return logits, index


def score(outputs, index, samples, tasks: dict, slices: dict, group_fields: dict[str, list]) -> dict[str, dict]:
    """Every task's metrics from the model's outputs ``[N, C]`` (``index``: each output's row
    in ``samples``). A task is scored on the rows that have its target (every row for a task
    without one); rows are put in their original order first, so results never depend on
    batching or on how processes split the data."""
    ordered = in_order(outputs, index, samples)
    return {name: task.score(*task_rows(ordered, task, slices[name]), group_fields.get(name, ())) for name, task in tasks.items()}


def in_order(outputs, index, samples) -> tuple:
    """``(outputs, rows)`` put back in the rows' original order (``index``: each output's row in ``samples``)."""
    order = index.argsort()
    return outputs[order], [samples[i] for i in index[order].tolist()]


def task_rows(ordered: tuple, task, columns: slice) -> tuple:
    """A task's output columns and rows, of the rows it learns from (:meth:`~mmpeft.tasks.Task.has`)."""
    outputs, rows = ordered
    keep = [i for i, r in enumerate(rows) if task.has(r)]
    if len(keep) < len(rows):
        outputs = outputs[torch.tensor(keep, dtype=torch.long)]
    return outputs[:, columns], [rows[i] for i in keep]


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


def peak_memory_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def estimate_training_memory(encoder, recipe) -> int:
    """Rough peak training memory of one encoder in bytes.

    weights as stored + 12 bytes per trainable parameter (gradient and two Adam moments) +
    activations: 64 bytes x hidden x tokens x (layers / 2) x batch, a quarter of that with
    gradient checkpointing, plus a bf16 copy of trainable weights under mixed precision.
    The constants were fitted to ``mmpeft bench memory`` on an H100 (BERT-base + ViT-B/16,
    batch 32, bf16 autocast), where the estimate came within 5% of the measured peak
    for full fine-tuning, LoRA bf16 and LoRA + NF4, with and without checkpointing.
    bitsandbytes' int8 layers held 2-4x this estimate on an H100 (see README).
    """
    t = recipe.train
    weights = weight_bytes(encoder)
    trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    hidden = encoder.hidden_size
    tokens = encoder.sequence_length()
    layers = sum(1 for n, _ in encoder.named_modules() if n.count(".") >= 1 and n.rsplit(".", 1)[-1].isdigit()) or 12
    act = 64 * hidden * tokens * max(1, layers // 2) * t.batch_size
    if encoder.checkpointing:
        act //= 4
    if resolve_mixed_precision(t.mixed_precision, train_device(t)) != "no":
        act += 2 * trainable  # autocast keeps a low-precision copy of each trainable weight
    return weights + 12 * trainable + act


def cosine_with_warmup(optimizer, warmup: int, total: int):
    """Linear warm-up to the base learning rate, then cosine decay to zero."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(model, t):
    """AdamW with separate learning rates for adapters and head; no decay on biases/norms."""
    groups = []
    for params, lr in ((model.adapter_parameters(), t.lr), (model.head_parameters(), t.head_lr)):
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups += [g for g in ({"params": decay, "lr": lr, "weight_decay": t.weight_decay},
                               {"params": no_decay, "lr": lr, "weight_decay": 0.0}) if g["params"]]
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups)
    bnb = require_bitsandbytes()
    cls = bnb.optim.AdamW8bit if t.optimizer == "adamw_8bit" else bnb.optim.PagedAdamW8bit
    return cls(groups)
