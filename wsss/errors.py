"""Errors that come from user input rather than from bugs.

The CLI prints a `UserError` as one line (no traceback) and exits 2, so every message must name
the file or field at fault and say what was expected.
"""


class UserError(Exception):
    """Bad input (a file, a config field, a flag): reported to the user without a traceback."""


class DataError(UserError):
    """A dataset file is missing, unreadable or inconsistent."""


def first_line(error: BaseException) -> str:
    """An error's first line, for a one-line message (its type when it has no text)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
