"""What every command module shares: the error console, clean failure, the global options.

Command modules import from here, never from each other and never from :mod:`memscan.cli`.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import typer
from rich.console import Console
from rich.markup import escape

from memscan.devices import DTYPE_CHOICES, precision
from memscan.errors import MemscanError, user_code

#: Messages, progress and errors go to stderr; results (one summary line) to stdout.
console = Console(stderr=True, emoji=False)  # ":dog:" in a prompt or "py:train:build" stays as typed


@dataclass
class GlobalOptions:
    """Options given before the command (``memscan --debug extract …``); set by the app callback."""

    debug: bool = False


OPTIONS = GlobalOptions()


def say(text, *, err: bool = False) -> None:
    """Print a command's result to stdout (``err``: a note to stderr), each line with its control
    characters escaped (:func:`memscan.store.escape_controls`): nothing printed can clear the
    terminal, move its cursor or colour it. (A value read from an untrusted file — a run label — is
    escaped where it is put in the text, newlines included, so that it cannot start a line.)"""
    from memscan.store import escape_controls

    typer.echo("\n".join(escape_controls(line) for line in str(text).split("\n")), err=err)


def given(ctx: typer.Context, name: str) -> bool:
    """Whether the option whose parameter is ``name`` was given (command line or environment),
    not left at its default: an option that only applies with another one is refused when given
    alone rather than taken and ignored."""
    source = ctx.get_parameter_source(name)
    if source is None:
        raise KeyError(f"the command has no option {name!r}")
    return source.name in ("COMMANDLINE", "ENVIRONMENT")


def fail(exc: BaseException) -> None:
    """End the command with one line, ``error: <what was wrong> — <what to do>``, exit code 2.

    With ``memscan --debug`` the full traceback (its cause included: the user's exception behind
    a :class:`~memscan.errors.UserCodeError`) is printed first.
    """
    if OPTIONS.debug:
        typer.echo("".join(traceback.format_exception(exc)).rstrip(), err=True)
    msg = exc.message if isinstance(exc, MemscanError) else str(exc)
    hint = getattr(exc, "hint", None)
    console.print(
        f"[bold red]error:[/] {escape(msg)}" + (f" — {escape(hint)}" if hint else ""),  # keeps [brackets]: memscan[ray]
        markup=True,
        highlight=False,
        soft_wrap=True,
    )
    raise typer.Exit(code=2)


@contextmanager
def clean_errors() -> Iterator[None]:
    """A :class:`MemscanError` (bad input, or user code that failed) inside the block ends the
    command through :func:`fail`."""
    try:
        yield
    except MemscanError as exc:
        fail(exc)


def run_library_call(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; a :class:`MemscanError` ends the command through :func:`fail`."""
    with clean_errors():
        return fn(*args, **kwargs)


def loading_user_model(spec: str):
    """A block that loads the model ``spec``: an exception from its code (a ``py:`` factory, a
    broken checkpoint) becomes one :class:`~memscan.errors.UserCodeError` line."""
    return user_code(f"loading the model {spec} failed", "fix the model (or its py: function) and rerun")


def quiet_option(help: str = "no progress bars") -> bool:
    """The ``--quiet`` option every long-running command has."""
    return typer.Option(False, "--quiet", help=help)


def resume_option() -> bool:
    """``--resume``: finish a killed (or failed) run in ``--out``."""
    return typer.Option(False, "--resume", help="finish a killed run in --out")


# ---- the runner options every model-heavy command shares (memscan.runners) ---------------------
def runner_option(unit: str = "shards") -> str:
    """``--runner local|ray``."""
    return typer.Option("local", "--runner", help=f"local, or ray: {unit} on a pool of Ray actors (memscan\\[ray])")


def ray_address_option() -> str | None:
    """``--ray-address``: an existing Ray cluster."""
    return typer.Option(
        None,
        "--ray-address",
        help="runner ray: existing cluster (auto, HOST:6379, ray://HOST:10001) \\[start a local Ray]",
    )


def num_workers_option(load: str = "one model load each") -> int | None:
    """``--num-workers``: Ray workers."""
    return typer.Option(None, "--num-workers", help=f"runner ray: workers, {load} \\[as many as the cluster fits]")


def gpus_per_worker_option() -> float | None:
    """``--gpus-per-worker``: GPUs each Ray worker asks for."""
    return typer.Option(
        None, "--gpus-per-worker", help="runner ray: GPUs each worker asks for [1 with --device cuda, else 0]"
    )


# ---- --dtype: one set of spellings for every command that has it ---------------------------------
_SHORT = {"auto": "auto", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def canonical_dtype(value: str | None, family: str) -> str | None:
    """The ``--dtype`` value a command passes on (and records), from any spelling of
    :data:`DTYPE_SPELLINGS`; an :class:`~memscan.errors.InputError` naming ``--dtype`` and the
    accepted values for any other.

    ``family`` is the library that reads it: ``"image"`` (diffusers pipelines: the short names,
    any case) or ``"lm"`` (causal LMs: short and torch names, lower case). A spelling the library
    already read is passed on unchanged — the manifests record ``--dtype`` as given, and a run
    resumes only under the same record — and any other becomes the library's name for the same
    precision: ``float16`` → ``fp16`` for images, ``FP16`` → ``fp16`` for language models.

    Examples
    --------
    >>> canonical_dtype("float16", "image"), canonical_dtype("fp16", "image"), canonical_dtype("BFloat16", "image")
    ('fp16', 'fp16', 'bf16')
    >>> canonical_dtype("fp16", "lm"), canonical_dtype("float16", "lm"), canonical_dtype("Float16", "lm")
    ('fp16', 'float16', 'float16')
    """
    if value is None:
        return None
    name, key = precision(value), str(value).lower()  # a bad value: one error naming --dtype
    if family == "image":
        return value if key in _SHORT.values() else _SHORT[name]
    return key


def dtype_option(family: str, default: str | None = "auto", help: str | None = None) -> str | None:
    """``--dtype``: every spelling of :data:`DTYPE_SPELLINGS`, made :func:`canonical_dtype` as
    the command line is read (a bad value is one error before any work)."""

    def check(value: str | None) -> str | None:
        try:
            return canonical_dtype(value, family)
        except MemscanError as exc:
            fail(exc)

    return typer.Option(default, "--dtype", help=help or DTYPE_CHOICES, callback=check)
