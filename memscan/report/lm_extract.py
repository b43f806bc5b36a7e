"""``report.html`` for the run kind ``lm-extract`` (sampling and ranking, Carlini et al. 2021),
from its tables alone:

- precision@N of each ranking metric beside the share of all kept samples confirmed (the
  expectation of a random ranking);
- every confirmed sample with the span that the corpus index found highlighted (all text escaped
  by the page's autoescaping), its corpus location and how often that span occurs in the corpus;
- memorization against duplication: the confirmed share of the samples by how often their longest
  match occurs in the corpus (log-spaced bins), with a least-squares line on log10 of the count
  (the log-linear trend of Carlini et al. 2022 and Kandpal et al. 2022).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from memscan.report.base import environment, open_complete_run, run_context, write_page
from memscan.report.lm import _clean, _figure, _png, _table

__all__ = ["build_lm_extract_report", "duplication_bins", "duplication_plot"]

KIND = "lm-extract"


def duplication_bins(samples: pd.DataFrame) -> list[dict]:
    """Samples with a match, binned by its corpus count (1–2, 3–9, 10–31, …: half-decades):
    ``{lo, hi, samples, confirmed, rate, mean_match_len}`` per non-empty bin."""
    s = samples[samples["match_count"] > 0]
    if s.empty:
        return []
    edges = np.unique(np.round(10 ** np.arange(0, np.log10(s["match_count"].max()) + 0.5, 0.5)).astype(int))
    edges = np.append(edges, np.iinfo(np.int64).max)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = s[(s["match_count"] >= lo) & (s["match_count"] < hi)]
        if len(sel):
            out.append({"lo": int(lo), "hi": int(min(hi - 1, s["match_count"].max())), "samples": int(len(sel)),
                        "confirmed": int(sel["confirmed"].sum()), "rate": float(sel["confirmed"].mean()),
                        "mean_match_len": float(sel["match_len"].mean())})  # fmt: skip
    return out


def duplication_fit(bins: list[dict]) -> dict | None:
    """Least squares ``rate = a + b · log10(count)`` over the bins' lower edges (None below 2 bins)."""
    if len(bins) < 2:
        return None
    x = np.log10([b["lo"] for b in bins])
    slope, intercept = np.polyfit(x, [b["rate"] for b in bins], 1)
    return {"slope_per_decade": float(slope), "intercept": float(intercept), "points": len(bins)}


def duplication_plot(samples: pd.DataFrame, bins: list[dict], fit: dict | None) -> str:
    """Each sample's longest-match length against the corpus count of that span (log x), and the
    confirmed share per bin."""
    fig = _figure(7.0, 3.6)
    ax = fig.add_subplot(1, 2, 1)
    s = samples[samples["match_count"] > 0]
    conf = s["confirmed"].to_numpy(dtype=bool)
    ax.scatter(s["match_count"][~conf], s["match_len"][~conf], s=8, color="#999", label="not confirmed")
    ax.scatter(s["match_count"][conf], s["match_len"][conf], s=12, color="#c0392b", label="confirmed")
    ax.set_xscale("log")
    ax.set_xlabel("corpus occurrences of the matched span")
    ax.set_ylabel("longest match")
    ax.legend(fontsize=7)
    ax2 = fig.add_subplot(1, 2, 2)
    if bins:
        ax2.plot([b["lo"] for b in bins], [b["rate"] for b in bins], "o", color="#c0392b")
        if fit:
            x = np.logspace(0, np.log10(max(b["lo"] for b in bins)), 30)
            ax2.plot(x, fit["intercept"] + fit["slope_per_decade"] * np.log10(x), "--", color="#555")
    ax2.set_xscale("log")
    ax2.set_xlabel("corpus occurrences (bin start)")
    ax2.set_ylabel("share confirmed")
    return _png(fig)


def build_lm_extract_report(run: str | Path, out: str | Path | None = None, top: int = 50) -> Path:
    """Write ``report.html`` for a finished ``lm-extract`` run; at most ``top`` confirmed samples
    are shown (longest match first)."""
    from memscan.lm.ranking import METRIC_DESCRIPTIONS

    store, manifest = open_complete_run(run, KIND)
    samples = _table(store, "samples", KIND)
    precision = _table(store, "precision", KIND)
    confirmed = samples[samples["confirmed"]].sort_values(["match_len", "sample_id"], ascending=[False, True],
                                                            kind="mergesort")  # fmt: skip
    bins = duplication_bins(samples)
    fit = duplication_fit(bins)
    metrics = manifest.get("metrics", [])
    cols = ["sample_id", "match_len", "match_count", "match_doc", "match_offset", "match_train_id", "duplicates",
            "match_before", "match_text", "match_after", "perplexity"] + [f"rank_{m}" for m in metrics]  # fmt: skip
    html = (
        environment()
        .get_template("lm_extract_report.html.j2")
        .render(
            **run_context(store.root, manifest),
            model={"id": None, "parameters": None, "training_step": None, **(manifest.get("model") or {})},
            reference=manifest.get("reference_model"),
            index=manifest.get("index", {}),
            unit=manifest.get("match_unit", "tokens"),
            min_match=manifest.get("min_match"),
            prompts=manifest.get("prompts", {}),
            runner=manifest.get("runner", {}),
            precision=[_clean(r) for r in precision.to_dict("records")],
            descriptions=METRIC_DESCRIPTIONS,
            metrics=metrics,
            rows=[_clean(r) for r in confirmed[cols].head(top).to_dict("records")],
            n_confirmed=int(len(confirmed)),
            bins=bins,
            fit=fit,
            dup_png=duplication_plot(samples, bins, fit) if bins else None,
        )
    )
    return write_page(html, store.root, out)
