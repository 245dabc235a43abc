"""The reference loop of ``mmpeft bench throughput``: the recipe's own model, optimizer and
precision trained on ready-made batches already on the device, in a plain loop (the ceiling
for this model on this machine), with its FLOPs per step and, on a GPU, the largest batch
within a memory budget."""

from __future__ import annotations

import gc
import time

import torch
import torch.nn.functional as F

from ..config import load_recipe
from ..data import recipe_splits
from ..data.batching import Collator, ImageStore
from ..errors import MMPeftError, UsageError
from ..model import build_model
from ..memory import peak_memory_mib
from ..optim import make_optimizer
from ..runtime import resolve_mixed_precision, train_device
from ..tasks import recipe_task_set
from .device import largest_fitting, memory_budget, peak_flops


class ReferenceLoop:
    """The recipe's model (same encoders, PEFT layers, head), optimizer and precision,
    trained on ready-made batches already on the device, in a plain loop (:meth:`timed`):
    the ceiling for this model on this machine."""

    def __init__(self, recipe):
        t = self.train = recipe.train
        self.device = train_device(t)
        torch.manual_seed(t.seed)
        splits = recipe_splits(recipe)
        tasks = recipe_task_set(recipe, splits.train)
        if len(tasks) != 1 or not next(iter(tasks.values())).settings.single_answer:
            raise UsageError("bench throughput: the reference loop is one vqa / classification task's (cross-entropy); "
                             "this recipe has other tasks")
        self.model = build_model(recipe, tasks, device=self.device).to(self.device)
        self.rows = splits.train
        self.collate = Collator(self.rows, dict(self.model.encoders.items()), tasks, ImageStore.for_encoders(self.model.encoders.values()))
        self.first = next(iter(tasks))
        self.optimizer = make_optimizer(self.model, t)
        self.precision = resolve_mixed_precision(t.mixed_precision, self.device)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.model.train()

    def batches(self, batch_size: int, count: int) -> list:
        """``count`` batches of the training rows, collated and moved to the device."""
        found = []
        for start in range(0, min(count * batch_size, len(self.rows)), batch_size):
            batch = self.collate(list(range(start, min(start + batch_size, len(self.rows)))))
            found.append(({k: {n: x.to(self.device) for n, x in v.items()} for k, v in batch["inputs"].items()},
                          batch["targets"][self.first].to(self.device)))
        return found

    def step(self, inputs, labels) -> None:
        t = self.train
        with torch.autocast(self.device, dtype=self.dtype, enabled=self.dtype is not None):
            logits = self.model(inputs)[self.first]
        loss = F.cross_entropy(logits.float(), labels, ignore_index=-1, label_smoothing=t.label_smoothing)
        loss.backward()
        if t.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], t.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed(self, batches: list, steps: int, warmup: int) -> float:
        """Seconds for ``steps`` steps over ``batches`` (in turn), after ``warmup`` untimed ones."""
        for step in range(warmup + steps):
            if step == warmup:
                self.sync()
                start = time.perf_counter()
            self.step(*batches[step % len(batches)])
        self.sync()
        return time.perf_counter() - start

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def fits(self, batch_size: int) -> bool:
        """Whether two training steps at ``batch_size`` run within the CUDA memory cap
        (:func:`~.device.memory_budget`), holding the batches the reference loop holds."""
        try:
            batches = self.batches(batch_size, GPU_BATCHES)
            if len(batches) < GPU_BATCHES or batches[-1][1].shape[0] < batch_size:
                return False  # fewer training rows than the batches: no larger batch to measure
            self.timed(batches, 2, 0)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            batches = None
            torch.cuda.empty_cache()


# Distinct ready-made batches a GPU holds, in turn: ``steps`` of them would take GBs of the
# memory measured. The largest-batch search holds as many, so that the batch it finds
# also fits the reference loop (with 8 held, a batch found to fit by one ran out of memory).
GPU_BATCHES = 2


def reference_loop(recipe, steps: int, warmup: int = 3) -> dict:
    """The reference loop's samples/s on ``steps`` ready-made batches (on a GPU
    ``GPU_BATCHES`` distinct ones, in turn)."""
    gc.collect()  # what earlier runs of this process left goes before this one's batches
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    loop = ReferenceLoop(recipe)
    batch_size = recipe.train.batch_size
    count = steps if loop.device == "cpu" else min(steps, GPU_BATCHES)
    batches = loop.batches(batch_size, 1)  # counted before the rest are made: no more memory than the search's probes
    flops = _step_flops(loop.model, batches[0], loop.dtype, recipe.train.label_smoothing)
    batches += loop.batches(batch_size, count)[1:]
    loop.optimizer.zero_grad(set_to_none=True)
    if loop.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = loop.timed(batches, steps, warmup)
    seen = sum(batches[i % len(batches)][1].shape[0] for i in range(steps))
    trainable = sorted(n for n, p in loop.model.named_parameters() if p.requires_grad)
    rate = seen / seconds
    flops_per_sample = flops / batches[0][1].shape[0]
    peak = peak_flops(loop.precision)
    return {"samples_per_second": round(rate, 2), "steps": steps, "batch_size": batch_size, "trainable": trainable,
            "gflops_per_sample": round(flops_per_sample / 1e9, 3), "achieved_tflops": round(rate * flops_per_sample / 1e12, 4),
            "mfu": round(rate * flops_per_sample / peak, 4) if peak else None,
            "peak_gpu_mib": peak_gpu_mib()}


def largest_batch(recipe: str, overrides: list, gib: float, limit: int = 4096) -> dict:
    """The largest batch (a multiple of 8) whose training steps fit in ``gib`` GiB of GPU
    memory, with this process's CUDA allocations capped there for the rest of the
    benchmark, so that every configuration measured runs as it would on that card."""
    budget = memory_budget(gib)
    loop = ReferenceLoop(load_recipe(recipe, list(overrides) + [f"data.max_train_samples={limit}"]))
    probes = []

    def fits(batch_size: int) -> bool:  # with 10% to spare: runs after others in one process meet a fragmented cache
        torch.cuda.reset_peak_memory_stats()
        ok = loop.fits(batch_size) and torch.cuda.max_memory_reserved() <= 0.9 * budget
        probes.append({"batch_size": batch_size, "fits": ok, "peak_gpu_mib": peak_gpu_mib()})
        return ok

    size = largest_fitting(fits, limit=min(limit, len(loop.rows) // GPU_BATCHES))
    loop = None  # the model and its optimizer state go before the runs measured under the cap
    torch.cuda.empty_cache()
    if not size:
        raise MMPeftError(f"--memory-budget-gb {gib}: not even a batch of 8 fits in {gib} GiB for this recipe")
    return {"budget_gib": gib, "budget_bytes": budget, "batch_size": size, "probes": probes}


def peak_gpu_mib() -> float | None:
    """This process's peak CUDA allocation since the last reset (None without a GPU)."""
    return round(peak_memory_mib(torch.device("cuda")), 1) if torch.cuda.is_available() else None


def _step_flops(model, batch, dtype, label_smoothing: float) -> int:
    """FLOPs of one training step's forward and backward passes on ``batch``, as PyTorch's
    own counter (torch.utils.flop_counter: matmuls, convolutions, attention) counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    inputs, labels = batch
    device = labels.device.type
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            logits = next(iter(model(inputs).values()))  # the one task's (a vqa / classification recipe)
        F.cross_entropy(logits.float(), labels, ignore_index=-1, label_smoothing=label_smoothing).backward()
    return counter.get_total_flops()
