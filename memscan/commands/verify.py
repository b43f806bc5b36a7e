"""``memscan verify RUN``: re-verify a finished run's candidates with other thresholds."""

from __future__ import annotations

from pathlib import Path

import typer

from memscan.commands.common import run_library_call, say


def register(app: typer.Typer) -> None:
    @app.command("verify")
    def verify(
        run: Path = typer.Argument(..., help="run directory"),
        train: Path | None = typer.Option(None, help="training set (default: the one recorded in the run)"),
        delta: float | None = typer.Option(None, help="new extraction threshold"),
        min_clique: int | None = typer.Option(None, help="new clique size threshold (≥ the run's)"),
        n_nearest: int | None = typer.Option(None, help="nearest training images per candidate"),
    ):
        """Re-verify a finished run's candidates with other thresholds, without regenerating."""
        from memscan.extraction.pipeline import reverify

        result = run_library_call(reverify, run, train, delta=delta, min_clique=min_clique, n_nearest=n_nearest)
        c = result.manifest["counts"]
        say(
            f"{c['detections']} detections, {c['extractions']} extractions (δ = {result.manifest['config']['delta']}) → {run}"
        )
