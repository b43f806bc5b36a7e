"""``memscan compare``: finished runs side by side, memorization against an attribute, overlap,
and memorization vs outliers (``OUT/compare.parquet``, ``OUT/compare.html``)."""

from __future__ import annotations

from pathlib import Path

import typer

from memscan.commands.common import quiet_option, resume_option, run_library_call, say
from memscan.commands.formatting import compare_summary
from memscan.compare.runs import COMPARABLE_KINDS


def _labels(items: list[str]) -> dict[str, str]:
    from memscan.errors import InputError

    out = {}
    for it in items:
        run, sep, text = it.partition("=")
        if not sep or not run:
            raise InputError(f"--label {it!r} is not RUN=TEXT", "e.g. --label runs/ckpt-1000='1k steps'")
        if run in out:
            raise InputError(f"--label names run {run} twice", "give each run one --label RUN=TEXT")
        out[run] = text
    return out


def register(app: typer.Typer) -> None:
    @app.command("compare")
    def compare(
        runs: list[Path] = typer.Argument(
            ...,
            help="finished runs (≥ 2) of kinds " + ", ".join(COMPARABLE_KINDS),
        ),
        out: Path = typer.Option(..., "--out", help="the comparison's run directory"),
        by: str = typer.Option(
            "step",
            "--by",
            help="attribute memorization is fitted against (log10): params, step (training step), train_size, "
            "or label (a numeric --label)",
        ),
        label: list[str] = typer.Option(
            [], "--label", help="RUN=TEXT: the name shown for a run (repeatable) \\[the run's folder name]"
        ),
        allow_mismatch: bool = typer.Option(
            False,
            "--allow-mismatch",
            help="compare runs of one kind made with different thresholds or data; they are flagged in the table "
            "and the page \\[refused]",
        ),
        k: int = typer.Option(5, "--k", help="neighbour of the k-NN outlier score (Ramaswamy et al. 2000)"),
        index: Path | None = typer.Option(
            None,
            "--index",
            help="training index (memscan index) of image runs: the outlier score is the k-NN cosine distance "
            "between its embeddings, to its training images [pixels in [0, 1] (TF-IDF for text), to each "
            "run's member examples]",
        ),
        resume: bool = resume_option(),
        quiet: bool = quiet_option(),
    ):
        """Compare finished runs: counts, rates and MIA metrics side by side; extraction rate by duplicate
        count; which training items each run memorized and the overlap; memorization against parameters,
        training step, training-set size or a label with a log-linear fit; memorization vs outliers."""
        from memscan.compare.run import compare_runs

        res = run_library_call(
            lambda: compare_runs(
                [str(r) for r in runs],
                out,
                by=by,
                labels=_labels(label),
                allow_mismatch=allow_mismatch,
                k=k,
                index=index,
                resume=resume,
                progress=not quiet,
            )
        )
        say(compare_summary(res))
