"""The ``memscan`` command line: each command parses options and calls one library function."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from memscan.errors import MemscanError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Find the training data a generative model has memorized."
)
console = Console(stderr=True)


def _fail(exc: BaseException) -> None:
    msg = exc.message if isinstance(exc, MemscanError) else str(exc)
    hint = getattr(exc, "hint", None)
    console.print(
        f"[bold red]error:[/] {escape(msg)}" + (f" — {escape(hint)}" if hint else ""),  # keeps [brackets]: memscan[ray]
        markup=True,
        highlight=False,
        soft_wrap=True,
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
    adaptive: bool | None = typer.Option(
        None, "--adaptive/--full-budget", help="sample in rounds, stop prompts with no pair within alpha [off]"
    ),
    first_round: int | None = typer.Option(None, help="adaptive: generations before the first decision [50]"),
    round_size: int | None = typer.Option(None, help="adaptive: generations per further round [50]"),
    continue_clique: int | None = typer.Option(None, help="adaptive: continue while the clique has ≥ this [2]"),
    stop_when_detected: bool | None = typer.Option(
        None, "--stop-when-detected/--no-stop-when-detected", help="adaptive: stop once flagged [on]"
    ),
    steps: int | None = typer.Option(None, help="sampler steps per image (diffusers models) [model's]"),
    guidance_scale: float | None = typer.Option(None, help="classifier-free guidance scale [model's]"),
    scheduler: str | None = typer.Option(
        None, help="text-to-image: ddim, ddpm, pndm, euler, euler-ancestral, dpm++, unipc, lms"
    ),
    dtype: str | None = typer.Option(None, help="text-to-image: auto, fp32, fp16, bf16 [auto: fp16 on cuda]"),
    height: int | None = typer.Option(None, help="text-to-image: output height [native]"),
    width: int | None = typer.Option(None, help="text-to-image: output width [native]"),
    resume: bool = typer.Option(False, "--resume", help="finish a killed run in --out"),
    runner: str = typer.Option(
        "local", "--runner", help="local, or ray: shards on a pool of Ray actors (memscan[ray])"
    ),
    ray_address: str | None = typer.Option(
        None,
        "--ray-address",
        help="runner ray: existing cluster (auto, HOST:6379, ray://HOST:10001) [start a local Ray]",
    ),
    num_workers: int | None = typer.Option(
        None, "--num-workers", help="runner ray: workers, one model load each [as many as the cluster fits]"
    ),
    gpus_per_worker: float | None = typer.Option(
        None, "--gpus-per-worker", help="runner ray: GPUs each worker asks for [1 with --device cuda, else 0]"
    ),
    config: Path | None = typer.Option(
        None, "--config", help="TOML file with these options (an \\[extract] table or top-level keys)"
    ),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
):
    """Generate many images per prompt, find cliques of near-copies, verify them against the training set."""
    from memscan.extraction.config import ExtractConfig
    from memscan.extraction.pipeline import extract as run_extract
    from memscan.generators.load import load_generator
    from memscan.runners.base import GeneratorSpec
    from memscan.runners.ray_runner import RayOptions

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
            adaptive=adaptive,
            first_round=first_round,
            round_size=round_size,
            continue_clique=continue_clique,
            stop_when_detected=stop_when_detected,
        )
        gen_options = {
            "num_inference_steps": steps,
            "guidance_scale": guidance_scale,
            "scheduler": scheduler,
            "dtype": dtype,
            "height": height,
            "width": width,
        }
        gen_options = {k: v for k, v in gen_options.items() if v is not None}
        ray_options = RayOptions.from_cli(
            runner, address=ray_address, num_workers=num_workers, gpus_per_worker=gpus_per_worker, device=cfg.device
        )
        if runner == "ray":  # each Ray worker loads its own model from the spec
            gen = GeneratorSpec(model, {"device": cfg.device, "batch_size": cfg.batch_size, **gen_options})
        else:
            gen = load_generator(model, device=cfg.device, batch_size=cfg.batch_size, **gen_options)
        result = run_extract(
            gen, prompts, train, out, cfg, resume=resume, progress=not quiet, runner=runner, runner_options=ray_options
        )
    except MemscanError as exc:
        _fail(exc)
    c = result.manifest["counts"]
    typer.echo(
        f"{c['prompts']} prompts, {c['samples']} generations: {c['detections']} detections, {c['extractions']} extractions → {out}"
    )
    if cfg.adaptive:
        budget = c["prompts"] * cfg.samples_per_prompt
        typer.echo(f"adaptive budget: {c['samples']} of {budget} generations ({c['samples'] / max(budget, 1):.1%})")


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
    from memscan.report.registry import build_report

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
