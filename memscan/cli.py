"""The ``memscan`` command line: the app, its global options and ``main``.

The commands themselves live in :mod:`memscan.commands`, one module each; this module only
assembles them. Entry points: the ``memscan`` script (``memscan.cli:main``) and
``python -m memscan.cli``.
"""

from __future__ import annotations

import importlib
import sys

import typer

from memscan.commands import COMMAND_MODULES
from memscan.commands.common import OPTIONS, console

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Find the training data a generative model has memorized."
)


@app.callback()
def global_options(
    debug: bool = typer.Option(
        False, "--debug", help="on an error, also print the full traceback (with its cause: the user code's exception)"
    ),
) -> None:
    """Find the training data a generative model has memorized."""
    OPTIONS.debug = debug


for _name in COMMAND_MODULES:
    importlib.import_module(f"memscan.commands.{_name}").register(app)


def main() -> None:  # pragma: no cover - console entry point
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
