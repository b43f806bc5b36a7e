"""Errors that say what was wrong and what to do about it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


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


#: What to do after user code failed mid-run: the committed shards are kept.
RESUME_HINT = "fix it, then rerun the same command with --resume to continue after the committed shards"


class UserCodeError(MemscanError):
    """An exception raised by the user's code: the model, a generator, a ``py:`` function (a bug,
    CUDA out of memory, …).

    The message names where it happened (the prompt, shard or sample range) and the original
    exception's type and first line; the original exception is kept as ``__cause__`` (``memscan
    --debug`` prints its traceback). The constructor takes ``(message, hint)`` like every
    :class:`MemscanError`, so the Ray runner can rebuild it in the driver.
    """


def first_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` (CUDA errors span several lines), at most ``limit`` chars."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


@contextmanager
def user_code(where: str, hint: str = RESUME_HINT) -> Iterator[None]:
    """Turn an exception from user code inside the block into a :class:`UserCodeError`.

    ``where`` says what was being done, e.g. ``"the generator failed on prompt p3 in shard 1"``.
    A :class:`MemscanError` raised by user code passes through unchanged, and so do
    ``KeyboardInterrupt`` and ``SystemExit`` (not ``Exception``).
    """
    try:
        yield
    except MemscanError:
        raise
    except Exception as exc:
        if "out of memory" in str(exc).lower():
            hint = (
                f"lower --batch-size (or free the device); then {hint.removeprefix('fix it, then ')} "
                "(`memscan extract` resumes at the lower batch size; a run kind whose numbers depend on it "
                "refuses it, naming batch_size: free the device instead)"
            )
        raise UserCodeError(f"{where}: {first_line(exc)}", hint) from exc
