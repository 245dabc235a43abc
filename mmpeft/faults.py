"""Fault injection for the kill-and-resume tests and ``mmpeft bench faults``.

``MMPEFT_KILL_AT=<point>`` (or ``<point>#<n>`` for the n-th time the point is reached)
makes the process kill itself with SIGKILL there: no handler, no clean-up, exactly what
an out-of-memory kill or a lost machine does. ``MMPEFT_KILL_SIGNAL=INT`` (or ``TERM``)
sends that signal instead, as Ctrl-C or a scheduler would; ``MMPEFT_KILL_RANK=<r>`` only in
process ``r`` of a multi-process run (``$RANK``, as launchers set it). Unset (always, outside
those tests) a point costs one string comparison.

Points: ``data.checked`` (data and images checked), ``train.step`` (after an optimizer
step), ``checkpoint.writing`` (a checkpoint's files written, not yet sealed), ``eval``
(inside a validation pass), ``test`` (inside the test pass), ``bundle.writing`` (the
bundle's files written, not yet sealed), ``bundle.written`` (the bundle in place, the
checkpoints not yet removed).
"""

from __future__ import annotations

import os
import signal

POINTS = ("data.checked", "train.step", "checkpoint.writing", "eval", "test", "bundle.writing", "bundle.written")
_TARGET = os.environ.get("MMPEFT_KILL_AT", "")
_SIGNAL = getattr(signal, "SIG" + os.environ.get("MMPEFT_KILL_SIGNAL", "KILL"), signal.SIGKILL)
_RANK = os.environ.get("MMPEFT_KILL_RANK")
_seen: dict[str, int] = {}


def point(name: str) -> None:
    """Kill this process here if ``$MMPEFT_KILL_AT`` names this point (and count)."""
    if not _TARGET or not _TARGET.startswith(name):
        return
    _seen[name] = _seen.get(name, 0) + 1
    target, _, count = _TARGET.partition("#")
    if target == name and _seen[name] == (int(count) if count else 1) and _RANK in (None, os.environ.get("RANK", "0")):
        os.kill(os.getpid(), _SIGNAL)
