"""``report.html`` for the run kind ``lm-extract`` (sampling and ranking, Carlini et al. 2021),
from its tables alone:

- precision@N of each ranking metric beside the share of all kept samples confirmed (the
  expectation of a random ranking);
- every confirmed sample with the span that the corpus index found highlighted (all text escaped
  by the page's autoescaping), its corpus location and how often that span, and its first
  ``min_match`` units, occur in the corpus;
- the duplication of the extracted sequences: the confirmed samples in log₂ bins
  (:func:`memscan.lm.duplication.log2_bin`, the bins of ``lm extractable``) of
  ``match_window_count``, the corpus count of the window that confirmed each — the first
  ``min_match`` units of its longest match, one length for every sample (Carlini et al. 2022
  count the duplicates of the evaluated sequence itself) — and, per sample, that count against
  the samples it stands for (itself and its removed near duplicates).

No trend of memorization with duplication is fitted here. A sample that is not confirmed has no
``min_match`` window in the corpus (its count is 0), so the confirmed share of the samples at a
duplication level ≥ 1 is 1 by construction; the count of a sample's longest match instead varies
with that match's length (short common n-grams of unconfirmed samples occur very often), so
binning by it encodes the match length, not duplication. The log-linear trend of Carlini et al.
2022 (Fig. 1b) and Kandpal et al. 2022 is measured over training sequences of known duplication,
the extractable and the not extractable alike: ``memscan lm extractable --index`` and its report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from memscan.lm.duplication import log2_bin
from memscan.report.base import environment, open_complete_run, run_context, write_page
from memscan.report.lm import _clean, _figure, _png, _table

__all__ = ["build_lm_extract_report", "duplication_bins", "duplication_plot"]

KIND = "lm-extract"
#: The column of the fixed-length duplicate count (absent from runs made before it existed).
WINDOW_COUNT = "match_window_count"


def _extracted(samples: pd.DataFrame) -> pd.DataFrame:
    """The confirmed samples with a window count (every confirmed sample has one ≥ 1)."""
    return samples[samples["confirmed"].astype(bool) & (samples[WINDOW_COUNT] > 0)]


def duplication_bins(samples: pd.DataFrame) -> list[dict]:
    """The confirmed samples by log₂ bin of ``match_window_count`` (``[1, 2), [2, 4), …``):
    ``{low, high, samples, generated, mean_count, mean_match_len}`` per non-empty bin, ``high``
    exclusive; ``generated`` counts the samples they stand for (``duplicates + 1`` each)."""
    s = _extracted(samples)
    if s.empty:
        return []
    c = s[WINDOW_COUNT].to_numpy(dtype=np.int64)
    b = log2_bin(c)
    out = []
    for k in np.unique(b):
        sel = s[b == k]
        out.append({"low": int(2 ** (k - 1)), "high": int(2**k), "samples": int(len(sel)),
                    "generated": int((sel["duplicates"].to_numpy(dtype=np.int64) + 1).sum()),
                    "mean_count": float(c[b == k].mean()),
                    "mean_match_len": float(sel["match_len"].mean())})  # fmt: skip
    return out


def duplication_plot(samples: pd.DataFrame, bins: list[dict]) -> str:
    """Left: the confirmed samples per log₂ bin of ``match_window_count``. Right: each confirmed
    sample's ``match_window_count`` against the samples it stands for (``duplicates + 1``), log
    axes; no line (only sequences generated at least once are here)."""
    from matplotlib.ticker import FuncFormatter, LogFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    fig = _figure(7.0, 3.6)
    ax = fig.add_subplot(1, 2, 1)
    lows = np.array([b["low"] for b in bins], dtype=float)
    highs = np.array([b["high"] for b in bins], dtype=float)
    ax.bar(lows, [b["samples"] for b in bins], width=highs - lows, align="edge", color="#c0392b", edgecolor="white")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(plain)
    ax.set_xlabel("corpus occurrences of the confirming window")
    ax.set_ylabel("confirmed samples")
    ax2 = fig.add_subplot(1, 2, 2)
    s = _extracted(samples)
    ax2.scatter(s[WINDOW_COUNT], s["duplicates"] + 1, s=12, color="#c0392b")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    for axis in (ax2.xaxis, ax2.yaxis):  # plain numbers; minor ticks labelled on a short range only
        axis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
    ax2.set_xlabel("corpus occurrences of the confirming window")
    ax2.set_ylabel("samples (with near duplicates)")
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
    has_window = WINDOW_COUNT in samples
    bins = duplication_bins(samples) if has_window else []
    metrics = manifest.get("metrics", [])
    cols = ["sample_id", "match_len", "match_count", "match_doc", "match_offset", "match_train_id", "duplicates",
            "match_before", "match_text", "match_after", "perplexity"] + [f"rank_{m}" for m in metrics]  # fmt: skip
    cols += [WINDOW_COUNT] if has_window else []
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
            has_window=has_window,
            bins=bins,
            dup_png=duplication_plot(samples, bins) if bins else None,
        )
    )
    return write_page(html, store.root, out)
