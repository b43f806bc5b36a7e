"""``memscan audit``: candidates → triage → adaptive extraction within a budget → verify → report."""

from __future__ import annotations

from pathlib import Path

import typer

from memscan.commands.common import (
    clean_errors,
    gpus_per_worker_option,
    loading_user_model,
    num_workers_option,
    quiet_option,
    ray_address_option,
    resume_option,
    runner_option,
    say,
)

HELP = """The whole extraction attack in one run directory, stage by stage.

1. candidates: the captions of the --candidates most duplicated training images (as `memscan candidates`), or --prompts as given.

2. triage: a one-step memorization score of every candidate, as `memscan triage --scores SCORE` with the extraction's schedule, guidance, resolution and negative prompt; only the --score that ranks is computed (wen, Wen et al. 2024: 2 UNet evaluations per generation and step, 3 with a negative prompt, so 8 a prompt with the default 4 generations × 1 step; webster, Webster 2023: 2 per generation, 1 unguided). Stable Diffusion and SDXL-style pipelines (added conditioning: pooled text embeds and time ids, the pipeline's own zero/negative conditioning as the unconditional input) and class-conditional UNets with a null class are scored. Models no score applies to (a plain py: function, other added conditioning, class-conditional UNets without a null class) keep the candidates' order, and the audit says so.

3. extract: the adaptive extraction (`memscan extract --adaptive`, first round and further rounds of 4 % of --samples-per-prompt) down the triage ranking, --round-prompts prompts a round, until the budget is spent: --budget model evaluations for the whole audit, triage included (default: 10 % of the brute force, every candidate × --samples-per-prompt), or the --top K prompts.

4. verify: detections.parquet and extractions.parquet, as `memscan extract` writes them.

5. report: report.html shows every stage (prompts kept, evaluations spent, found).

--resume finishes a killed audit at the stage and shard where it stopped."""


def register(app: typer.Typer) -> None:
    @app.command("audit", help=HELP)
    def audit(
        model: str = typer.Option(..., "--model", help="diffusers directory / hub id, or py:module:attribute"),
        train: Path = typer.Option(..., "--train", help="training set (folder, manifest, webdataset, img2dataset)"),
        out: Path = typer.Option(..., "--out", help="audit run directory to write"),
        budget: int | None = typer.Option(
            None, "--budget", help="model evaluations for the whole audit, triage included [10 % of the brute force]"
        ),
        top: int | None = typer.Option(None, "--top", help="attack the K highest-ranked prompts instead of a budget"),
        prompts: Path | None = typer.Option(
            None,
            "--prompts",
            help="candidate prompts (text, CSV or Parquet) \\[captions of the most duplicated images]",
        ),
        candidates: int = typer.Option(1000, "--candidates", help="duplicate clusters taken as candidates [1000]"),
        min_count: int = typer.Option(1, "--min-count", help="skip clusters whose duplicate count is below this [1]"),
        score: str = typer.Option(
            "wen", "--score", help="triage score that ranks the prompts, the only one computed: wen or webster \\[wen]"
        ),
        generations: int = typer.Option(4, "--triage-generations", help="triage: initial noises per prompt [4]"),
        triage_steps: int = typer.Option(1, "--triage-steps", help="triage: denoising steps scored [1]"),
        round_prompts: int = typer.Option(8, "--round-prompts", help="prompts per extraction round [8]"),
        samples_per_prompt: int = typer.Option(500, help="full budget of generations per prompt [500]"),
        first_round: int | None = typer.Option(None, help="adaptive first round [4 % of samples, ≥ 2]"),
        round_size: int | None = typer.Option(None, help="adaptive further rounds [4 % of samples, ≥ 2]"),
        alpha: float | None = typer.Option(None, help="edge threshold on tiled ℓ2 [0.08]"),
        min_clique: int | None = typer.Option(None, help="clique size that flags a prompt [10]"),
        delta: float | None = typer.Option(None, help="extraction threshold on tiled ℓ2 [0.15]"),
        seed: int = typer.Option(0, help="run seed [0]"),
        batch_size: int = typer.Option(64, help="generations per model call [64]"),
        shard_size: int = typer.Option(8, help="prompts per extraction shard [8]"),
        steps: int | None = typer.Option(None, help="sampler steps per image (diffusers models) \\[model's]"),
        guidance_scale: float | None = typer.Option(None, help="classifier-free guidance scale \\[model's]"),
        device: str = typer.Option("cpu", help="cpu, cuda or cuda:N"),
        resume: bool = resume_option(),
        runner: str = runner_option(),
        ray_address: str | None = ray_address_option(),
        num_workers: int | None = num_workers_option(),
        gpus_per_worker: float | None = gpus_per_worker_option(),
        report: bool = typer.Option(True, "--report/--no-report", help="write report.html at the end \\[on]"),
        quiet: bool = quiet_option(),
    ):
        from memscan.audit import AuditBudget, default_extract_config
        from memscan.audit import audit as run_audit
        from memscan.generators.load import load_generator
        from memscan.report.registry import build_report
        from memscan.runners.base import GeneratorSpec
        from memscan.runners.ray_runner import RayOptions
        from memscan.triage import TriageConfig

        with clean_errors():
            cfg = default_extract_config(
                samples_per_prompt,
                first_round=first_round,
                round_size=round_size,
                alpha=alpha,
                min_clique=min_clique,
                delta=delta,
                seed=seed,
                batch_size=batch_size,
                shard_size=shard_size,
                device=device,
            ).validate()
            gen_options = {"num_inference_steps": steps, "guidance_scale": guidance_scale}
            gen_options = {k: v for k, v in gen_options.items() if v is not None}
            ray_options = RayOptions.from_cli(
                runner, address=ray_address, num_workers=num_workers, gpus_per_worker=gpus_per_worker, device=device
            )
            if runner == "ray":
                gen = GeneratorSpec(model, {"device": device, "batch_size": batch_size, **gen_options})
            else:
                with loading_user_model(model):
                    gen = load_generator(model, device=device, batch_size=batch_size, **gen_options)
            res = run_audit(
                gen,
                train,
                out,
                prompts=prompts,
                budget=AuditBudget(evaluations=budget, top=top, round_prompts=round_prompts),
                config=cfg,
                triage_config=TriageConfig(generations=generations, steps=triage_steps, seed=seed),
                candidates=candidates,
                min_count=min_count,
                score=score,
                resume=resume,
                progress=not quiet,
                runner=runner,
                runner_options=ray_options,
                model_id=model,
            )
            page = build_report(out) if report else None
        m = res.manifest
        unit = m["budget"]["unit"]
        for name, rec in m["stages"].items():
            note = f" — {rec['reason']}; {rec['fallback']}" if rec.get("skipped") else ""
            say(f"  {name:>10}: {rec['prompts_kept']} prompts kept, {int(rec['evaluations']):,} {unit}{note}")
        c = m["counts"]
        say(
            f"{c['prompts']} prompts attacked, {c['detections']} detections, {c['extractions']} extractions; "
            f"{m['evaluations_total']:,} {unit} ({m['share_of_full_budget']:.1%} of the brute force's "
            f"{m['evaluations_full_budget']:,}) → {out}"
        )
        if page is not None:
            say(f"report: {page}")
