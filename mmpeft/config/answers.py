"""How answers compare: case- and spacing-insensitively (torch-free, so the rows of a
dataset are read and checked by ``mmpeft validate`` without loading a model)."""

from __future__ import annotations

import re

_SPACES = re.compile(r"\s+")


def normalize_answer(answer) -> str:
    """Answers are compared case- and spacing-insensitively; numbers become strings."""
    return _SPACES.sub(" ", str(answer).strip().lower())
