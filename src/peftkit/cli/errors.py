"""User errors: problems with what the user gave us, reported as one line and exit code 2.

Bugs keep their traceback; input problems never show one. Library code raises ``ValueError`` /
``FileNotFoundError`` with messages written for people (what was expected, what was found, what to
do), so the CLI reports those as user errors too. ``PEFTKIT_DEBUG=1`` shows the traceback anyway.
"""

from __future__ import annotations

import difflib

EXIT_USER_ERROR = 2
USER_ERROR_TYPES = (ValueError, FileNotFoundError, NotADirectoryError, ImportError, KeyError)


class UserError(Exception):
    """Something the user can fix; the message says what and how."""


def did_you_mean(word: str, choices) -> str:
    """``"; did you mean 'x'?"`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.5)  # YAML may give ints
    return f"; did you mean {close[0]!r}?" if close else ""


def one_line(error: BaseException) -> str:
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(text.split()) or type(error).__name__
