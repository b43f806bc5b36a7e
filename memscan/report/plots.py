"""Plots of a run, made from its tables alone (matplotlib, Agg, PNG bytes)."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd


def _fig():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plain(text) -> str:
    r"""Text from a run (a label, a caption) as matplotlib shows it literally: a ``$`` would open
    mathtext (``$x^$`` fails to parse, ``$\alpha$`` renders as α), so each is escaped; control
    characters are written as escapes (:func:`memscan.store.escape_controls`), and a leading
    ``_`` — which would hide the label from the legend — gets a zero-width space before it.

    Examples
    --------
    >>> print(plain("$x^$ run"))
    \$x^\$ run
    >>> plain("_ckpt").startswith("_")
    False
    """
    from memscan.store import escape_controls

    out = escape_controls(str(text)).replace("$", r"\$")
    return "\u200b" + out if out.startswith("_") else out


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _fig().close(fig)
    return buf.getvalue()


def detection_distance_plot(det: pd.DataFrame, alpha: float, min_clique: int) -> bytes:
    """Left: each prompt's clique size vs mean intra-clique distance; right: min pairwise distance."""
    plt = _fig()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    flagged = det["detected"].astype(bool).to_numpy()
    a.scatter(det["mean_clique_distance"][~flagged], det["clique_size"][~flagged], s=12, c="#888", label="not flagged")
    a.scatter(det["mean_clique_distance"][flagged], det["clique_size"][flagged], s=16, c="#c0392b", label="flagged")
    a.axhline(min_clique, ls="--", c="k", lw=0.8)
    a.set_xlabel("mean tiled ℓ2 inside the largest clique")
    a.set_ylabel("largest clique size")
    a.set_ylim(0, max(float(det["clique_size"].max()), min_clique) * 1.1 + 1)
    a.legend(fontsize=8)
    vals = det["median_pairwise_distance"].to_numpy(dtype=float)
    mins = det["min_pairwise_distance"].to_numpy(dtype=float)
    bins = np.linspace(0, max(0.5, float(np.nanmax(vals)) if len(vals) else 0.5), 40)
    b.hist(vals, bins=bins, alpha=0.6, label="median pairwise")
    b.hist(mins, bins=bins, alpha=0.6, label="closest pair")
    b.axvline(alpha, ls="--", c="k", lw=0.8, label=f"α = {alpha:g}")
    b.set_xlabel("tiled ℓ2 between generations of one prompt")
    b.set_ylabel("prompts")
    b.legend(fontsize=8)
    return _png(fig)


def duplication_plot(rates: pd.DataFrame) -> bytes:
    """Extraction rate against training-set duplicate count (log x), as in the paper's Fig. 5."""
    plt = _fig()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(rates["duplicate_count"], rates["rate"], "o-", c="#c0392b")
    for x, y, n in zip(rates["duplicate_count"], rates["rate"], rates["prompts"]):
        ax.annotate(
            f"{int(round(y * n))}/{n}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8
        )
    ax.set_xscale("log")
    ax.set_ylim(-0.05, 1.1)
    ax.set_xlabel("copies in the training set")
    ax.set_ylabel("share of prompts extracted")
    ax.grid(alpha=0.3)
    return _png(fig)


def extraction_rate_by_duplicates(det: pd.DataFrame, ext: pd.DataFrame) -> pd.DataFrame:
    """Per duplicate count: prompts attacked, prompts extracted (rank-1 match within δ)."""
    if "duplicate_count" not in det or det["duplicate_count"].isna().all():
        return pd.DataFrame(columns=["duplicate_count", "prompts", "extracted", "rate"])
    top = ext[(ext["rank"] == 1) & ext["extracted"]] if len(ext) else ext
    hit = set(top["prompt_id"]) if len(top) else set()
    d = det.dropna(subset=["duplicate_count"]).copy()
    d["hit"] = d["prompt_id"].isin(hit)
    g = d.groupby("duplicate_count").agg(prompts=("hit", "size"), extracted=("hit", "sum")).reset_index()
    g["rate"] = g["extracted"] / g["prompts"]
    g["duplicate_count"] = g["duplicate_count"].astype(int)
    g["extracted"] = g["extracted"].astype(int)
    return g


def adaptive_budget_curve(det: pd.DataFrame, ext: pd.DataFrame, rounds: list[int]) -> pd.DataFrame:
    """An adaptive run's spending, round by round, from its tables alone.

    For each round end ``r`` (the cumulative generation counts of ``ExtractConfig.rounds()``):
    the generations spent by then (every prompt's ``min(n_samples, r)``), as a share of the full
    budget (prompts × samples_per_prompt), the prompts still running after ``r``, and the
    extractions confirmed among prompts that had stopped by ``r``. The last row is the run as it
    finished.

    Examples
    --------
    >>> det = pd.DataFrame({"prompt_id": ["a", "b", "c"], "n_samples": [10, 30, 10]})
    >>> ext = pd.DataFrame({"prompt_id": ["a", "c"], "rank": [1, 1], "extracted": [True, False]})
    >>> adaptive_budget_curve(det, ext, [10, 20, 30])[["round_end", "generations", "extractions_found"]]
       round_end  generations  extractions_found
    0          0            0                  0
    1         10           30                  1
    2         20           40                  1
    3         30           50                  1
    """
    n_full = int(rounds[-1])
    n = det["n_samples"].to_numpy(dtype=np.int64)
    top = ext[(ext["rank"] == 1) & ext["extracted"].astype(bool)] if len(ext) else ext
    hit = det["prompt_id"].isin(set(top["prompt_id"]) if len(top) else set()).to_numpy()
    rows = [{"round_end": 0, "prompts_running": len(n), "generations": 0, "extractions_found": 0}]
    for r in rounds:
        rows.append(
            {
                "round_end": int(r),
                "prompts_running": int((n > r).sum()),
                "generations": int(np.minimum(n, r).sum()),
                "extractions_found": int((hit & (n <= r)).sum()),
            }
        )
    out = pd.DataFrame(rows)
    out["evaluations_share"] = out["generations"] / max(1, len(n) * n_full)
    return out


def adaptive_budget_plot(
    curves: dict[str, pd.DataFrame],
    ylabel: str = "extractions found",
    target: tuple[float, float] | None = None,
    legend: bool | None = None,
    xlabel: str = "share of the full budget's model evaluations spent",
) -> bytes:
    """Extractions found against the share of model evaluations spent, one line per curve
    (columns ``evaluations_share`` and ``extractions_found``); ``target`` = (max share, min found)
    draws the goal's corner; ``xlabel`` says what the share is of."""
    plt = _fig()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, c in curves.items():
        ax.plot(c["evaluations_share"], c["extractions_found"], "o-", ms=4, label=plain(label))
    if target is not None:
        ax.axvline(target[0], ls="--", c="k", lw=0.8)
        ax.axhline(target[1], ls="--", c="k", lw=0.8)
    if all(float(v).is_integer() for c in curves.values() for v in c["extractions_found"]):
        from matplotlib.ticker import MaxNLocator

        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts, not shares
    ax.set_xlim(0, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend or (legend is None and len(curves) > 1):
        ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def calibrated_distance_plot(gen: pd.DataFrame, alpha_c: float) -> bytes:
    """Left: histogram of calibrated distances (ℓ < 1 extracts); right: nearest distance against
    the mean distance to the n nearest, with the decision line nearest = α_c · mean."""
    plt = _fig()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    cal = gen["calibrated"].to_numpy(dtype=float)
    cal = cal[np.isfinite(cal)]
    hi = max(2.0, float(np.quantile(cal, 0.99)) if len(cal) else 2.0)
    a.hist(np.clip(cal, 0, hi), bins=np.linspace(0, hi, 50), color="#888")
    a.axvline(1.0, ls="--", c="#c0392b", lw=1, label="ℓ = 1 (extracted below)")
    a.set_xlabel("calibrated distance ℓ(x̂, x; S_x̂)")
    a.set_ylabel("generations")
    a.legend(fontsize=8)
    hit = gen["extracted"].astype(bool).to_numpy()
    mean, near = gen["mean_distance"].to_numpy(dtype=float), gen["nearest_distance"].to_numpy(dtype=float)
    b.scatter(mean[~hit], near[~hit], s=6, c="#888", label="not extracted")
    b.scatter(mean[hit], near[hit], s=14, c="#c0392b", label="extracted")
    top = float(np.nanmax(mean)) if len(mean) else 1.0
    xs = np.linspace(0, top * 1.05, 2)
    b.plot(xs, alpha_c * xs, "k--", lw=0.8, label=f"nearest = α_c·mean (α_c = {alpha_c:g})")
    b.set_xlabel("mean distance to the n nearest training images")
    b.set_ylabel("distance to the nearest")
    b.legend(fontsize=8)
    return _png(fig)


def nearest_similarity_plot(similarities: np.ndarray) -> bytes:
    """Histogram of each indexed image's cosine similarity to its nearest other indexed image
    (near 1: near-duplicates in the training set)."""
    plt = _fig()
    fig, a = plt.subplots(1, 1, figsize=(6, 3.2))
    sims = similarities[np.isfinite(similarities)]
    lo = float(min(0.0, sims.min())) if len(sims) else 0.0
    a.hist(sims, bins=np.linspace(lo, 1.0, 50), color="#888")
    a.set_xlabel("cosine similarity to the nearest other training image")
    a.set_ylabel("training images")
    return _png(fig)


def rates_by_duplicates_plot(dup: pd.DataFrame, labels: dict) -> bytes:
    """Extraction rate against duplicate count, one line per run (``by_duplicates.parquet``)."""
    plt = _fig()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for run, g in dup.groupby("run", sort=False):
        g = g.sort_values("duplicate_count")
        ax.plot(g["duplicate_count"], g["extraction_rate"], marker="o", label=plain(labels.get(run, run)))
    ax.set_xscale("log")
    ax.set_xlabel("duplicate count in the training set")
    ax.set_ylabel("extraction rate")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    return _png(fig)


def memorization_vs_attribute_plot(table: pd.DataFrame, fits: pd.DataFrame, by: str) -> bytes:
    """Each run's ``memorization`` against ``by`` (log x), with the log-linear fit of each kind."""
    plt = _fig()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for kind, g in table.groupby("kind", sort=True):
        x = pd.to_numeric(g["label"] if by == "label" else g.get(by), errors="coerce").to_numpy(float)
        y = g["memorization"].to_numpy(float)
        ok = np.isfinite(x) & (x > 0) & np.isfinite(y)
        ax.plot(x[ok], y[ok], "o", label=f"{kind} ({g['memorization_measure'].iloc[0]})")
        for lab, xi, yi in zip(g["label"][ok], x[ok], y[ok]):
            ax.annotate(plain(lab), (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
        f = fits[fits["kind"] == kind]
        if len(f) and ok.sum() >= 2:
            xs = np.geomspace(x[ok].min(), x[ok].max(), 50)
            ax.plot(xs, f["intercept"].iloc[0] + f["slope"].iloc[0] * np.log10(xs), "-", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel(by)
    ax.set_ylabel("memorization")
    ax.legend(fontsize=8)
    return _png(fig)


def heldout_plot(table: pd.DataFrame) -> bytes:
    """A checkpoint sweep: memorization (left axis) and held-out / training loss (right) by step."""
    plt = _fig()
    t = table.sort_values("step")
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(t["step"], t["memorization"], "o-", color="C0", label=str(t["memorization_measure"].iloc[0]))
    ax.set_xlabel("training step")
    ax.set_ylabel(str(t["memorization_measure"].iloc[0]), color="C0")
    ax.set_xscale("log")
    b = ax.twinx()
    b.plot(t["step"], t["heldout_loss"], "s--", color="C3", label="held-out loss")
    if "train_loss" in t and t["train_loss"].notna().any():
        b.plot(t["step"], t["train_loss"], "^--", color="C2", label="training loss")
    text = t["kind"].astype(str).str.startswith("lm-").all() if "kind" in t else False
    b.set_ylabel("mean token NLL (nats)" if text else "diffusion loss")
    b.legend(fontsize=8, loc="upper right")
    return _png(fig)
