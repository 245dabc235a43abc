"""Where a recipe runs and how: the device, the precision, the accelerator, DataLoader
workers and pinned memory, and what several processes agree on. Scoring is in
:mod:`.scoring`, memory in :mod:`.memory`, the optimizer in :mod:`.optim`.

Nothing here trains; ``mmpeft evaluate`` and ``mmpeft predict`` use this module without
importing the training loop.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .config import Recipe
from .errors import RecipeError


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
