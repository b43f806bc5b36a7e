"""``report.html`` for the language-model run kinds ``lm-extractable`` and ``lm-exposure``, from
their tables alone.

- ``lm-extractable``: the extractable rate by prefix length with the log-linear least-squares
  trend of Carlini et al. 2022 (rate vs log k), the (n, p) curves of Hayes et al. 2025 (the share
  of sequences extracted with probability ≥ p within n samples, log n axis), and the most memorized
  sequences with the span the greedy continuation reproduces highlighted (all text escaped);
- ``lm-exposure``: every canary's exposure and rank, and exposure by the number of inserted copies
  when the canaries say how often they were planted (Carlini et al. 2019, Fig. 2).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

from memscan.errors import MemscanError
from memscan.report.base import environment, open_complete_run, png_base64, run_context, write_page

__all__ = [
    "build_lm_exposure_report",
    "build_lm_extractable_report",
    "duplication_plot",
    "extractable_rate_plot",
    "np_curve_plot",
]

#: Sample counts n of the (n, p) curves.
N_GRID = np.unique(np.round(np.logspace(0, 9, 91))).astype(float)


def _table(store, name: str, kind: str) -> pd.DataFrame:
    path = store.root / f"{name}.parquet"
    if not path.is_file():
        raise MemscanError(f"{path} is missing", f"the {kind} run is damaged: rerun it")
    return pd.read_parquet(path)


def _figure(width=6.0, height=3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> str:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return png_base64(buf.getvalue())


def extractable_rate_plot(by_k: dict, trend: dict | None) -> str:
    """Extractable rate vs prefix length k (log axis) with the least-squares line ``a + b·log10 k``."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    ks = np.array(sorted(by_k), dtype=float)
    rates = np.array([by_k[k]["extractable_rate"] for k in sorted(by_k)])
    ax.plot(ks, rates, "o", color="#c0392b", label="k-extractable (greedy)")
    if trend:
        x = np.logspace(np.log10(ks.min()), np.log10(ks.max()), 50)
        ax.plot(x, trend["intercept"] + trend["slope_per_decade"] * np.log10(x), "--", color="#555",
                label=f"fit: {trend['slope_per_decade']:+.3f} per decade of k")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("prefix length k (tokens)")
    ax.set_ylabel("share of sequences extractable")
    ax.legend(fontsize=8)
    return _png(fig)


def np_curves(table: pd.DataFrame) -> dict:
    """``{(k, target): shares}`` over :data:`N_GRID`: share of sequences with n_samples_target ≤ n."""
    from memscan.lm.memorization import extraction_rate_within

    out = {}
    for k, g in table.groupby("prefix_len", sort=True):
        for target, col in ((0.5, "n_samples_50"), (0.9, "n_samples_90")):
            out[(int(k), target)] = extraction_rate_within(g[col].to_numpy(dtype=float), N_GRID)
    return out


def np_curve_plot(table: pd.DataFrame) -> str:
    """The (n, p) curves (Hayes et al. 2025 Fig. 1) beside the greedy rate of each prefix length."""
    fig = _figure(7.0, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    colors = ["#c0392b", "#2471a3", "#1e8449", "#7d3c98", "#b9770e", "#555"]
    for i, ((k, target), shares) in enumerate(np_curves(table).items()):
        c = colors[(i // 2) % len(colors)]
        ax.step(N_GRID, shares, "-" if target == 0.5 else ":", where="post", color=c, label=f"k={k}, p≥{target}")
        if target == 0.5:
            greedy = float(table[table["prefix_len"] == k]["extractable"].mean())
            ax.axhline(greedy, color=c, lw=0.8, alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("samples n")
    ax.set_ylabel("share of sequences extracted")
    ax.set_title("(n, p)-discoverable extraction; thin lines: greedy", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


def duplication_plot(duplication: dict) -> str:
    """Extractable rate against the duplicate count of the window (prefix + suffix), log₂-binned
    (x: the bin's mean count, log axis; marker area: sequences in the bin), with each prefix
    length's least-squares line ``a + b·log10 count`` (Carlini et al. 2022 Fig. 1b)."""
    fig = _figure(6.4, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    colors = ["#c0392b", "#2471a3", "#1e8449", "#7d3c98", "#b9770e", "#555"]
    for i, (k, d) in enumerate(sorted(duplication.items())):
        c = colors[i % len(colors)]
        curve = pd.DataFrame(d["window"]["curve"])
        curve = curve[curve["mean_count"] >= 1]
        if not len(curve):
            continue
        size = 12 + 60 * curve["sequences"] / curve["sequences"].max()
        ax.scatter(curve["mean_count"], curve["extractable_rate"], s=size, color=c, label=f"k={k}")
        fit = d["window"]["fit"]
        if fit:
            x = np.logspace(0, np.log10(max(curve["mean_count"].max(), 2)), 50)
            ax.plot(x, fit["intercept"] + fit["slope_per_decade"] * np.log10(x), "--", color=c, lw=1,
                    label=f"k={k}: {fit['slope_per_decade']:+.3f} ± {fit['slope_se']:.3f} per decade")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("occurrences of the window (prefix + suffix) in the corpus")
    ax.set_ylabel("share extractable")
    ax.legend(fontsize=7)
    return _png(fig)


def _clean(r: dict) -> dict:
    return {k: (None if not isinstance(v, str) and not isinstance(v, (list, np.ndarray)) and pd.isna(v) else v)
            for k, v in r.items()}  # fmt: skip


def _count(n: float) -> str:
    return "∞" if not np.isfinite(n) else f"{n:.3g}"


def build_lm_extractable_report(run: str | Path, out: str | Path | None = None, top: int = 25) -> Path:
    """Write ``report.html`` for a finished ``lm-extractable`` run; ``top`` most memorized rows."""
    store, manifest = open_complete_run(run, "lm-extractable")
    table = _table(store, "sequences", "lm-extractable")
    summary = manifest.get("summary") or {}
    from memscan.lm.extractable_run import extractable_rates

    rates = extractable_rates(table) if len(table) else {"by_prefix_length": {}, "trend": None}
    by_k = rates["by_prefix_length"]
    longest = max(by_k) if by_k else None
    best = table[table["prefix_len"] == longest] if longest is not None else table
    best = best.sort_values(
        ["match_fraction", "log_p_sample", "seq_id"], ascending=[False, False, True], kind="mergesort"
    )
    html = (
        environment()
        .get_template("lm_extractable_report.html.j2")
        .render(
            **run_context(store.root, manifest),
            model={"id": None, "parameters": None, "training_step": None, **manifest.get("model", {})},
            tokenizer=manifest.get("tokenizer") or {},
            data=manifest.get("data", {}),
            runner=manifest.get("runner", {}),
            by_k=by_k,
            trend=rates.get("trend"),
            pythia_rate=rates.get("pythia_extractable_rate"),
            pythia_mean=rates.get("mean_pythia_score"),
            near_ties=rates.get("near_tie_steps", summary.get("near_tie_steps", 0)),
            rate_png=extractable_rate_plot(by_k, rates.get("trend")) if by_k else None,
            np_png=np_curve_plot(table) if len(table) else None,
            longest=longest,
            rows=[{**_clean(r), "n90": _count(r["n_samples_90"])} for r in best.head(top).to_dict("records")],
            n_sequences=int(table["seq_id"].nunique()) if len(table) else 0,
            duplication=rates.get("duplication"),
            duplication_png=duplication_plot(rates["duplication"]) if rates.get("duplication") else None,
            corpus_index=manifest.get("corpus_index"),
        )
    )
    return write_page(html, store.root, out)


def exposure_by_copies_plot(exposures: pd.DataFrame) -> str:
    """Exposure against the number of inserted copies (log x), each canary's ceiling log2 |R| beside it."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    e = exposures.dropna(subset=["copies"])
    x = np.clip(e["copies"].to_numpy(dtype=float), 0.8, None)
    for method, marker in (("exact", "o"), ("estimate", "^")):
        sel = (e["method"] == method).to_numpy()
        if sel.any():
            ax.scatter(x[sel], e["exposure"].to_numpy()[sel], marker=marker, color="#c0392b", label=method)
    ax.scatter(x, e["max_exposure"].to_numpy(dtype=float), marker="_", s=200, color="#555",
               label="log2 |R| of its format (rank 1)")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("copies of the canary in the training data")
    ax.set_ylabel("exposure (bits)")
    ax.legend(fontsize=8)
    return _png(fig)


def build_lm_exposure_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` for a finished ``lm-exposure`` run."""
    store, manifest = open_complete_run(run, "lm-exposure")
    exposures = _table(store, "exposures", "lm-exposure")
    has_copies = "copies" in exposures and exposures["copies"].notna().any()
    by_copies = []
    if has_copies:
        for c, g in exposures.dropna(subset=["copies"]).groupby("copies", sort=True):
            by_copies.append({"copies": int(c), "canaries": len(g), "mean": float(g["exposure"].mean()),
                              "min": float(g["exposure"].min()), "max": float(g["exposure"].max())})  # fmt: skip
    html = (
        environment()
        .get_template("lm_exposure_report.html.j2")
        .render(
            **run_context(store.root, manifest),
            model={"id": None, "parameters": None, "training_step": None, **manifest.get("model", {})},
            tokenizer=manifest.get("tokenizer") or {},
            runner=manifest.get("runner", {}),
            rows=[
                _clean(r)
                for r in exposures.sort_values(["copies", "canary_id"], na_position="first").to_dict("records")
            ],
            by_copies=by_copies,
            plot_png=exposure_by_copies_plot(exposures) if has_copies else None,
        )
    )
    return write_page(html, store.root, out)
