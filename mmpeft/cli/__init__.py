"""The ``mmpeft`` command line (``mmpeft.cli:main``): the commands in ``commands``, the
benchmarks in ``bench``, what they share in ``common``."""

from .commands import app, main

__all__ = ["app", "main"]
