"""``report.html`` of a ``memscan index`` folder (run kind ``index``), from its files alone.

The page shows what the index holds and how it was built: counts (listed, indexed, skipped),
the embedder and the FAISS parameters, timings, the unreadable training files, and a histogram
of every indexed image's similarity to its nearest other image (near 1: near-duplicates, the
training images most at risk of memorization), computed on a seeded sample of at most
:data:`SAMPLE` images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from memscan.index.faiss_index import TrainingIndex
from memscan.report.base import environment, open_complete_run, png_base64, run_context, write_page
from memscan.report.plots import nearest_similarity_plot

#: Images whose nearest neighbour the page's histogram is computed from (seeded sample).
SAMPLE = 2000


def nearest_similarities(index: TrainingIndex, sample: int = SAMPLE, seed: int = 0) -> np.ndarray:
    """Cosine similarity of (a seeded sample of) the indexed images to their nearest other one.

    Examples
    --------
    >>> from memscan.index.embedders import l2_normalize
    >>> x = l2_normalize(np.array([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0]]))
    >>> [round(float(v), 3) for v in nearest_similarities(TrainingIndex.from_embeddings(x, ["a", "b", "c"]))]
    [1.0, 1.0, 0.01]
    """
    n = len(index)
    if n < 2:
        return np.zeros(0, np.float32)
    rows = np.arange(n) if n <= sample else np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
    sims, idx = index.search(np.asarray(index.embeddings[rows], np.float32), 2)
    other = np.where(idx[:, 0] == rows, sims[:, 1], sims[:, 0])  # skip the image itself
    return other.astype(np.float32)


def build_index_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` for a finished ``memscan index`` folder; returns its path."""
    store, manifest = open_complete_run(run, "index")
    root = store.root
    index = TrainingIndex.load(root, mmap=True)
    sims = nearest_similarities(index)
    html = (
        environment()
        .get_template("index_report.html.j2")
        .render(
            **run_context(root, manifest),
            manifest=manifest,
            index_params=manifest.get("index", {}),
            embedder=manifest.get("embedder", manifest["config"].get("embedder")),
            skipped_files=manifest.get("skipped_files", []),
            timings=manifest.get("timings_s", {}),
            sims=sims,
            near_duplicates=int((sims >= 0.99).sum()),
            plot_png=png_base64(nearest_similarity_plot(sims)) if len(sims) else None,
        )
    )
    return write_page(html, root, out)
