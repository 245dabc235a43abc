"""Benchmarks run as commands (``mmpeft bench ...``), never as timed tests; each prints the
machine and settings beside its figures. Shared pieces are in :mod:`mmpeft.bench.common`."""
