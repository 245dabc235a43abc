"""Where a training step's time goes: ``train.profile_steps`` runs a few steps under
``torch.profiler`` (as torchtune's profiler component does) and the bundle keeps the
summary (``profile.json``) and the operator table (``profile.txt``).

The figures that answer "why is the GPU idle": the share of the profiled wall time in
which a GPU kernel or copy ran (``device_busy_share``, the union of their spans), kernel
launches per step (each costs the host a few microseconds, so thousands of small launches
make a step launch-bound), and the operators that take the most host and device time.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

TOP = 15  # operators listed in the summary (profile.txt lists more)


class StepProfiler:
    """Call :meth:`step` after every training step; profiles ``steps`` steps after the first
    ``skip`` (which compile, fill caches and warm the allocator) and one warm-up step.
    Inactive (``steps`` 0): every call is a no-op and nothing is synchronised."""

    def __init__(self, steps: int, skip: int, device: torch.device):
        self.steps, self.skip, self.device = steps, skip, device
        self.cuda = device.type == "cuda"
        self.count = 0
        self.summary: Optional[dict] = None
        self.table = ""
        self._prof = None
        self._start = 0.0

    def __enter__(self) -> "StepProfiler":
        if self.steps:
            activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if self.cuda else [])
            schedule = torch.profiler.schedule(skip_first=self.skip, wait=0, warmup=1, active=self.steps, repeat=1)
            self._prof = torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=self._ready)
            self._prof.__enter__()
        return self

    def step(self) -> None:
        if self._prof is None:
            return
        self.count += 1
        if self.count == self.skip + 1:  # the warm-up step has ended: the profiled window starts now
            self._sync()
            self._start = time.perf_counter()
        self._prof.step()

    def __exit__(self, *exc) -> None:
        if self._prof is not None:
            self._prof.__exit__(*exc)
            self._prof = None

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _ready(self, prof) -> None:
        self._sync()
        wall_us = (time.perf_counter() - self._start) * 1e6
        profiled = self.count - self.skip - 1  # fewer than asked when training ended inside the window
        if profiled < 1:
            self.summary = {"steps": 0, "note": f"training ended after {self.count} steps, before the profiled ones"}
            return
        self.summary, self.table = summarize(prof, profiled, wall_us, self.cuda)


def _device_us(e) -> float:
    return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0)


def union_us(spans: list[tuple[float, float]]) -> float:
    """Time covered by at least one span: kernels on several streams may overlap."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def summarize(prof, steps: int, wall_us: float, cuda: bool) -> tuple[dict, str]:
    """The profile's summary (JSON-ready) and its operator table (text)."""
    spans, launches = [], 0
    for e in prof.events():
        kind = str(getattr(e, "device_type", "")).rsplit(".", 1)[-1]
        if kind == "CUDA" and not getattr(e, "is_user_annotation", False):  # a kernel or copy as the GPU ran it
            spans.append((e.time_range.start, e.time_range.end))  # (record_function ranges mirrored on the GPU excluded)
        elif e.name.startswith(("cudaLaunchKernel", "cuLaunchKernel")):
            launches += 1
    device_us = union_us(spans)
    averages = prof.key_averages()
    by_host = sorted(averages, key=lambda a: a.self_cpu_time_total, reverse=True)
    # record_function ranges (ProfilerStep#, Optimizer.step#...) are mirrored on the GPU as
    # spans that hold other kernels: not operators of their own
    by_device = sorted((a for a in averages if not getattr(a, "is_user_annotation", False) and "#" not in a.key
                        and not a.key.startswith("ProfilerStep")), key=_device_us, reverse=True)

    def row(a) -> dict:
        return {"name": a.key[:120], "calls": a.count, "host_self_ms": round(a.self_cpu_time_total / 1e3, 3),
                "device_self_ms": round(_device_us(a) / 1e3, 3)}

    summary = {
        "steps": steps,
        "wall_ms_per_step": round(wall_us / steps / 1e3, 3),
        "device_ms_per_step": round(device_us / steps / 1e3, 3) if cuda else None,
        "device_busy_share": round(min(1.0, device_us / wall_us), 3) if cuda and wall_us > 0 else None,
        "kernel_launches_per_step": round(launches / steps, 1) if cuda else None,
        "top_host": [row(a) for a in by_host[:TOP]],
        "top_device": [row(a) for a in by_device[:TOP] if _device_us(a) > 0] if cuda else [],
    }
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    return summary, averages.table(sort_by=sort, row_limit=40, max_name_column_width=80)


def summary_lines(p: dict) -> list[str]:
    """Markdown lines for a profile summary (used by the bundle card's readers and the benchmarks)."""
    if not p["steps"]:
        return [p["note"] + "."]
    lines = [f"{p['steps']} steps under `torch.profiler`: {p['wall_ms_per_step']} ms a step"]
    if p.get("device_busy_share") is not None:
        lines[0] += (f", of which a GPU kernel or copy ran {p['device_ms_per_step']} ms ({100 * p['device_busy_share']:.0f}%); "
                     f"{p['kernel_launches_per_step']} kernel launches a step")
    lines[0] += "."
    top = p["top_device"] or p["top_host"]
    key = "device_self_ms" if p["top_device"] else "host_self_ms"
    lines += ["", f"| operator | calls | {'device' if p['top_device'] else 'host'} ms (self, all steps) |", "|---|---:|---:|"]
    lines += [f"| `{r['name']}` | {r['calls']} | {r[key]} |" for r in top[:10]]
    return lines
