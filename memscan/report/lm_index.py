"""``report.html`` of a ``memscan lm index`` folder (run kind ``lm-index``), from its files alone:
what the index holds (documents, tokens, shards, dtypes, bytes a token on disk), how it was built
(tokenizer record, source, throughput), the longest documents, and the number of documents by
length."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from memscan.errors import MemscanError
from memscan.report.base import environment, open_complete_run, run_context, write_page
from memscan.report.lm import _figure, _png

__all__ = ["build_lm_index_report", "document_length_plot"]


def document_length_plot(lengths: np.ndarray) -> str:
    """Histogram of document lengths in tokens (log-spaced bins)."""
    fig = _figure(6.0, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    x = np.clip(np.asarray(lengths, dtype=float), 1, None)
    bins = np.unique(np.logspace(0, np.log10(x.max()) + 1e-9, 30))
    ax.hist(x, bins=bins if len(bins) > 1 else 10, color="#2471a3")
    ax.set_xscale("log")
    ax.set_xlabel("document length (tokens; empty shown as 1)")
    ax.set_ylabel("documents")
    return _png(fig)


def build_lm_index_report(run: str | Path, out: str | Path | None = None, top: int = 20) -> Path:
    """Write ``report.html`` for a finished ``lm-index`` folder; ``top`` longest documents listed."""
    store, manifest = open_complete_run(run, "lm-index")
    root = store.root
    try:
        meta = json.loads((root / "index.json").read_text())
        docs = pd.read_parquet(root / "documents.parquet")
    except (OSError, ValueError) as exc:
        raise MemscanError(f"the corpus index {root} is damaged ({exc})", "rebuild it") from None
    longest = docs.sort_values(["n_tokens", "doc"], ascending=[False, True], kind="mergesort").head(top)
    html = (
        environment()
        .get_template("lm_index_report.html.j2")
        .render(
            **run_context(root, manifest),
            meta=meta,
            data=manifest.get("data", {}),
            tokenizer=meta.get("tokenizer") or {},
            index=manifest.get("index", {}),
            longest=longest.to_dict("records"),
            plot_png=document_length_plot(docs["n_tokens"].to_numpy()) if len(docs) else None,
        )
    )
    return write_page(html, root, out)
