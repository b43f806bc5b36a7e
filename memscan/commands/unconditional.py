"""``memscan extract-unconditional``: generate M images and verify each with the calibrated distance."""

from __future__ import annotations

from pathlib import Path

import typer

from memscan.commands.common import (
    clean_errors,
    given,
    gpus_per_worker_option,
    loading_user_model,
    num_workers_option,
    ray_address_option,
    runner_option,
    say,
)


def register(app: typer.Typer) -> None:
    @app.command("extract-unconditional")
    def extract_unconditional(
        ctx: typer.Context,
        model: str = typer.Option(..., "--model", help="diffusers directory / hub id, or py:module:attribute"),
        train: Path | None = typer.Option(
            None,
            "--train",
            help="training set (folder, manifest, webdataset, img2dataset); with --index, optional: where the "
            "indexed images are now (default: where the index recorded them)",
        ),
        samples: int = typer.Option(..., "--samples", help="generations M (paper, CIFAR-10: 65536)"),
        out: Path = typer.Option(..., "--out", help="run directory to write"),
        index: Path | None = typer.Option(
            None,
            "--index",
            help="training index (memscan index): each generation's --n-candidates most similar training images "
            "are read by random access and re-ranked on pixels; the training set is never decoded whole "
            "(default: exact pixel search over the decoded --train)",
        ),
        n_nearest: int = typer.Option(50, "--n-nearest", help="n of the calibrated distance (paper: 50)"),
        alpha_c: float = typer.Option(0.5, "--alpha-c", help="α_c of the calibrated distance (paper: 0.5)"),
        metric: str = typer.Option("l2", "--metric", help="l2 (paper) or tiled_l2"),
        grid: int = typer.Option(4, "--grid", help="tiles per side for tiled_l2"),
        n_candidates: int = typer.Option(
            200,
            "--n-candidates",
            help="with --index: training images retrieved per generation and re-ranked on pixels (K)",
        ),
        prompt: str = typer.Option("", "--prompt", help="what the generator is called with"),
        seed: int = typer.Option(0, "--seed", help="run seed; generation i uses derive_seed(seed, 'unconditional', i)"),
        batch_size: int = typer.Option(64, "--batch-size", help="generations per model call"),
        shard_size: int = typer.Option(4096, "--shard-size", help="generations per shard (unit of resume)"),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N"),
        no_images: bool = typer.Option(False, "--no-images", help="do not write PNGs of extractions"),
        resume: bool = typer.Option(False, "--resume", help="finish a killed run in --out"),
        runner: str = runner_option(),
        ray_address: str | None = ray_address_option(),
        num_workers: int | None = num_workers_option(),
        gpus_per_worker: float | None = gpus_per_worker_option(),
        quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
    ):
        """Unconditional extraction: M generations, n nearest training images each, calibrated decision."""
        from memscan.errors import InputError
        from memscan.extraction.unconditional import UnconditionalConfig
        from memscan.extraction.unconditional import extract_unconditional as run
        from memscan.generators.load import load_generator
        from memscan.runners.base import GeneratorSpec
        from memscan.runners.ray_runner import RayOptions

        with clean_errors():
            if index is None and given(ctx, "n_candidates"):
                raise InputError(
                    "--n-candidates applies to --index runs (training images retrieved per generation); "
                    "with --train alone every generation is compared with every training image",
                    "drop --n-candidates, or search through --index INDEX",
                )
            if metric == "l2" and given(ctx, "grid"):
                raise InputError(
                    "--grid applies to --metric tiled_l2; the l2 metric compares whole images",
                    "drop --grid, or pass --metric tiled_l2",
                )
            cfg = UnconditionalConfig(
                samples=samples,
                seed=seed,
                n_nearest=n_nearest,
                alpha_c=alpha_c,
                metric=metric,
                grid=grid,
                n_candidates=n_candidates,
                prompt=prompt,
                batch_size=batch_size,
                shard_size=shard_size,
                device=device,
                save_images=not no_images,
            ).validate()
            ray_options = RayOptions.from_cli(
                runner, address=ray_address, num_workers=num_workers, gpus_per_worker=gpus_per_worker, device=cfg.device
            )
            if runner == "ray":  # each Ray worker loads its own model from the spec
                gen = GeneratorSpec(model, {"device": cfg.device, "batch_size": cfg.batch_size})
            else:
                with loading_user_model(model):
                    gen = load_generator(model, device=cfg.device, batch_size=cfg.batch_size)
            result = run(
                gen,
                train,
                out,
                cfg,
                index=index,
                resume=resume,
                progress=not quiet,
                runner=runner,
                runner_options=ray_options,
                model_id=model,
            )
        c = result.manifest["counts"]
        say(
            f"{c['samples']} generations: {c['extracted_generations']} extracted (calibrated ℓ < 1), "
            f"{c['extracted_training_images']} distinct training images → {out}"
        )
