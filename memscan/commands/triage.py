"""``memscan triage``: cheap memorization scores per prompt and a ranked prompts file."""

from __future__ import annotations

from pathlib import Path

import typer

from memscan.commands.common import (
    clean_errors,
    dtype_option,
    gpus_per_worker_option,
    num_workers_option,
    quiet_option,
    ray_address_option,
    resume_option,
    runner_option,
    say,
)


def register(app: typer.Typer) -> None:
    @app.command()
    def triage(
        model: str = typer.Option(
            ...,
            "--model",
            help="text-to-image pipeline directory or hub id, or a class-conditional UNet directory with a null_class",
        ),
        prompts: Path = typer.Option(..., "--prompts", help="text file (one prompt a line) or CSV/Parquet"),
        out: Path = typer.Option(..., "--out", help="triage run directory to write"),
        generations: int = typer.Option(4, help="initial noises per prompt"),
        steps: int = typer.Option(1, help="denoising steps scored (the first of the schedule)"),
        num_inference_steps: int | None = typer.Option(None, help="schedule length \\[model's, else 50]"),
        guidance_scale: float | None = typer.Option(
            None,
            help="guidance used to advance the latent \\[model's, else 7.5; a class-conditional UNet: 1, as its extraction]",
        ),
        scores: str = typer.Option(
            "wen,webster",
            "--scores",
            help="scores to compute, comma-separated (wen, webster); a score not asked for costs no UNet evaluation",
        ),
        score: str | None = typer.Option(
            None, help="score that ranks prompts.csv: wen or webster \\[the first of --scores: wen when computed]"
        ),
        top: int | None = typer.Option(None, "--top", help="keep the K highest-scoring prompts in prompts.csv"),
        min_score: float | None = typer.Option(None, "--min-score", help="keep prompts scoring at least this"),
        seed: int = typer.Option(0, help="run seed"),
        batch_size: int = typer.Option(32, help="generations per UNet call"),
        shard_size: int = typer.Option(
            64, "--shard-size", help="prompts per shard, the unit of --resume (rounded up to whole UNet batches)"
        ),
        device: str = typer.Option("cpu", help="cpu, cuda or cuda:N"),
        dtype: str = dtype_option("image", "auto", help="auto, fp32 or float32, fp16 or float16, bf16 or bfloat16"),
        height: int | None = typer.Option(
            None,
            help="text-to-image: generations' height, as `memscan extract --height` \\[memscan.json's, else native]",
        ),
        width: int | None = typer.Option(
            None, help="text-to-image: generations' width, as `memscan extract --width` \\[memscan.json's, else native]"
        ),
        resume: bool = resume_option(),
        runner: str = runner_option(),
        ray_address: str | None = ray_address_option(),
        num_workers: int | None = num_workers_option("one pipeline load each"),
        gpus_per_worker: float | None = gpus_per_worker_option(),
        quiet: bool = quiet_option("no progress bar"),
    ):
        """Score prompts with one or a few denoising steps (Wen et al. 2024, Webster 2023; --scores
        picks which); write scores.parquet and a ranked prompts.csv that `memscan extract --prompts` reads."""
        from memscan.runners.ray_runner import RayOptions
        from memscan.triage import TriageConfig
        from memscan.triage import triage as run_triage

        with clean_errors():
            cfg = TriageConfig(
                generations=generations,
                steps=steps,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                seed=seed,
                batch_size=batch_size,
                device=device,
                dtype=dtype,
                scores=scores,
                height=height,
                width=width,
            )
            ray_options = RayOptions.from_cli(
                runner, address=ray_address, num_workers=num_workers, gpus_per_worker=gpus_per_worker, device=device
            )
            res = run_triage(
                model,
                prompts,
                out,
                cfg,
                score=score,
                top=top,
                min_score=min_score,
                progress=not quiet,
                resume=resume,
                shard_size=shard_size,
                runner=runner,
                runner_options=ray_options,
            )
        cost = res.manifest["cost"]
        say(
            f"{len(res.scores)} prompts scored ({cost['unet_evaluations_per_prompt']} UNet evaluations each, "
            f"{cost['share_of_full_attack']:.2e} of the full attack): {len(res.ranked)} kept in {out / 'prompts.csv'}"
        )
