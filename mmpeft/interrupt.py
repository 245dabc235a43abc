"""Stop a run cleanly on Ctrl-C (SIGINT) or SIGTERM.

The first signal only raises a flag: the training loop finishes the step it is in,
writes a checkpoint and stops (exit 130 / 143, with the command that resumes). A second
SIGINT stops at once (KeyboardInterrupt); every file is written through a temporary path
and a rename, so even then nothing is left half-written.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopRequest:
    """Which signal asked the run to stop (None: none did)."""

    def __init__(self):
        self.signal: Optional[int] = None

    def __bool__(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else ""

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signal, 1)


@contextmanager
def stop_on_signals(notice=print) -> Iterator[StopRequest]:
    """Within the block, SIGINT / SIGTERM set the returned request instead of killing the
    process; a second SIGINT (or SIGTERM) raises KeyboardInterrupt. Outside the main thread
    (signals cannot be caught there) the request simply stays unset."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):
        if request:
            raise KeyboardInterrupt
        request.signal = signum
        notice(f"{signal.Signals(signum).name} received: finishing this step, then writing a checkpoint "
               "(press Ctrl-C again to stop at once)")

    previous = {s: signal.signal(s, handler) for s in EXIT_CODES}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
