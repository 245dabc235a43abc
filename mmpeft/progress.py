"""Progress that reads well wherever it goes.

On a terminal: tqdm's bars. Written to a file or a pipe (a log, CI, ``nohup``): one plain
line at a modest interval (30 s, or ``$MMPEFT_PROGRESS_SECONDS``) and one when the loop
ends, instead of thousands of carriage-return updates, so a 40-epoch log can be read and
grepped.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Optional

from tqdm.auto import tqdm


def _interval() -> float:
    try:
        return float(os.environ.get("MMPEFT_PROGRESS_SECONDS", "30"))
    except ValueError:
        return 30.0


class LineProgress:
    """A tqdm stand-in for non-terminals: ``desc: 120/282 (43%), 1.6 batch/s, loss=0.31``."""

    def __init__(self, iterable: Optional[Iterable] = None, desc: str = "", total: Optional[int] = None, unit: str = "it",
                 leave: bool = True, stream=None, interval: Optional[float] = None):
        self.iterable = iterable
        self.desc = desc
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.unit = unit
        self.leave = leave
        self.stream = stream or sys.stderr
        self.interval = _interval() if interval is None else interval
        self.n = 0
        self.postfix = ""
        self.start = self.last = time.perf_counter()
        self.closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __len__(self):
        return self.total or 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            self._line()

    def _line(self) -> None:
        elapsed = max(1e-9, time.perf_counter() - self.start)
        done = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        parts = [f"{self.desc}: {done}", f"{self.n / elapsed:.1f} {self.unit}/s", f"{elapsed:.0f} s"]
        if self.total and 0 < self.n < self.total:  # time left at the rate so far
            parts.append(f"{(self.total - self.n) * elapsed / self.n:.0f} s left")
        if self.postfix:
            parts.append(self.postfix)
        print(", ".join(parts), file=self.stream, flush=True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.leave and self.n:
                self._line()


def progress(iterable: Optional[Iterable] = None, desc: str = "", total: Optional[int] = None, unit: str = "it",
             leave: bool = True, disable: bool = False):
    """tqdm on a terminal, :class:`LineProgress` elsewhere; a plain pass-through when disabled."""
    if disable:
        return LineProgress(iterable, desc, total, unit, leave=False, interval=float("inf"))
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave)
    return LineProgress(iterable, desc, total, unit, leave=leave)
