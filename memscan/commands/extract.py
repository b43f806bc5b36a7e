"""``memscan extract``: the generate → detect → verify attack (Carlini et al. 2023)."""

from __future__ import annotations

from pathlib import Path

import typer

from memscan.commands.common import (
    clean_errors,
    dtype_option,
    given,
    gpus_per_worker_option,
    loading_user_model,
    num_workers_option,
    quiet_option,
    ray_address_option,
    resume_option,
    runner_option,
    say,
)
from memscan.commands.formatting import compare_summary

#: options read only by adaptive runs (parameter name → flag): given without --adaptive, refused
ADAPTIVE_ONLY = {
    "first_round": "--first-round",
    "round_size": "--round-size",
    "continue_clique": "--continue-clique",
    "stop_when_detected": "--stop-when-detected/--no-stop-when-detected",
}


def register(app: typer.Typer) -> None:
    @app.command("extract")
    def extract(
        ctx: typer.Context,
        model: str = typer.Option(
            ...,
            "--model",
            help="diffusers directory / hub id, py:module:attribute, or a folder of checkpoint-N directories "
            "(a checkpoint sweep: the same attack and seeds on each, then `memscan compare` by training step)",
        ),
        base: Path | None = typer.Option(
            None, "--base", help="sweep: the pipeline that completes unet/-only checkpoints (scheduler, captions)"
        ),
        heldout: Path | None = typer.Option(
            None, "--heldout", help="sweep: held-out images; each checkpoint's held-out and training loss is recorded"
        ),
        prompts: Path = typer.Option(
            ..., "--prompts", help="text file (one prompt a line) or CSV/Parquet with prompt_id, prompt"
        ),
        train: Path | None = typer.Option(
            None,
            "--train",
            help="training images: folder, CSV/Parquet manifest (id, path, caption), webdataset .tar, img2dataset "
            "output \\[with --index: where the index recorded them]",
        ),
        index: Path | None = typer.Option(
            None,
            "--index",
            help="verify through this training index (`memscan index`): each candidate against its --retrieve "
            "nearest training images only; the training set is never decoded whole",
        ),
        retrieve: int = typer.Option(
            100, "--retrieve", help="with --index: training images retrieved and compared per candidate (K)"
        ),
        serve_index_cpus: float | None = typer.Option(
            None,
            "--serve-index-cpus",
            help="with --index and --runner ray: serve each part of a sharded index (`memscan index --index-shards`) "
            "from its own Ray actor reserving this many CPUs, so that no worker opens the whole index "
            "\\[off: each worker opens it memory-mapped]",
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
        device: str | None = typer.Option(None, help="cpu, cuda or cuda:N \\[cpu]"),
        adaptive: bool | None = typer.Option(
            None, "--adaptive/--full-budget", help="sample in rounds, stop prompts with no pair within alpha \\[off]"
        ),
        first_round: int | None = typer.Option(None, help="adaptive: generations before the first decision [50]"),
        round_size: int | None = typer.Option(None, help="adaptive: generations per further round [50]"),
        continue_clique: int | None = typer.Option(None, help="adaptive: continue while the clique has ≥ this [2]"),
        stop_when_detected: bool | None = typer.Option(
            None, "--stop-when-detected/--no-stop-when-detected", help="adaptive: stop once flagged \\[on]"
        ),
        steps: int | None = typer.Option(None, help="sampler steps per image (diffusers models) \\[model's]"),
        guidance_scale: float | None = typer.Option(None, help="classifier-free guidance scale \\[model's]"),
        scheduler: str | None = typer.Option(
            None, help="text-to-image: ddim, ddpm, pndm, euler, euler-ancestral, dpm++, unipc, lms"
        ),
        dtype: str | None = dtype_option(
            "image",
            None,
            help="text-to-image: auto, fp32 or float32, fp16 or float16, bf16 or bfloat16 \\[auto: fp16 on cuda]",
        ),
        height: int | None = typer.Option(None, help="text-to-image: output height \\[native]"),
        width: int | None = typer.Option(None, help="text-to-image: output width \\[native]"),
        resume: bool = resume_option(),
        runner: str = runner_option(),
        ray_address: str | None = ray_address_option(),
        num_workers: int | None = num_workers_option(),
        gpus_per_worker: float | None = gpus_per_worker_option(),
        config: Path | None = typer.Option(
            None,
            "--config",
            help="TOML file (an \\[extract] table or top-level keys) of these settings only: samples_per_prompt, "
            "grid, alpha, min_clique, delta, seed, batch_size, shard_size, device, n_nearest, max_expansions, "
            "adaptive, first_round, round_size, continue_clique, stop_when_detected; explicit options win",
        ),
        quiet: bool = quiet_option(),
    ):
        """Generate many images per prompt, find cliques of near-copies, verify them against the training set
        (all of it with --train; with --index, each candidate's --retrieve nearest training images);
        --model FOLDER of checkpoint-N/: the same attack on each checkpoint, then a comparison."""
        from memscan.errors import InputError
        from memscan.extraction.config import ExtractConfig
        from memscan.extraction.pipeline import extract as run_extract
        from memscan.extraction.sweep import extract_sweep
        from memscan.generators.checkpoints import list_checkpoints
        from memscan.generators.load import load_generator
        from memscan.runners.base import GeneratorSpec
        from memscan.runners.ray_runner import RayOptions

        with clean_errors():
            if train is None and index is None:
                raise InputError("extract needs the training set", "pass --train TRAIN, or --index INDEX")
            if index is None and given(ctx, "retrieve"):
                raise InputError(
                    "--retrieve applies to --index runs (training images retrieved per candidate); "
                    "with --train alone each candidate is compared with every training image",
                    "drop --retrieve, or verify through --index INDEX",
                )
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
            if not cfg.adaptive:
                for name, flag in ADAPTIVE_ONLY.items():
                    if given(ctx, name):
                        raise InputError(
                            f"{flag} applies to adaptive runs; this run generates the full budget for every prompt",
                            f"add --adaptive (or adaptive = true in --config), or drop {flag}",
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

            def make(spec: str):
                if runner == "ray":  # each Ray worker loads its own model from the spec
                    return GeneratorSpec(spec, {"device": cfg.device, "batch_size": cfg.batch_size, **gen_options})
                with loading_user_model(spec):
                    return load_generator(spec, device=cfg.device, batch_size=cfg.batch_size, **gen_options)

            if list_checkpoints(model):
                res = extract_sweep(
                    model,
                    make,
                    prompts,
                    train,
                    out,
                    cfg,
                    base=base,
                    heldout=heldout,
                    resume=resume,
                    progress=not quiet,
                    runner=runner,
                    runner_options=ray_options,
                    index=index,
                    retrieve=retrieve,
                    serve_index=serve_index_cpus,
                )
                say(compare_summary(res))
                return
            if base is not None or heldout is not None:
                raise InputError(
                    f"--base and --heldout apply to checkpoint sweeps; {model} is not a folder of checkpoint-N directories",
                    "drop them, or pass the folder that holds the checkpoints",
                )
            gen = make(model)
            result = run_extract(
                gen,
                prompts,
                train,
                out,
                cfg,
                resume=resume,
                progress=not quiet,
                runner=runner,
                runner_options=ray_options,
                model_id=model,
                index=index,
                retrieve=retrieve,
                serve_index=serve_index_cpus,
            )
        c = result.manifest["counts"]
        say(
            f"{c['prompts']} prompts, {c['samples']} generations: {c['detections']} detections, {c['extractions']} extractions → {out}"
        )
        if cfg.adaptive:
            budget = c["prompts"] * cfg.samples_per_prompt
            say(f"adaptive budget: {c['samples']} of {budget} generations ({c['samples'] / max(budget, 1):.1%})")
