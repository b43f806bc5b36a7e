"""``memscan lm …``: the language-model commands (a typer group).

lmcore adds ``extractable`` and ``exposure`` here; ``mia`` (below, in its own block) is lmmia's.
"""

from __future__ import annotations

from pathlib import Path

import typer

from memscan.commands.common import clean_errors, quiet_option, resume_option

lm_app = typer.Typer(help="Language models: memorization, canary exposure, membership scores.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(lm_app, name="lm")


# ---- lm mia (lmmia): membership scores and the blind baseline ----------------------------------
@lm_app.command("mia")
def lm_mia(
    model: str = typer.Option(
        ..., "--model", help="causal LM: transformers directory or hub id, .gguf file, py:module:attr"
    ),
    members: Path = typer.Option(..., "--members", help='member texts: JSONL with "text", Parquet, or one a line'),
    nonmembers: Path = typer.Option(..., "--nonmembers", help="non-member texts, as --members"),
    out: Path = typer.Option(..., "--out", help="run directory to write"),
    reference: str | None = typer.Option(None, "--reference", help="reference model for the reference ratio"),
    k_percent: float = typer.Option(20.0, "--k-percent", help="k of Min-K% and Min-K%++ (percent of the tokens)"),
    batch_size: int = typer.Option(8, "--batch-size", help="examples of equal token length per forward pass"),
    max_tokens: int = typer.Option(512, "--max-tokens", help="tokens scored per example (longer texts are cut)"),
    bootstrap: int = typer.Option(200, "--bootstrap", help="bootstrap replicates for 95% intervals"),
    seed: int = typer.Option(0, "--seed", help="seed of the blind baseline's folds and the bootstrap"),
    shard_size: int = typer.Option(64, "--shard-size", help="examples per shard (unit of commit and resume)"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, float16, bfloat16"),
    resume: bool = resume_option(),
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
    quiet: bool = quiet_option("no progress bar"),
):
    """Membership scores of a causal LM on member and non-member texts (loss, zlib, lowercase,
    Min-K%, Min-K%++, reference ratio) with ROC metrics, and the blind baseline (Das et al. 2024)
    that sees only the text."""
    from memscan.lm.mia_run import LmMiaConfig, run_lm_mia
    from memscan.runners.ray_runner import RayOptions

    with clean_errors():
        cfg = LmMiaConfig(
            k_percent=k_percent,
            max_tokens=max_tokens,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            seed=seed,
            bootstrap=bootstrap,
        )
        opts = RayOptions.from_cli(runner, address=ray_address, num_workers=num_workers, device=device)
        res = run_lm_mia(
            model,
            members,
            nonmembers,
            out,
            cfg,
            reference=reference,
            progress=not quiet,
            resume=resume,
            shard_size=shard_size,
            runner=runner,
            runner_options=opts,
        )
    lines = [f"memscan lm mia: {out}"]
    for r in res.metrics.to_dict("records"):
        lines.append(
            f"  {r['statistic']}: AUC {r['auc']:.3f}, TPR@1%FPR {r['tpr@1%fpr']:.3f}, "
            f"balanced accuracy {r['balanced_accuracy']:.3f}"
        )
    blind = res.blind
    if blind.get("warning"):
        lines.append(f"  WARNING: blind baseline AUC {blind['auc']:.3f} ≥ 0.6: {blind['warning_text']}")
    elif blind.get("skipped"):
        lines.append(f"  blind baseline not run: {blind['skipped']}")
    lines.append(f"  report: memscan report {out}")
    typer.echo("\n".join(lines))
