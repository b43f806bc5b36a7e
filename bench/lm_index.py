"""Benchmark: the exact-substring corpus index (``memscan.CorpusIndex``) — build rate, peak
memory, bytes a token on disk, and count latency against a naive scan of the same corpus, in one
process.

The corpus is synthetic and made here: Zipf-distributed token ids (p(rank r) ∝ 1/r) from a
50,000-token vocabulary, cut into documents of geometric length (mean 1,000 tokens), with
``--passages`` planted 64-token passages each copied a log-uniform number of times (2 … 500)
into random documents — the repeated text an extraction attack finds.

- **build**: ``CorpusIndex.build(docs, out, vocab_size=50257)`` on the documents already in
  memory (tokenization excluded), timed end to end (suffix sort, writing, the run's bookkeeping);
  peak memory is the largest resident set sampled every 20 ms during the build, above the
  resident set before it (the corpus itself);
- **disk**: the index files' bytes (tokens, suffix array, document starts) per corpus token;
- **count**: ``index.count(q)`` for ``--queries`` queries of 32 and of 50 tokens, half taken from
  the corpus (present; the planted passages among them) and half random (absent), median and 90th
  percentile per query, against a naive scan of the concatenated corpus (numpy: the positions
  equal to q[0], filtered token by token) on a subset, whose counts must be equal;
- **longest_match** on the 50-token queries.

Infini-gram (Liu et al. 2024) for comparison: about 7 bytes a token (2-byte ids + 5-byte suffix
array pointers), and counts in tens of milliseconds on 1.4 × 10^12 tokens (on-disk, SSD).

The machine is a shared 2-core box; the 1-minute load average before and after is recorded with
every figure.

Usage::

    python bench/lm_index.py --tokens 10000000 --json bench/results/lm_index_1e7.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's memscan

from memscan import CorpusIndex  # noqa: E402

VOCAB = 50_000
SEP = 65_535  # the naive scan's document separator (never a token id)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Largest resident set seen every ``interval`` seconds while the block runs."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = rss_bytes()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())


def make_corpus(n_tokens: int, passages: int, seed: int = 0):
    """(flat corpus with SEP between documents, document views, planted passages, copies)."""
    rng = np.random.default_rng(seed)
    # 1. Zipf ids by inverse CDF over ranks 1..VOCAB
    cdf = np.cumsum(1.0 / np.arange(1, VOCAB + 1))
    cdf /= cdf[-1]
    ids = np.empty(n_tokens, dtype=np.uint16)
    step = 1 << 22
    for s in range(0, n_tokens, step):
        ids[s : s + step] = np.searchsorted(cdf, rng.random(min(step, n_tokens - s)))
    # 2. document lengths (geometric, mean 1000) and the flat corpus with separators
    lengths = []
    total = 0
    while total < n_tokens:
        n = min(int(rng.geometric(1 / 1000)), n_tokens - total)
        lengths.append(n)
        total += n
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths + 1, out=starts[1:])
    flat = np.full(int(starts[-1]), SEP, dtype=np.uint16)
    src = np.concatenate([[0], np.cumsum(lengths)])
    for d in range(len(lengths)):
        flat[starts[d] : starts[d] + lengths[d]] = ids[src[d] : src[d + 1]]
    del ids
    # 3. planted passages, copied 2..500 times (log-uniform) over documents long enough
    planted = rng.integers(0, VOCAB, size=(passages, 64)).astype(np.uint16)
    copies = np.round(np.exp(rng.uniform(np.log(2), np.log(500), size=passages))).astype(int)
    long_docs = np.flatnonzero(lengths >= 64)
    for p in range(passages):
        for d in rng.choice(long_docs, size=copies[p]):
            off = starts[d] + rng.integers(0, lengths[d] - 64 + 1)
            flat[off : off + 64] = planted[p]
    docs = [flat[starts[d] : starts[d] + lengths[d]] for d in range(len(lengths))]
    return flat, docs, planted, copies


def naive_count(flat: np.ndarray, q: np.ndarray) -> int:
    """Occurrences of q in flat, by a vectorized scan: positions equal to q[0], then filtered."""
    m = len(q)
    pos = np.flatnonzero(flat[: len(flat) - m + 1] == q[0])
    for j in range(1, m):
        pos = pos[flat[pos + j] == q[j]]
        if not len(pos):
            break
    return int(len(pos))


def queries(flat: np.ndarray, planted: np.ndarray, m: int, n: int, rng) -> list[np.ndarray]:
    present = []
    while len(present) < n // 2:
        s = int(rng.integers(0, len(flat) - m))
        w = flat[s : s + m]
        if not (w == SEP).any():
            present.append(w.copy())
    present[: min(len(planted), n // 8)] = [p[:m].copy() for p in planted[: n // 8]]
    absent = [rng.integers(0, VOCAB, size=m).astype(np.uint16) for _ in range(n - len(present))]
    return present + absent


def timed(fn, qs) -> tuple[list[float], list]:
    times, out = [], []
    for q in qs:
        t0 = time.perf_counter()
        out.append(fn(q))
        times.append(time.perf_counter() - t0)
    return times, out


def ms(times) -> dict:
    return {
        "median_ms": round(1e3 * statistics.median(times), 4),
        "p90_ms": round(1e3 * float(np.percentile(times, 90)), 4),
        "n": len(times),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=10_000_000)
    ap.add_argument("--passages", type=int, default=100)
    ap.add_argument("--queries", type=int, default=400, help="queries per length (half present, half absent)")
    ap.add_argument("--naive", type=int, default=20, help="queries per length also answered by the naive scan")
    ap.add_argument("--shard-tokens", type=int, default=1 << 27)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the index (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    flat, docs, planted, copies = make_corpus(args.tokens, args.passages)
    gen_s = time.perf_counter() - t0
    print(f"corpus: {args.tokens:,} tokens, {len(docs):,} documents, {args.passages} planted passages "
          f"({int(copies.sum()):,} copies) in {gen_s:.1f} s; load {load_before[0]:.2f}")  # fmt: skip

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        out = Path(tmp) / "idx"
        rss0 = rss_bytes()
        with PeakRSS() as peak:
            t0, c0 = time.perf_counter(), time.process_time()
            index = CorpusIndex.build(docs, out, vocab_size=50_257, shard_tokens=args.shard_tokens)
            build_s, build_cpu = time.perf_counter() - t0, time.process_time() - c0
        disk = index.meta["disk_bytes"]
        build = {
            "seconds": round(build_s, 2),
            "tokens_per_s": round(args.tokens / build_s),
            "cpu_seconds": round(build_cpu, 2),
            "tokens_per_cpu_s": round(args.tokens / build_cpu),
            "peak_rss_above_corpus_gib": round((peak.peak - rss0) / 2**30, 3),
            "peak_rss_gib": round(peak.peak / 2**30, 3),
            "disk_bytes": disk,
            "bytes_per_token": round(disk / args.tokens, 3),
            "shards": len(index.shards),
            "breakdown_s": json.loads((out / "manifest.json").read_text())["throughput"]["this_process"],
            "dtypes": index.meta["dtypes"],
        }
        print(f"build breakdown (s): {build['breakdown_s']}")
        print(f"build: {build_s:.1f} s = {build['tokens_per_s']:,} tokens/s ({build_cpu:.1f} s CPU); peak RSS +{build['peak_rss_above_corpus_gib']} GiB "
              f"(total {build['peak_rss_gib']} GiB); {build['bytes_per_token']} bytes/token on disk")  # fmt: skip

        rng = np.random.default_rng(1)
        results = {}
        for m in (32, 50):
            qs = queries(flat, planted, m, args.queries, rng)
            index.count(qs[0])  # touch the maps once
            t_count, counts = timed(index.count, qs)
            sub = qs[: args.naive // 2] + qs[-(args.naive - args.naive // 2) :]
            t_naive, naive = timed(lambda q: naive_count(flat, q), sub)
            want = [index.count(q) for q in sub]
            assert naive == want, f"index and naive scan disagree at m={m}: {naive} vs {want}"
            t_long, _ = timed(index.longest_match, qs)
            half = len(qs) // 2
            n_planted = min(len(planted), args.queries // 8)  # the first present queries are planted passages
            results[m] = {
                "count": ms(t_count),
                "count_present": ms(t_count[:half]),
                "count_absent": ms(t_count[half:]),
                "naive_scan": ms(t_naive),
                "speedup_vs_naive_median": round(statistics.median(t_naive) / statistics.median(t_count)),
                "longest_match": ms(t_long),
                "planted_counts_min_max": [int(min(counts[:n_planted])), int(max(counts[:n_planted]))],
            }
            r = results[m]
            print(f"m={m}: count median {r['count']['median_ms']} ms (p90 {r['count']['p90_ms']}), "
                  f"naive scan {r['naive_scan']['median_ms']} ms → {r['speedup_vs_naive_median']:,}×; "
                  f"longest_match {r['longest_match']['median_ms']} ms")  # fmt: skip
        index.close()
    load_after = os.getloadavg()
    report = {
        "benchmark": "bench/lm_index.py",
        "tokens": args.tokens,
        "documents": len(docs),
        "vocab": VOCAB,
        "passages": args.passages,
        "corpus_generation_s": round(gen_s, 1),
        "build": build,
        "queries": {str(k): v for k, v in results.items()},
        "targets": {
            "bytes_per_token_le_8": build["bytes_per_token"] <= 8,
            "build_ge_1M_tokens_per_s": build["tokens_per_s"] >= 1_000_000,
            "count_le_1ms": all(v["count"]["median_ms"] <= 1 for v in results.values()),
        },
        "infini_gram_published": {"bytes_per_token": 7, "count_ms": "tens of ms at 1.4e12 tokens (on disk)"},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "machine": f"{os.cpu_count()} CPUs, shared with other jobs (see the load averages)",
    }
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
