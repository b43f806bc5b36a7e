"""The ``memscan`` command line: each command parses options and calls one library function."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from memscan.errors import MemscanError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Find the training data a generative model has memorized."
)
console = Console(stderr=True)


def _fail(exc: BaseException) -> None:
    msg = exc.message if isinstance(exc, MemscanError) else str(exc)
    hint = getattr(exc, "hint", None)
    console.print(
        f"[bold red]error:[/] {msg}" + (f" — {hint}" if hint else ""), markup=True, highlight=False, soft_wrap=True
    )
    raise typer.Exit(code=2)


def _run(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except MemscanError as exc:
        _fail(exc)


@app.command()
def extract(
    model: str = typer.Option(..., "--model", help="diffusers directory / hub id, or py:module:attribute"),
    prompts: Path = typer.Option(
        ..., "--prompts", help="text file (one prompt a line) or CSV/Parquet with prompt_id, prompt"
    ),
    train: Path = typer.Option(
        ..., "--train", help="training images: a folder or a CSV/Parquet manifest (id, path, caption)"
    ),
    out: Path = typer.Option(..., "--out", help="run directory to write"),
    samples_per_prompt: int | None = typer.Option(None, help="generations per prompt [500]"),
    grid: int | None = typer.Option(None, help="tiles per side for tiled ℓ2 [4]"),
    alpha: float | None = typer.Option(None, help="edge threshold on tiled ℓ2 [0.08]"),
    min_clique: int | None = typer.Option(None, help="clique size that flags a prompt [10]"),
    delta: float | None = typer.Option(None, help="extraction threshold on tiled ℓ2 [0.15]"),
    seed: int | None = typer.Option(None, help="run seed [0]"),
    batch_size: int | None = typer.Option(None, help="generations per model call [64]"),
    shard_size: int | None = typer.Option(None, help="prompts per shard [8]"),
    device: str | None = typer.Option(None, help="cpu or cuda [cpu]"),
    resume: bool = typer.Option(False, "--resume", help="finish a killed run in --out"),
    config: Path | None = typer.Option(None, "--config", help="TOML file with these options (an \\[extract] table or top-level keys)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
):
    """Generate many images per prompt, find cliques of near-copies, verify them against the training set."""
    from memscan.extraction.config import ExtractConfig
    from memscan.extraction.pipeline import extract as run_extract
    from memscan.generators.load import load_generator

    try:
        cfg = ExtractConfig.from_sources(
            config,
            samples_per_prompt=samples_per_prompt,
            grid=grid,
            alpha=alpha,
            min_clique=min_clique,
            delta=delta,
            seed=seed,
            batch_size=batch_size,
            shard_size=shard_size,
            device=device,
        )
        gen = load_generator(model, device=cfg.device, batch_size=cfg.batch_size)
        result = run_extract(gen, prompts, train, out, cfg, resume=resume, progress=not quiet)
    except MemscanError as exc:
        _fail(exc)
    c = result.manifest["counts"]
    typer.echo(
        f"{c['prompts']} prompts, {c['samples']} generations: {c['detections']} detections, {c['extractions']} extractions → {out}"
    )


@app.command()
def verify(
    run: Path = typer.Argument(..., help="run directory"),
    train: Path | None = typer.Option(None, help="training set (default: the one recorded in the run)"),
    delta: float | None = typer.Option(None, help="new extraction threshold"),
    min_clique: int | None = typer.Option(None, help="new clique size threshold (≥ the run's)"),
    n_nearest: int | None = typer.Option(None, help="nearest training images per candidate"),
):
    """Re-verify a finished run's candidates with other thresholds, without regenerating."""
    from memscan.extraction.pipeline import reverify

    result = _run(reverify, run, train, delta=delta, min_clique=min_clique, n_nearest=n_nearest)
    c = result.manifest["counts"]
    typer.echo(
        f"{c['detections']} detections, {c['extractions']} extractions (δ = {result.manifest['config']['delta']}) → {run}"
    )


@app.command()
def report(
    run: Path = typer.Argument(..., help="run directory"),
    out: Path | None = typer.Option(None, help="output HTML path"),
):
    """Write report.html from the run's tables alone."""
    from memscan.report.html import build_report

    path = _run(build_report, run, out)
    typer.echo(str(path))


demo_app = typer.Typer(
    help="The embedded demo: a small diffusion model with planted duplicates.", invoke_without_command=True
)
app.add_typer(demo_app, name="demo")


@demo_app.callback()
def demo(
    ctx: typer.Context,
    out: Path = typer.Option(Path("runs/demo"), "--out", help="run directory"),
    samples_per_prompt: int | None = typer.Option(None, help="generations per prompt"),
    quick: bool = typer.Option(False, "--quick", help="reduced run (CI): fewer prompts and samples"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
):
    """Run the whole pipeline on the shipped demo model and data (no network, CPU, minutes)."""
    if ctx.invoked_subcommand is not None:
        return
    from memscan.demo.run import run_demo

    summary = _run(run_demo, out, samples_per_prompt=samples_per_prompt, quick=quick, progress=not quiet)
    typer.echo(summary["text"])


@demo_app.command("train")
def demo_train(
    out: Path = typer.Option(Path("memscan/demo/model"), "--out", help="model directory to write"),
    steps: int | None = typer.Option(None, help="training steps"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
):
    """Retrain the demo model from its recorded recipe."""
    from memscan.demo.run import train_model

    rec = _run(train_model, out, steps=steps, device=device)
    typer.echo(f"trained in {rec['training']['seconds']} s → {out}")


def _register_commands() -> None:
    import importlib

    from memscan.commands import COMMAND_MODULES

    for name in COMMAND_MODULES:
        importlib.import_module(f"memscan.commands.{name}").register(app)


_register_commands()


def main() -> None:  # pragma: no cover - console entry point
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
