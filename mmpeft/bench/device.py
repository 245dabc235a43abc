"""What ``mmpeft bench throughput`` measures only on a GPU: how busy the GPU is, its peak
FLOP/s for model FLOPs utilisation, the largest batch that fits a memory budget, and the
BERT-base + ViT-B/16-sized configuration the issue's GPU targets name."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from .memory import build_bases

# Dense peak FLOP/s (NVIDIA datasheets, SXM parts, no sparsity) for model FLOPs utilisation.
PEAK_TFLOPS = {"H200": {"bf16": 989.4, "fp16": 989.4, "no": 66.9}, "H100": {"bf16": 989.4, "fp16": 989.4, "no": 66.9},
               "A100": {"bf16": 312.0, "fp16": 312.0, "no": 19.5}, "L4": {"bf16": 121.0, "fp16": 121.0, "no": 30.3}}


def peak_flops(precision: str) -> float | None:
    """The visible GPU's peak FLOP/s for ``precision`` (None on a CPU or an unlisted GPU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    row = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return row[precision] * 1e12 if row and precision in row else None


class GpuBusy:
    """How busy the GPU is, sampled on a thread: every ``interval`` seconds ``read()`` gives
    NVML's utilisation (the percentage of its last sample period in which a kernel ran:
    what nvidia-smi shows), kept with the wall-clock time it was read.
    :meth:`share` averages the samples of a time window, so a benchmark can score one epoch
    and not the model's loading or the bundle's writing around it."""

    def __init__(self, read: Optional[Callable[[], float]] = None, interval: float = 0.1):
        self.read = read or (lambda: torch.cuda.utilization(torch.cuda.current_device()))
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self.error: Optional[str] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.time(), float(self.read())))
            except Exception as exc:  # no NVML (nvidia-ml-py) or no permission: said in the row, not a lost benchmark
                self.error = f"{type(exc).__name__}: {exc}"
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> "GpuBusy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def share(self, start: float, end: float) -> Optional[float]:
        """Mean utilisation (0-1) of the samples read between ``start`` and ``end`` (unix time)."""
        inside = [u for t, u in self.samples if start <= t <= end]
        return round(sum(inside) / len(inside) / 100, 3) if inside else None


def largest_fitting(fits: Callable[[int], bool], start: int = 8, limit: int = 4096, multiple: int = 8) -> int:
    """The largest batch size (a multiple of ``multiple``, at most ``limit``) for which
    ``fits`` holds, assuming it holds for every smaller one: doubling from ``start`` to the
    first failure, then bisection between the last fit and that failure. 0 if ``start``
    already fails."""
    if not fits(start):
        return 0
    good, bad = start, None
    while bad is None and good < limit:
        trial = min(good * 2, limit)
        if fits(trial):
            good = trial
        else:
            bad = trial
    while bad is not None and bad - good > multiple:
        middle = (good + bad) // 2 // multiple * multiple
        if middle <= good:
            break
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good


def base_sized_overrides(folder: Path, small: bool = False) -> list[str]:
    """Recipe overrides that swap the encoders for BERT-base- and ViT-B/16-sized ones with
    random weights (built under ``folder``; speed does not depend on the weights' values),
    LoRA rank 8 on both, 224 px images and 32 tokens: the configuration of the memory
    benchmark and of the issue's GPU targets. ``small``: the same architectures at two
    layers of width 64, to check the path on a CPU."""
    text, image = build_bases(folder, small=small)
    lora = "{method: lora, rank: 8, alpha: 16}"
    return [f"encoders.text.model={text}", "encoders.text.max_length=32", f"encoders.text.peft={lora}",
            f"encoders.image.model={image}", "encoders.image.image_size=224", f"encoders.image.peft={lora}"]


def memory_budget(gib: float) -> int:
    """Cap this process's CUDA allocations at ``gib`` GiB (a smaller card, on a bigger one:
    the allocator then fails where that card would); returns the budget in bytes."""
    total = torch.cuda.get_device_properties(0).total_memory
    budget = int(gib * 2**30)
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), 0)
    return budget
