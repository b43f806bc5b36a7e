"""``memscan report RUN``: report.html from a run's tables alone (``--outliers``: first score a
memscore / MIA run's examples for outlyingness and record it in the run)."""

from __future__ import annotations

from pathlib import Path

import typer

from memscan.commands.common import run_library_call, say


def _report(run: Path, out: Path | None, outliers: bool, index: Path | None, k: int | None) -> Path:
    from memscan.errors import InputError
    from memscan.report.registry import build_report

    if not outliers and (index is not None or k is not None):  # given at all, whatever the value
        raise InputError("--index and --k set the outlier score", "add --outliers (or drop them)")
    if outliers:
        from memscan.compare.example_outliers import write_run_outliers
        from memscan.compare.outliers import DEFAULT_K

        write_run_outliers(run, DEFAULT_K if k is None else k, index)
    return build_report(run, out)


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(
        run: Path = typer.Argument(..., help="run directory"),
        out: Path | None = typer.Option(None, help="output HTML path"),
        outliers: bool = typer.Option(
            False,
            "--outliers",
            help="memscore / mia / inpaint / demo-mia / lm-mia runs: first score every example by its k-NN "
            "distance to the other training examples (RUN/outliers.parquet, outliers.json; recomputed if "
            "present) so that the page shows memorization vs outliers \\[off: shown only if the run has them]",
        ),
        index: Path | None = typer.Option(
            None,
            "--index",
            help="with --outliers: a training index (memscan index): distances between its embeddings, to "
            "its training images [pixels in [0, 1] (TF-IDF for text), to the run's member examples]",
        ),
        k: int | None = typer.Option(None, "--k", help="with --outliers: the neighbour of the k-NN distance [5]"),
    ):
        """Write report.html from the run's tables alone."""
        path = run_library_call(_report, run, out, outliers, index, k)
        say(str(path))
