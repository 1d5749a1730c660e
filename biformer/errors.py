"""Errors that mean "the user gave us something we cannot use".

The CLI prints a :class:`UserError` as one line (``biformer <command>: error: ...``) and exits
with status 2. Every other exception is a bug or an environment failure and keeps its traceback.
A message names the offending value and what was expected.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a value, a file or a folder that cannot be used as given."""


class UserValueError(UserError, ValueError):
    """A :class:`UserError` that is also a ``ValueError``, for APIs that document ``ValueError``."""


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A :class:`UserError` for a missing file or folder the user named; also a ``FileNotFoundError``."""
