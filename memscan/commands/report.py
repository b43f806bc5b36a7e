"""``memscan report RUN``: report.html from a run's tables alone."""

from __future__ import annotations

from pathlib import Path

import typer

from memscan.commands.common import run_library_call


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(
        run: Path = typer.Argument(..., help="run directory"),
        out: Path | None = typer.Option(None, help="output HTML path"),
    ):
        """Write report.html from the run's tables alone."""
        from memscan.report.registry import build_report

        path = run_library_call(build_report, run, out)
        typer.echo(str(path))
