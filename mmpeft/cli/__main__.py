"""``python -m mmpeft.cli``: the same as the ``mmpeft`` command (benchmarks and tests start
runs this way, with the interpreter they run under)."""

from .commands import main

main()
