"""Benchmark: build and query throughput of the training index at 10^5 and 10^6 vectors of
dimension 512, memory per vector, and recall@10 of the approximate indexes against exact search.

Data: synthetic unit vectors around 1,000 random centres with a 16-dimensional spread (real
image embeddings are clustered and of low intrinsic dimension; isotropic Gaussian noise in all
512 dimensions would be a worst case no approximate index is built for). ``--spread`` sets how
much the clusters overlap: 0.3 (default) keeps them apart, 0.8 makes the spread about as large
as the distance between centres, a much harder case for IVF. Queries are fresh draws from the
same distribution. Each index is built through ``memscan.index.TrainingIndex.from_embeddings``
(what ``memscan index`` does after embedding), single process, all CPU threads.

Usage::

    python bench/index.py                      # 1e5 and 1e6, HNSW at 1e5 only
    python bench/index.py --sizes 100000 --hnsw-max 100000 --queries 2000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import numpy as np

from memscan.index.embedders import l2_normalize
from memscan.index.faiss_index import IndexParams, TrainingIndex


def vectors(
    n: int,
    d: int = 512,
    seed: int = 0,
    spread: float = 0.3,
    centres: int = 1000,
    intrinsic: int = 16,
    chunk: int = 100_000,
):
    fixed = np.random.default_rng(1234)
    c = fixed.normal(size=(centres, d)).astype(np.float32)
    basis = (fixed.normal(size=(intrinsic, d)) / np.sqrt(intrinsic)).astype(np.float32)
    out = np.empty((n, d), np.float32)
    for s in range(0, n, chunk):
        rng = np.random.default_rng([seed, s])
        m = min(chunk, n - s)
        x = c[rng.integers(0, centres, m)] + spread * rng.normal(size=(m, intrinsic)).astype(np.float32) @ basis
        out[s : s + m] = l2_normalize(x)
    return out


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(x: np.ndarray, q: np.ndarray, params: IndexParams, truth: np.ndarray | None, k: int = 10) -> dict:
    ids = [str(i) for i in range(x.shape[0])]
    t0 = time.perf_counter()
    index = TrainingIndex.from_embeddings(x, ids, params=params)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, idx = index.search(q, k)
    query = time.perf_counter() - t0
    nbytes = index.memory_bytes()
    res = {
        "type": index.params.index_type,
        "params": {k_: v for k_, v in vars(index.params).items() if v is not None and k_ != "index_type"},
        "n": x.shape[0],
        "build_s": round(build, 2),
        "build_vectors_per_s": round(x.shape[0] / build),
        "query_s": round(query, 3),
        "queries_per_s": round(q.shape[0] / query, 1),
        "index_bytes_per_vector": round(nbytes / x.shape[0], 1),
        "peak_rss_mb": round(_peak_mb()),
    }
    if truth is not None:
        res["recall_at_10"] = round(float(np.mean([len(set(a) & set(b)) / k for a, b in zip(idx, truth)])), 4)
    del index
    return res, idx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--hnsw-max", type=int, default=100_000, help="largest size an HNSW index is built for")
    ap.add_argument("--spread", type=float, default=0.3, help="cluster spread (0.3 apart, 0.8 overlapping)")
    ap.add_argument("--nlist", type=int, default=None, help="IVF cells (default: memscan's 4·sqrt(N))")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    print(f"dim {a.dim}, spread {a.spread}, {a.queries} queries, k = 10, {os.cpu_count()} CPU threads")
    rows = []
    for n in a.sizes:
        x = vectors(n, a.dim, spread=a.spread)
        q = vectors(a.queries, a.dim, seed=1, spread=a.spread)
        flat, truth = measure(x, q, IndexParams("flat"), None)
        flat["recall_at_10"] = 1.0
        rows.append(flat)
        kinds = [IndexParams("ivf", nlist=a.nlist)] + ([IndexParams("hnsw")] if n <= a.hnsw_max else [])
        for p in kinds:
            r, _ = measure(x, q, p, truth)
            rows.append(r)
        for r in rows[-1 - len(kinds) :]:
            print(
                f"N={r['n']:>9,}  {r['type']:5s} {json.dumps(r['params']):60s} build {r['build_s']:8.2f} s "
                f"({r['build_vectors_per_s']:>9,}/s)  query {r['queries_per_s']:>9,.1f}/s  "
                f"{r['index_bytes_per_vector']:7.1f} B/vector  recall@10 {r['recall_at_10']:.4f}  peak RSS {r['peak_rss_mb']} MB",
                flush=True,
            )
        del x
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
