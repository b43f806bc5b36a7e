"""``report.html`` for a ``memscan triage`` run, from its tables alone.

The page answers what triage is for: which prompts to attack first, and at what saving. It shows
the ranked prompts (as ``prompts.csv`` holds them) with the scores the run computed (one or both;
a score not asked for has no columns in ``scores.parquet``, and none here) and their ranks, the
cost of triage per computed score against the full attack (and of triage followed by the full
attack on the kept prompts), and the distribution of each score — against each prompt's training-set ``duplicate_count`` when the
prompts table had one, since triage exists to separate the often-duplicated (memorized) prompts
from the rest.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

from memscan.errors import MemscanError
from memscan.report.base import environment, png_base64, run_context, write_page
from memscan.store import RunStore
from memscan.triage.run import FULL_ATTACK, select_ranked
from memscan.triage.scores import SCORES

__all__ = ["build_triage_report", "triage_score_plot"]

_LABELS = {
    "wen": "Wen et al. 2024: ‖ε(x_t, c) − ε(x_t, ∅)‖₂",
    "webster": "Webster 2023: mean((z_T − D(z_T))²) = σ_max²·mean(ε̂²)",
}


def build_triage_report(run: str | Path, out: str | Path | None = None, top: int = 100) -> Path:
    """Write ``report.html`` for a finished ``triage`` run; returns its path.

    ``top``: how many of the ranked (kept) prompts the page lists.
    """
    store = RunStore(run)
    manifest = store.read_manifest(expect="triage")
    status = manifest.get("status", "complete")  # runs made before memscan 0.2 recorded no status
    if status != "complete":
        raise MemscanError(f"run {run} is not complete (status {status!r})", "finish it with --resume first")
    path = store.root / "scores.parquet"
    if not path.is_file() or not isinstance(manifest.get("config"), dict):
        what = f"{path} is missing" if not path.is_file() else f"{store.manifest_path} has no config"
        raise MemscanError(what, "the triage run is damaged: rerun `memscan triage`")
    scores = pd.read_parquet(path)
    ranking = manifest.get("ranking", {})
    score = ranking.get("score", "wen")
    ranked = select_ranked(scores, score, ranking.get("top"), ranking.get("min_score"))
    shown = computed_scores(scores)
    html = (
        environment()
        .get_template("triage_report.html.j2")
        .render(
            **run_context(store.root, manifest),
            model={"id": None, "parameters": None, "training_step": None, **manifest.get("model", {})},
            ranking={**ranking, "score": score},
            runner=manifest.get("runner", {}),
            n_prompts=len(scores),
            cost=_cost(manifest, len(scores), len(ranked)),
            plot_png=png_base64(triage_score_plot(scores, kept=ranked["prompt_id"])),
            shown=shown,
            by_duplicates=_has_duplicates(scores),
            rows=[_row(r) for r in ranked.head(top).to_dict("records")],
            n_ranked=len(ranked),
            score_labels={s: _LABELS[s] for s in shown},
        )
    )
    return write_page(html, store.root, out)


def computed_scores(scores: pd.DataFrame) -> list[str]:
    """The scores a triage table holds (in :data:`SCORES` order; a score not asked for has no column)."""
    return [s for s in SCORES if f"{s}_score" in scores]


def _cost_terms(manifest: dict) -> list[str]:
    """Each computed score's UNet evaluations per prompt, written out (``wen: 4 generations × 1
    step(s) × 2 = 8``), from the manifest's ``cost.unet_evaluations_by_score`` (runs made before
    it was recorded: none)."""
    config = manifest.get("config", {})
    by_score = (manifest.get("cost") or {}).get("unet_evaluations_by_score") or {}
    g, steps = int(config.get("generations") or 0), int(config.get("steps") or 0)
    terms = []
    for name, n in by_score.items():
        if name == "wen" and g and steps:
            terms.append(f"wen: {g} generations × {steps} step(s) × {n // (g * steps)} = {n}")
        elif name == "webster" and g:
            terms.append(f"webster: {g} generations × {n // g} = {n}")
        else:
            terms.append(f"{name}: {n}")
    return terms


def _cost(manifest: dict, n_prompts: int, kept: int) -> dict:
    """UNet evaluations of triage (in all and per computed score), of the full attack on every
    prompt, and of both combined."""
    cost = manifest.get("cost", {})
    full = cost.get("full_attack_unet_evaluations_per_prompt") or (
        FULL_ATTACK["samples_per_prompt"] * FULL_ATTACK["num_inference_steps"] * FULL_ATTACK["evaluations_per_step"]
    )
    per = cost.get("unet_evaluations_per_prompt", 0)
    triage_total, full_total = per * n_prompts, full * n_prompts
    then = triage_total + full * kept
    return {
        "per_prompt": per,
        "terms": _cost_terms(manifest),
        "full_per_prompt": full,
        "full_attack": cost.get("full_attack", FULL_ATTACK),
        "share": per / full if full else None,
        "triage_total": triage_total,
        "full_total": full_total,
        "then_attack_kept": then,
        "then_share": then / full_total if full_total else None,
    }


def _row(r: dict) -> dict:
    """A table row with missing ids and counts as ``None`` (pandas NA/NaN are not template values)."""
    out = {k: (None if not isinstance(v, str) and pd.isna(v) else v) for k, v in r.items()}
    if out.get("duplicate_count") is not None:
        out["duplicate_count"] = int(out["duplicate_count"])
    return out


def _has_duplicates(scores: pd.DataFrame) -> bool:
    return "duplicate_count" in scores and bool(pd.to_numeric(scores["duplicate_count"], errors="coerce").notna().any())


def triage_score_plot(scores: pd.DataFrame, kept=()) -> bytes:
    """Each computed score of every prompt: against its ``duplicate_count`` (log x) when the
    table has one, else as histograms; the prompts kept in ``prompts.csv`` are marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = computed_scores(scores)
    fig = Figure(figsize=(5 * max(1, len(shown)), 3.6))
    FigureCanvasAgg(fig)
    is_kept = scores["prompt_id"].isin(set(kept)).to_numpy()
    dup = pd.to_numeric(scores["duplicate_count"], errors="coerce") if "duplicate_count" in scores else None
    for k, name in enumerate(shown):
        ax = fig.add_subplot(1, len(shown), k + 1)
        vals = scores[f"{name}_score"].to_numpy(dtype=float)
        if _has_duplicates(scores):
            d = dup.to_numpy(dtype=float, na_value=np.nan)
            known = np.isfinite(d)
            x = np.clip(d, 1, None)
            ax.scatter(x[known & ~is_kept], vals[known & ~is_kept], s=10, c="#888", label="not kept")
            ax.scatter(x[known & is_kept], vals[known & is_kept], s=16, c="#c0392b", label="kept (prompts.csv)")
            ax.set_xscale("log")
            ax.set_xlabel("training-set duplicate count")
            ax.set_ylabel(f"{name}_score")
        else:
            finite = vals[np.isfinite(vals)]
            bins = np.histogram_bin_edges(finite, bins=min(40, max(5, finite.size // 4))) if finite.size else 10
            ax.hist(vals[~is_kept & np.isfinite(vals)], bins=bins, color="#888", alpha=0.8, label="not kept")
            ax.hist(
                vals[is_kept & np.isfinite(vals)], bins=bins, color="#c0392b", alpha=0.8, label="kept (prompts.csv)"
            )
            ax.set_xlabel(f"{name}_score")
            ax.set_ylabel("prompts")
        ax.set_title(_LABELS[name], fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()
