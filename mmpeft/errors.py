"""User-facing errors.

Every problem a user can fix (a bad recipe, a missing image, a tampered bundle)
is raised as an :class:`MMPeftError`. The CLI prints its message and exits with
its ``exit_code`` instead of showing a traceback.
"""

from __future__ import annotations


class MMPeftError(Exception):
    """A problem with the user's input, with a message that says what to do."""

    exit_code = 1


class RecipeError(MMPeftError):
    """The recipe (or an override) is invalid; ``problems`` lists every issue."""

    exit_code = 2

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"{len(self.problems)} problem(s){where}:"] + [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class DataError(MMPeftError):
    """A data file, row or image cannot be used."""

    exit_code = 2


class BundleError(MMPeftError):
    """A bundle is missing, malformed, tampered with or does not fit its base."""

    exit_code = 2


class UsageError(MMPeftError):
    """A command-line option has a value the command cannot use."""

    exit_code = 2
