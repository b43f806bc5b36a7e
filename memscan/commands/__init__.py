"""Further CLI commands, one module each. Every module defines ``register(app: typer.Typer)``,
which adds its commands; ``memscan.cli`` calls it for every module listed in ``COMMAND_MODULES``."""

#: Modules of this package that add commands (in help order).
COMMAND_MODULES: list[str] = ["index", "candidates", "unconditional", "triage", "mia"]
