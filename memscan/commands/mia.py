"""``memscan mia``, ``memscan inpaint`` and ``memscan memscore``: thin wrappers over
:mod:`memscan.mia.statistic_run` and :mod:`memscan.mia.memscore_run` (``memscan demo mia`` is in
:mod:`memscan.commands.demo`); the summaries they print come from :mod:`memscan.commands.formatting`."""

from __future__ import annotations

from pathlib import Path

import typer

from memscan.commands.common import fail as _fail
from memscan.commands.common import num_workers_option, ray_address_option, resume_option, runner_option, say
from memscan.commands.formatting import inpaint_summary, memscore_summary, mia_summary
from memscan.errors import MemscanError

_TARGET_HELP = (
    "target: a diffusers directory or py:module:attribute (with --members); or a folder of checkpoint-N/ "
    "(a checkpoint sweep: the same attack and seeds on each, then `memscan compare` by training step)"
)
_BASE_HELP = "sweep: the pipeline that completes unet/-only checkpoints (scheduler)"


def _sweep(model, out, base, run_one, *, resume: bool, quiet: bool, outliers: bool = False) -> bool:
    """Run a checkpoint sweep when ``model`` is a folder of ``checkpoint-N/`` (True), else nothing
    (False; ``--base`` is then refused); ``outliers``: each checkpoint's run gets ``--outliers``'
    analysis once the sweep is complete."""
    from memscan.errors import InputError
    from memscan.generators.checkpoints import list_checkpoints

    if model is None or not list_checkpoints(model):
        if base is not None:
            raise InputError(
                f"--base applies to checkpoint sweeps; {model} is not a folder of checkpoint-N directories",
                "drop it, or pass the folder that holds the checkpoints",
            )
        return False
    from memscan.commands.formatting import compare_summary
    from memscan.compare.sweep import checkpoint_sweep

    res = checkpoint_sweep(model, run_one, out, base=base, resume=resume, progress=not quiet)
    say(compare_summary(res))
    for run in res.table["run"]:  # every checkpoint's run is complete (and kept) before this step
        _record_outliers(Path(run), outliers)
    return True


_SHADOWS_HELP = "shadow directory (train_shadow_models / demo-mia) for LiRA"


def _outliers_option() -> bool:
    return typer.Option(
        False,
        "--outliers",
        help="once the run is complete, score every example by its k-NN distance (k = 5) to the other training "
        "examples and record it in the run (outliers.parquet) for its report; `memscan report RUN --outliers "
        "[--index INDEX] [--k K]` recomputes it \\[off]",
    )


def _record_outliers(out: Path, outliers: bool) -> None:
    """``--outliers``: the run is complete (and kept) before this step; its failure is one error."""
    if not outliers:
        return
    from memscan.compare.example_outliers import write_run_outliers
    from memscan.report.registry import build_report

    try:
        res = write_run_outliers(out)
        build_report(out)  # the page again, with its "Memorization vs outliers" section
    except MemscanError as exc:
        _fail(exc)
    m = res.meta
    say(f"outliers: Spearman's rho {m['spearman']} between the score and the k-NN distance (n = {m['n']})")


def register(app: typer.Typer) -> None:
    @app.command()
    def mia(
        data: Path = typer.Option(..., "--data", help="examples: a folder of images or a CSV/Parquet manifest"),
        out: Path = typer.Option(..., "--out", help="run directory to write"),
        model: str | None = typer.Option(None, "--model", help=_TARGET_HELP),
        base: Path | None = typer.Option(None, "--base", help=_BASE_HELP),
        members: Path | None = typer.Option(
            None, "--members", help="member ids (text, one a line) or CSV/Parquet with id, is_member"
        ),
        shadows: Path | None = typer.Option(None, "--shadows", help=_SHADOWS_HELP),
        target_shadow: int | None = typer.Option(
            None, "--target-shadow", help="use shadow model M as the target (its mask is the truth)"
        ),
        timesteps: str = typer.Option("10,50,100,200,500", "--timesteps", help="timesteps t of L_t (sweep)"),
        noise_draws: int = typer.Option(4, "--noise-draws", help="noise draws K per example"),
        flip: bool = typer.Option(False, "--flip", help="also average over horizontal flips"),
        attacks: str | None = typer.Option(
            None, "--attacks", help="comma list of loss, lira_online, lira_offline, lira_*_fixed \\[all with shadows]"
        ),
        condition: str = typer.Option("auto", "--condition", help="auto, null, none or caption (class models)"),
        bootstrap: int = typer.Option(200, "--bootstrap", help="bootstrap replicates for 95% intervals"),
        seed: int = typer.Option(0, "--seed", help="noise seed"),
        batch_size: int = typer.Option(64, "--batch-size", help="rows per model call"),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N"),
        threads: int | None = typer.Option(None, "--threads", help="torch CPU threads"),
        shard_size: int = typer.Option(256, "--shard-size", help="examples per shard (unit of commit and resume)"),
        resume: bool = resume_option(),
        runner: str = runner_option(),
        ray_address: str | None = ray_address_option(),
        num_workers: int | None = num_workers_option(),
        outliers: bool = _outliers_option(),
        quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
    ):
        """Membership inference with the diffusion loss L_t: threshold and LiRA, per timestep."""
        from memscan.mia.loss import LossConfig, parse_timesteps
        from memscan.mia.statistic_run import run_mia
        from memscan.runners.ray_runner import RayOptions

        try:
            cfg = LossConfig(parse_timesteps(timesteps), noise_draws, flip, seed, batch_size)

            def run_one(path, sub, resume_run, model_id):
                return run_mia(
                    sub,
                    data,
                    model=path,
                    members=members,
                    shadows=shadows,
                    target_shadow=target_shadow,
                    loss=cfg,
                    attacks=attacks,
                    condition=condition,
                    bootstrap=bootstrap,
                    device=device,
                    threads=threads,
                    progress=not quiet,
                    resume=resume_run,
                    shard_size=shard_size,
                    runner=runner,
                    runner_options=RayOptions.from_cli(
                        runner, address=ray_address, num_workers=num_workers, device=device
                    ),
                )

            if _sweep(model, out, base, run_one, resume=resume, quiet=quiet, outliers=outliers):
                return
            res = run_one(model, out, resume, model)
        except MemscanError as exc:
            _fail(exc)
        say(mia_summary(res, out))
        _record_outliers(out, outliers)

    @app.command()
    def inpaint(
        data: Path = typer.Option(..., "--data", help="examples: a folder of images or a CSV/Parquet manifest"),
        out: Path = typer.Option(..., "--out", help="run directory to write"),
        model: str | None = typer.Option(None, "--model", help=_TARGET_HELP),
        base: Path | None = typer.Option(None, "--base", help=_BASE_HELP),
        members: Path | None = typer.Option(None, "--members", help="member ids (text) or CSV/Parquet id, is_member"),
        shadows: Path | None = typer.Option(None, "--shadows", help=_SHADOWS_HELP),
        target_shadow: int | None = typer.Option(None, "--target-shadow", help="use shadow model M as the target"),
        region: str = typer.Option("left", "--region", help="hidden region: left, right, top, bottom, center, random"),
        fraction: float = typer.Option(0.5, "--fraction", help="share of the image hidden"),
        steps: int = typer.Option(50, "--steps", help="RePaint reverse steps"),
        jump_length: int = typer.Option(5, "--jump-length", help="RePaint jump length j"),
        jump_n_sample: int = typer.Option(3, "--jump-n-sample", help="RePaint resamplings r (1 = none)"),
        eta: float = typer.Option(1.0, "--eta", help="reverse-step noise (1 DDPM, 0 DDIM)"),
        samples: int = typer.Option(1, "--samples", help="inpaintings per example (distance: their mean)"),
        attacks: str | None = typer.Option(None, "--attacks", help="as for memscan mia"),
        condition: str = typer.Option("auto", "--condition", help="auto, null, none or caption"),
        bootstrap: int = typer.Option(200, "--bootstrap", help="bootstrap replicates"),
        seed: int = typer.Option(0, "--seed", help="seed"),
        batch_size: int = typer.Option(64, "--batch-size", help="examples per model call"),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N"),
        threads: int | None = typer.Option(None, "--threads", help="torch CPU threads"),
        shard_size: int = typer.Option(256, "--shard-size", help="examples per shard (unit of commit and resume)"),
        resume: bool = resume_option(),
        runner: str = runner_option(),
        ray_address: str | None = ray_address_option(),
        num_workers: int | None = num_workers_option(),
        outliers: bool = _outliers_option(),
        quiet: bool = typer.Option(False, "--quiet", help="no progress output"),
    ):
        """The inpainting attack: hide part of each image, inpaint it (RePaint), score the distance."""
        from memscan.mia.inpaint import InpaintConfig
        from memscan.mia.statistic_run import run_inpaint
        from memscan.runners.ray_runner import RayOptions

        try:
            cfg = InpaintConfig(region, fraction, steps, jump_length, jump_n_sample, eta, samples, seed, batch_size)

            def run_one(path, sub, resume_run, model_id):
                return run_inpaint(
                    sub,
                    data,
                    model=path,
                    members=members,
                    shadows=shadows,
                    target_shadow=target_shadow,
                    config=cfg,
                    attacks=attacks,
                    condition=condition,
                    bootstrap=bootstrap,
                    device=device,
                    threads=threads,
                    progress=not quiet,
                    resume=resume_run,
                    shard_size=shard_size,
                    runner=runner,
                    runner_options=RayOptions.from_cli(
                        runner, address=ray_address, num_workers=num_workers, device=device
                    ),
                )

            if _sweep(model, out, base, run_one, resume=resume, quiet=quiet, outliers=outliers):
                return
            res = run_one(model, out, resume, model)
        except MemscanError as exc:
            _fail(exc)
        say(inpaint_summary(res, out))
        _record_outliers(out, outliers)

    @app.command()
    def memscore(
        data: Path = typer.Option(..., "--data", help=".npy array (no pickle) or a folder/manifest of images"),
        train_fn: str = typer.Option(..., "--train-fn", help="py:module:attr — train_fn(subset) → model"),
        log_likelihood_fn: str = typer.Option(
            ..., "--log-likelihood-fn", help="py:module:attr — fn(model, data) → log p per example"
        ),
        out: Path = typer.Option(..., "--out", help="run directory (a finished run: rerun to recompute)"),
        folds: int = typer.Option(10, "--folds", help="K folds"),
        repeats: int = typer.Option(1, "--repeats", help="L repeats"),
        seed: int = typer.Option(0, "--seed", help="seed of the fold assignment"),
        resume: bool = resume_option(),
        runner: str = runner_option("folds"),
        ray_address: str | None = ray_address_option(),
        num_workers: int | None = num_workers_option(),
        outliers: bool = _outliers_option(),
        quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
    ):
        """Memorization score M = U − V (van den Burg & Williams 2021), K folds × L repeats, resumable."""
        from memscan.mia.memscore_run import run_memscore
        from memscan.runners.ray_runner import RayOptions

        try:
            res = run_memscore(
                out,
                data,
                train_fn,
                log_likelihood_fn,
                folds=folds,
                repeats=repeats,
                seed=seed,
                progress=not quiet,
                resume=resume,
                runner=runner,
                runner_options=RayOptions.from_cli(runner, address=ray_address, num_workers=num_workers),
            )
        except MemscanError as exc:
            _fail(exc)
        say(memscore_summary(res))
        _record_outliers(out, outliers)
