"""Benchmark: the k-NN outlier score of every training example in a training index's embedding
space (``memscan.compare.outliers.index_knn_distance``: FAISS candidates, exact float64
re-ranking, the example itself excluded) against a brute force in the same process (blocked
``Q × N`` cosine matrix in numpy, ``np.partition`` per row).

Synthetic L2-normalised vectors (clustered, with planted exact duplicates), a flat index built
with ``TrainingIndex.from_embeddings``. Prints both times, their ratio, and the agreement.

Usage::

    python bench/outliers_index.py [--n 20000] [--dim 128] [--k 5] [--threads 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def brute(emb: np.ndarray, k: int, block: int = 2048) -> np.ndarray:
    """k-th smallest 1 − cos to the other rows (self excluded by position), float64."""
    x = emb.astype(np.float64)
    n = len(x)
    out = np.empty(n)
    for s in range(0, n, block):
        d = 1.0 - x[s : s + block] @ x.T
        d[np.arange(d.shape[0]), np.arange(s, s + d.shape[0])] = np.inf  # the example itself
        out[s : s + block] = np.partition(d, k - 1, axis=1)[:, k - 1]
    return np.maximum(out, 0.0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    import faiss

    from memscan.compare.outliers import index_knn_distance
    from memscan.index.embedders import l2_normalize
    from memscan.index.faiss_index import TrainingIndex

    faiss.omp_set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(a.n // 50, a.dim))
    x = centres[rng.integers(0, len(centres), a.n)] + 0.5 * rng.normal(size=(a.n, a.dim))
    x[1:200:2] = x[0:200:2]  # 100 planted exact duplicate pairs
    emb = l2_normalize(x)
    ids = [f"t{i}" for i in range(a.n)]
    load0 = os.getloadavg()
    index = TrainingIndex.from_embeddings(emb, ids, params="flat")
    t = time.perf_counter()
    ours = index_knn_distance(index, ids, None, a.k)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    ref = brute(emb, a.k)
    t_brute = time.perf_counter() - t
    err = float(np.max(np.abs(ours - ref)))
    res = {
        "n": a.n,
        "dim": a.dim,
        "k": a.k,
        "threads": a.threads,
        "memscan_s": round(t_ours, 3),
        "brute_numpy_s": round(t_brute, 3),
        "speedup": round(t_brute / t_ours, 2),
        "max_abs_difference": err,
        "duplicates_score_zero": bool(np.all(ours[:200] <= 1e-6)) if a.k == 1 else None,
        "load_before": [round(v, 2) for v in load0],
        "load_after": [round(v, 2) for v in os.getloadavg()],
    }
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
