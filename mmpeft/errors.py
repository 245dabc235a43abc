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

    #: problems listed in the message; the rest are counted (a recipe of 10,000 typos
    #: gets a readable message, not a 10,000-line one)
    SHOWN = 50

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"{len(self.problems)} problem(s){where}:"] + [f"  - {p}" for p in self.problems[: self.SHOWN]]
        if len(self.problems) > self.SHOWN:
            lines.append(f"  ... and {len(self.problems) - self.SHOWN} more")
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


class Interrupted(MMPeftError):
    """A run stopped by SIGINT / SIGTERM after writing a checkpoint; exits 130 / 143 as a
    shell reports a process ended by that signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
