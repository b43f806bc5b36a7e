"""``memscan mia``, ``memscan inpaint``, ``memscan memscore`` and ``memscan demo-mia``: thin
wrappers over :mod:`memscan.mia.statistic_run`, :mod:`memscan.mia.memscore_run` and
:mod:`memscan.demo.mia`; the summaries they print are formatted here from the results."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import typer

from memscan.errors import MemscanError
from memscan.mia.results import MemscoreResult, MiaResult
from memscan.mia.tables import best_results

_TARGET_HELP = "target: a diffusers directory or py:module:attribute (with --members)"
_SHADOWS_HELP = "shadow directory (train_shadow_models / demo-mia) for LiRA"


def register(app: typer.Typer) -> None:
    from memscan.cli import _fail

    @app.command()
    def mia(
        data: Path = typer.Option(..., "--data", help="examples: a folder of images or a CSV/Parquet manifest"),
        out: Path = typer.Option(..., "--out", help="run directory to write"),
        model: str | None = typer.Option(None, "--model", help=_TARGET_HELP),
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
            None, "--attacks", help="comma list of loss, lira_online, lira_offline, lira_*_fixed [all with shadows]"
        ),
        condition: str = typer.Option("auto", "--condition", help="auto, null, none or caption (class models)"),
        bootstrap: int = typer.Option(200, "--bootstrap", help="bootstrap replicates for 95% intervals"),
        seed: int = typer.Option(0, "--seed", help="noise seed"),
        batch_size: int = typer.Option(64, "--batch-size", help="rows per model call"),
        device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
        threads: int | None = typer.Option(None, "--threads", help="torch CPU threads"),
        quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
    ):
        """Membership inference with the diffusion loss L_t: threshold and LiRA, per timestep."""
        from memscan.mia.loss import LossConfig, parse_timesteps
        from memscan.mia.statistic_run import run_mia

        try:
            cfg = LossConfig(parse_timesteps(timesteps), noise_draws, flip, seed, batch_size)
            res = run_mia(
                out,
                data,
                model=model,
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
            )
        except MemscanError as exc:
            _fail(exc)
        typer.echo(mia_summary(res, out))

    @app.command()
    def inpaint(
        data: Path = typer.Option(..., "--data", help="examples: a folder of images or a CSV/Parquet manifest"),
        out: Path = typer.Option(..., "--out", help="run directory to write"),
        model: str | None = typer.Option(None, "--model", help=_TARGET_HELP),
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
        device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
        threads: int | None = typer.Option(None, "--threads", help="torch CPU threads"),
        quiet: bool = typer.Option(False, "--quiet", help="no progress output"),
    ):
        """The inpainting attack: hide part of each image, inpaint it (RePaint), score the distance."""
        from memscan.mia.inpaint import InpaintConfig
        from memscan.mia.statistic_run import run_inpaint

        try:
            cfg = InpaintConfig(region, fraction, steps, jump_length, jump_n_sample, eta, samples, seed, batch_size)
            res = run_inpaint(
                out,
                data,
                model=model,
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
            )
        except MemscanError as exc:
            _fail(exc)
        typer.echo(inpaint_summary(res, out))

    @app.command()
    def memscore(
        data: Path = typer.Option(..., "--data", help=".npy array (no pickle) or a folder/manifest of images"),
        train_fn: str = typer.Option(..., "--train-fn", help="py:module:attr — train_fn(subset) → model"),
        log_likelihood_fn: str = typer.Option(
            ..., "--log-likelihood-fn", help="py:module:attr — fn(model, data) → log p per example"
        ),
        out: Path = typer.Option(..., "--out", help="run directory (rerun to resume)"),
        folds: int = typer.Option(10, "--folds", help="K folds"),
        repeats: int = typer.Option(1, "--repeats", help="L repeats"),
        seed: int = typer.Option(0, "--seed", help="seed of the fold assignment"),
        quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
    ):
        """Memorization score M = U − V (van den Burg & Williams 2021), K folds × L repeats, resumable."""
        from memscan.mia.memscore_run import run_memscore

        try:
            res = run_memscore(
                out, data, train_fn, log_likelihood_fn, folds=folds, repeats=repeats, seed=seed, progress=not quiet
            )
        except MemscanError as exc:
            _fail(exc)
        typer.echo(memscore_summary(res))

    @app.command("demo-mia")
    def demo_mia(
        out: Path = typer.Option(Path("runs/demo-mia"), "--out", help="output directory (rerun resumes training)"),
        n_examples: int | None = typer.Option(None, "--examples", help="pool size [256]"),
        n_models: int | None = typer.Option(None, "--models", help="shadow models, model 0 is the target [8]"),
        steps: int | None = typer.Option(None, "--steps", help="training steps per model [600]"),
        threads: int | None = typer.Option(None, "--threads", help="torch threads [1]"),
        quick: bool = typer.Option(False, "--quick", help="tiny settings (seconds; for CI)"),
        quiet: bool = typer.Option(False, "--quiet", help="no progress output"),
    ):
        """Membership inference and inpainting on the demo data with CPU-trained shadow models."""
        from dataclasses import replace

        from memscan.demo.mia import DemoMiaSettings, run_demo_mia

        st = DemoMiaSettings.quick() if quick else DemoMiaSettings()
        over = {"n_examples": n_examples, "n_models": n_models, "steps": steps, "threads": threads}
        st = replace(st, **{k: v for k, v in over.items() if v is not None})
        try:
            res = run_demo_mia(out, st, progress=not quiet)
        except MemscanError as exc:
            _fail(exc)
        text = demo_mia_summary(res)
        summary = {"report": str(res.report), "manifest": res.manifest, "text": text}
        (Path(out) / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        typer.echo(text)


# --------------------------------------------------------------------------------------------
# summaries
# --------------------------------------------------------------------------------------------
def summary_text(kind: str, metrics: pd.DataFrame, out: Path, extra: list[str] | None = None) -> str:
    """``memscan KIND: OUT``, the best attack of each statistic, ``extra`` lines, the report."""
    lines = [f"memscan {kind}: {out}"]
    for stat, (attack, t) in best_results(metrics).items():
        r = metrics[(metrics["statistic"] == stat) & (metrics["attack"] == attack)]
        r = r[r["timestep"].isna()] if t is None else r[r["timestep"] == t]
        r = r.iloc[0]
        at = "" if t is None else f" at t = {t}"
        lines.append(
            f"  {stat}: best {attack}{at}: AUC {r['auc']:.3f}, TPR@1%FPR {r['tpr@1%fpr']:.3f}, "
            f"TPR@0.1%FPR {r['tpr@0.1%fpr']:.3f}, balanced accuracy {r['balanced_accuracy']:.3f}"
        )
    lines += extra or []
    lines.append(f"  report: {out / 'report.html'}")
    return "\n".join(lines)


def _outside_pool(res: MiaResult) -> list[str]:
    outside = res.manifest["sources"].get("not_in_shadow_pool")
    if not outside:
        return []
    return [f"  {outside['count']} example(s) of --data outside the shadow pool: not attacked"]


def mia_summary(res: MiaResult, out: Path | None = None) -> str:
    """What ``memscan mia`` prints."""
    best = res.manifest["best_timestep"]
    extra = [f"  best timestep ({best['by']}): t = {best['timestep']}"] + _outside_pool(res)
    extra += [
        f"  skipped {k['attack']} at t = {k['timestep']}: {k['reason']}" for k in res.manifest["skipped_attacks"][:3]
    ]
    return summary_text("mia", res.metrics, Path(out) if out is not None else res.run_dir, extra)


def inpaint_summary(res: MiaResult, out: Path | None = None) -> str:
    """What ``memscan inpaint`` prints."""
    return summary_text("inpaint", res.metrics, Path(out) if out is not None else res.run_dir, _outside_pool(res))


def memscore_summary(res: MemscoreResult) -> str:
    """What ``memscan memscore`` prints."""
    m, ids = res.result, res.table["id"].tolist()
    q = ", ".join(f"q{float(k):g} = {v:.3f}" for k, v in m.quantiles.items())
    best = int(res.shown[0]) if len(res.shown) else 0
    folds, repeats = res.manifest["memscore"]["folds"], res.manifest["memscore"]["repeats"]
    return (
        f"memscan memscore: {len(ids)} examples, {folds} folds × {repeats} repeats; {q}; "
        f"most memorized: {ids[best]} (M = {m.score[best]:.3f})\n  report: {res.report}"
    )


def demo_mia_summary(res) -> str:
    """What ``memscan demo-mia`` prints (``res``: a :class:`memscan.demo.mia.DemoMiaResult`)."""
    st, best = res.settings, res.manifest["best_timestep"]
    extra = [
        f"  {st.n_models} models × {st.steps} steps trained in {res.training_s:.0f} s; "
        f"total {res.total_s:.0f} s wall, {res.cpu_s:.0f} s CPU",
        f"  best timestep ({best['by']}): t = {best['timestep']}",
    ]
    return summary_text("demo-mia", res.run.metrics, res.out / "run", extra)
