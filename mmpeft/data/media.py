"""The check every audio and video file passes before a decoder opens it (files are untrusted)."""

from __future__ import annotations

import os
import stat


def require_media_file(path: str, error: type[Exception]) -> None:
    """A regular, non-empty file at ``path``: FileNotFoundError when there is none, ``error``
    (saying why) when it cannot be read, is a folder, FIFO or device (which would block a
    decoder or never end), or is empty."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise error(f"not readable ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        raise error("not a regular file (a folder, FIFO or device?)")
    if os.path.getsize(path) == 0:
        raise error("empty file")
