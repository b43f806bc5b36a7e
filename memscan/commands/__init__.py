"""The ``memscan`` commands, one module each (``common`` holds what they share).

Every command module defines ``register(app: typer.Typer)``, which adds its command(s) or its
sub-app (``demo``); :mod:`memscan.cli` calls it for every module listed in ``COMMAND_MODULES``.
Command modules parse options, call one library function and format its result; they import
:mod:`memscan.commands.common`, never each other and never :mod:`memscan.cli`.

Adding a command = one module here with ``register`` + one entry in ``COMMAND_MODULES``.
"""

#: Modules of this package that add commands (in help order).
COMMAND_MODULES: list[str] = [
    "extract",
    "verify",
    "report",
    "index",
    "candidates",
    "unconditional",
    "triage",
    "audit",
    "mia",
    "lm",
    "compare",
    "demo",
]
