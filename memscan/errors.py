"""Errors that say what was wrong and what to do about it."""

from __future__ import annotations


class MemscanError(Exception):
    """An error caused by user input or configuration.

    The CLI prints these as one line (``error: <message>``) and exits non-zero, without a
    traceback. ``hint`` says what to do.
    """

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message} ({hint})")


class InputError(MemscanError, ValueError):
    """A user-supplied input (file, array, option) is invalid."""
