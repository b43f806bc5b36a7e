"""Benchmark of the detection step: pairwise tiled ℓ2 + largest clique for one prompt.

Prints figures; asserts nothing. One prompt = N generations (default 500, as in Carlini et al.
2023) of S×S×3 uint8 images. Two cases per size:

- ``random``: independent random images (no edges below alpha: the clique step is trivial);
- ``memorized``: noisy copies of one image (Gaussian noise, σ per copy uniform in [1, 6] grey
  levels) plus 40 unrelated images, so the clique step sees a near-complete graph and the
  near-zero refinement of the distance matrix is exercised.

Each (size, case, threads) runs in a fresh subprocess so that its peak memory is its own.
Method (also printed):

- time: median of ``--reps`` runs after one warm-up run, ``time.perf_counter``;
- peak memory: Linux peak resident set size (``VmHWM``) during one detection, minus the resident
  size just before it with the generations already in memory; the peak is reset first by
  writing ``5`` to ``/proc/self/clear_refs``. tracemalloc cannot see torch's allocations;
  this counts everything the process touches (torch, MKL buffers, numpy);
- roofline: float32 ``torch.mm`` rate in the same process and thread setting, the best median
  over square 1024/2048 products and the workload's own GEMM shape, measured before and after;
- useful flops: the matrix is symmetric and only one triangle is needed, so the useful work is
  one multiply-add per pixel per unordered pair, ``2 · N(N−1)/2 · H·W·C ≈ N²·H·W·C`` flops;
- naive reference: a per-pair numpy loop in float64 (convert both images, loop over the 16
  tiles, ``sqrt(mean(diff²))``, max), timed on a random sample of pairs in the same process and
  extrapolated to all N(N−1)/2 pairs (the same clique step is then added to its time).

Also:

- thread sweep: every row is run with one thread and with torch's default (``--threads 1 0``);
  the table gives the default-thread rows' speed against the one-thread row of the same case;
- shard rows (``--shard 8``): one process, P prompts of one case; prompts/s of one thread,
  one prompt at a time (``detect`` each) against default threads and ``detect_many`` over the
  P prompts (distances and cliques included), and the same for the distances alone;
- ``--device cuda``: the generations are moved to the GPU first; times are taken after
  ``torch.cuda.synchronize()``, the peak is float32 ``torch.mm`` on that GPU (4096³ and 8192³),
  memory is the peak CUDA allocation above the inputs; the shard rows then use the batched
  GEMM path (one ``baddbmm`` per row of tiles over the P prompts, the exact refinement of
  all P at once);
- ``--profile``: the shard rows also profile one batched distance call (torch.profiler): the
  top operators by self time (device time on a GPU) and, on a GPU, the host synchronisations.

Usage::

    python bench/detect.py                       # 64 and 256, threads 1 and default
    python bench/detect.py --sizes 64 --reps 5 --shard 8
    python bench/detect.py --device cuda --threads 0 --shard 8
    python bench/detect.py --device cuda --sizes 64 256 --threads 0 --reps 3 --shard 8 --profile
    python bench/detect.py --markdown docs/benchmarks.md   # also write the docs section
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Detection (pairwise tiled ℓ2 + clique)"
TARGETS = {
    "speedup": 100.0,
    "roofline": {64: 0.50, 256: 0.60},
    "memory": 3.0,
    "threads_256": 1.7,
    "shard": 1.6,
    "gpu": 0.30,
}


# --------------------------------------------------------------------------------------------
# worker: one configuration, in its own process
# --------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    """Give freed heap memory back to the OS, so that reuse shows up in the next peak."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def _median_time(fn, reps: int, device: str = "cpu") -> tuple[float, float]:
    """Median wall-clock and median process CPU time (all threads) of ``reps`` calls (on a GPU,
    up to the end of its work)."""
    wall, cpu = [], []
    for _ in range(reps):
        _sync(device)
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(wall), statistics.median(cpu)


def _mm_rate(torch, m: int, k: int, n: int, reps: int = 5, device: str = "cpu") -> tuple[float, float]:
    a = torch.randn(m, k, device=device)
    b = torch.randn(n, k, device=device)
    out = torch.empty(m, n, device=device)
    torch.mm(a, b.T, out=out)
    wall, cpu = _median_time(lambda: torch.mm(a, b.T, out=out), reps, device)
    flop = 2.0 * m * n * k
    return flop / wall / 1e9, flop / cpu / 1e9


def _int8_rate(torch, m: int, k: int, n: int, reps: int = 5, device: str = "cpu") -> tuple[float, float]:
    """GOP/s (per wall second, per CPU second) of ``torch._int_mm`` (int8 → int32), counted as
    the float rows are (2·m·n·k)."""
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=device)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=device)
    out = torch.empty(m, n, dtype=torch.int32, device=device)
    torch._int_mm(a, b.T, out=out)
    wall, cpu = _median_time(lambda: torch._int_mm(a, b.T, out=out), reps, device)
    op = 2.0 * m * n * k
    return op / wall / 1e9, op / cpu / 1e9


def _int8_peak(torch, device: str) -> float | None:
    """The int8 product's rate at 8192³ (GPU) or 2048³ (CPU), or None without int8 products."""
    from memscan.distances import _int8_gram_ok

    if not _int8_gram_ok(torch.device(device)):
        return None
    size = 8192 if device.startswith("cuda") else 2048
    return _int8_rate(torch, size, size, size, reps=5 if size == 8192 else 3, device=device)[0]


def _peak_gflops(torch, n: int, d: int, device: str = "cpu") -> dict:
    """GFLOP/s (per wall second, per CPU second) of float32 torch.mm at a few shapes."""
    if device.startswith("cuda"):
        return {
            "4096^3": _mm_rate(torch, 4096, 4096, 4096, reps=10, device=device),
            "8192^3": _mm_rate(torch, 8192, 8192, 8192, reps=5, device=device),
            f"{n}x{d}x{n}": _mm_rate(torch, n, d, n, reps=10, device=device),
        }
    return {
        "1024^3": _mm_rate(torch, 1024, 1024, 1024),
        "2048^3": _mm_rate(torch, 2048, 2048, 2048, reps=3),
        f"{n}x{d}x{n}": _mm_rate(torch, n, d, n),
    }


def make_generations(np, case: str, n: int, size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    if case == "random":
        return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    n_other = min(40, n // 10)
    n_copies = n - n_other
    base = rng.integers(0, 256, (1, size, size, 3)).astype(np.float32)
    sigma = rng.uniform(1.0, 6.0, (n_copies, 1, 1, 1)).astype(np.float32)
    out = np.empty((n, size, size, 3), np.uint8)
    for s in range(0, n_copies, 50):  # in chunks: keep the float32 temporaries small
        e = min(n_copies, s + 50)
        noise = rng.standard_normal((e - s, size, size, 3), dtype=np.float32) * sigma[s:e]
        out[s:e] = np.clip(np.rint(base + noise), 0, 255)
    out[n_copies:] = rng.integers(0, 256, (n_other, size, size, 3), dtype=np.uint8)
    return out[rng.permutation(n)]


def naive_tiled_l2(np, a, b, grid: int = 4) -> float:
    """The reference a reader would write: one pair, float64, loop over tiles."""
    a = a.astype(np.float64) / 255.0
    b = b.astype(np.float64) / 255.0
    th, tw = a.shape[0] // grid, a.shape[1] // grid
    worst = 0.0
    for i in range(grid):
        for j in range(grid):
            diff = a[i * th : (i + 1) * th, j * tw : (j + 1) * tw] - b[i * th : (i + 1) * th, j * tw : (j + 1) * tw]
            worst = max(worst, float(np.sqrt(np.mean(diff * diff))))
    return worst


def _setup(args):
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    sys.path.insert(0, str(ROOT))
    return torch


def _on(torch, x, device: str):
    return x if device == "cpu" else torch.from_numpy(x).to(device)


class _Peak:
    """Peak memory of one call above what is allocated before it: the Linux peak resident set
    (CPU) or the peak CUDA allocation (GPU)."""

    def __init__(self, torch, device: str):
        self.torch, self.device = torch, device

    def __enter__(self):
        import gc

        gc.collect()
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize(self.device)
            self.torch.cuda.reset_peak_memory_stats(self.device)
            self.base = self.torch.cuda.memory_allocated(self.device)
            self.ok = True
        else:
            _trim()
            self.base = (_status_kib("VmRSS") or 0) * 1024
            self.ok = _reset_peak()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize(self.device)
            self.delta = self.torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            hwm = _status_kib("VmHWM")
            self.delta = hwm * 1024 - self.base if (self.ok and hwm and self.base) else None


def worker(args) -> dict:
    import numpy as np

    torch = _setup(args)
    import memscan.distances as dist_mod
    from memscan.cliques import largest_clique
    from memscan.distances import pairwise_tiled_l2

    n, size, grid, device = args.n, args.size, 4, args.device
    alpha = args.alpha

    def distances(x):
        return pairwise_tiled_l2(x, grid, exact_near=alpha)  # as detection computes them

    # warm-up on a small batch (kernels, thread pools, lazy imports)
    warm = _on(torch, make_generations(np, args.case, 32, size, seed=1), device)
    largest_clique(distances(warm), alpha)

    x_host = make_generations(np, args.case, n, size)
    x = _on(torch, x_host, device)
    d_tile = (size // grid) ** 2 * 3

    # 1. peak memory of one detection, above the memory in use with the generations loaded
    #    (first, before any large temporary has grown the heap)
    with _Peak(torch, device) as peak:
        dist = distances(x)
        clique = largest_clique(dist, alpha)
    dist = dist.cpu().numpy() if hasattr(dist, "cpu") else dist

    # 2. time, then the matmul rate around it
    peak_before = _peak_gflops(torch, n, d_tile, device)
    t_dist, c_dist = _median_time(lambda: distances(x), args.reps, device)
    t_clique, c_clique = _median_time(lambda: largest_clique(dist, alpha), args.reps)
    peak_after = _peak_gflops(torch, n, d_tile, device)
    peak_wall = max(v[0] for p in (peak_before, peak_after) for v in p.values())
    peak_cpu = max(v[1] for p in (peak_before, peak_after) for v in p.values())
    # 3. which products ran; with int8 ones, the float32 products timed in this process too
    int8 = dist_mod.INT8_PRODUCTS and dist_mod._int8_gram_ok(torch.device(device))
    t_float = c_float = int8_peak = None
    if int8:
        dist_mod.INT8_PRODUCTS = False
        try:
            distances(x)  # warm
            t_float, c_float = _median_time(lambda: distances(x), args.reps, device)
        finally:
            dist_mod.INT8_PRODUCTS = True
        int8_peak = _int8_peak(torch, device)

    # naive per-pair reference on a sample of pairs, extrapolated
    rng = np.random.default_rng(2)
    n_pairs = n * (n - 1) // 2
    sample = args.naive_pairs or (300 if size <= 64 else 40)
    ii = rng.integers(0, n, sample)
    jj = (ii + rng.integers(1, n, sample)) % n
    t0 = time.perf_counter()
    naive_vals = [naive_tiled_l2(np, x_host[i], x_host[j], grid) for i, j in zip(ii, jj)]
    t_pair = (time.perf_counter() - t0) / sample
    naive_err = float(np.max(np.abs(np.asarray(naive_vals) - dist[ii, jj])))

    useful = float(n) * n * size * size * 3  # N²·H·W·C (symmetric: one triangle)
    adj = dist < alpha
    np.fill_diagonal(adj, False)
    return {
        "kind": "prompt",
        "device": device,
        "size": size,
        "case": args.case,
        "n": n,
        "threads": torch.get_num_threads(),
        "alpha": alpha,
        "uint8_bytes": int(x_host.nbytes),
        "t_distances": t_dist,
        "t_clique": t_clique,
        "cpu_distances": c_dist,
        "cpu_clique": c_clique,
        "prompts_per_s": 1.0 / (t_dist + t_clique),
        "useful_gflop": useful / 1e9,
        "gflops": useful / t_dist / 1e9,
        "peak_gflops": peak_wall,
        "roofline_fraction": useful / t_dist / 1e9 / peak_wall,
        "gflops_cpu": useful / c_dist / 1e9,
        "peak_gflops_cpu": peak_cpu,
        "roofline_fraction_cpu": useful / c_dist / 1e9 / peak_cpu,
        "peak_detail": {"before": peak_before, "after": peak_after},
        "peak_rss_delta": peak.delta,
        "memory_ratio": (peak.delta / x_host.nbytes) if peak.delta is not None else None,
        "naive_pair_s": t_pair,
        "naive_pairs_sampled": sample,
        "naive_total_s": t_pair * n_pairs,
        "naive_max_abs_diff": naive_err,
        "speedup_distances": t_pair * n_pairs / t_dist,
        "speedup_end_to_end": (t_pair * n_pairs + t_clique) / (t_dist + t_clique),
        "clique": {
            "size": int(clique.size),
            "method": clique.method,
            "upper_bound": int(clique.upper_bound),
            "expansions": int(clique.expansions),
            "edge_density": float(adj.sum() / max(1, n * (n - 1))),
        },
        "pairs_below_0.01": int(((dist < 0.01) & ~np.eye(n, dtype=bool)).sum() // 2),
        "products": "int8" if int8 else "float32",
        "t_distances_float32": t_float if int8 else t_dist,
        "cpu_distances_float32": c_float if int8 else c_dist,
        "int8_speedup": (t_float / t_dist) if int8 else None,
        "int8_peak_gops": int8_peak,
        "int8_fraction": (useful / t_dist / 1e9 / int8_peak) if int8_peak else None,
    }


#: Runtime calls that block the host until the device has caught up (CUDA profiles only).
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def _profile(torch, fn, device: str, top: int = 10) -> dict:
    """One call of ``fn`` under torch.profiler: the ``top`` operators by self time (device time
    on a GPU, else CPU time), in ms, and the host synchronisations (CUDA only)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fn()
    _sync(device)
    with profile(activities=acts) as prof:
        fn()
        _sync(device)
    events = prof.key_averages()

    def self_time(e):
        if cuda:
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
        return e.self_cpu_time_total

    rows = sorted(events, key=self_time, reverse=True)[:top]
    return {
        "by": "self device time" if cuda else "self CPU time",
        "top": [{"op": e.key, "calls": e.count, "ms": self_time(e) / 1e3} for e in rows],
        "host_syncs": sum(e.count for e in events if e.key in SYNC_EVENTS) if cuda else None,
        "ops": sum(e.count for e in events if e.key.startswith("aten::")),
    }


def shard_worker(args) -> dict:
    """P prompts of one case in one process: one thread and one prompt at a time (``detect``
    each, threads=1) against the default threads and ``detect_many`` over the P prompts."""
    import numpy as np

    torch = _setup(args)
    import memscan.distances as dist_mod
    from memscan.distances import pairwise_tiled_l2, pairwise_tiled_l2_many
    from memscan.extraction.detect import detect, detect_many

    n, size, grid, device, alpha, p = args.n, args.size, 4, args.device, args.alpha, args.shard
    default_threads = torch.get_num_threads()
    # the stacked batched-GEMM path: a GPU's, or forced on the CPU as its proxy (--stacked)
    stacked = device != "cpu" or bool(getattr(args, "stacked", False))
    hosts = [make_generations(np, args.case, n, size, seed=10 + k) for k in range(p)]
    xs = [_on(torch, x, device) for x in hosts]
    warm = [_on(torch, make_generations(np, args.case, 32, size, seed=1), device)] * 2

    def one_at_a_time():
        return [detect(x, alpha=alpha, min_clique=10, grid=grid, threads=1) for x in xs]

    def one_at_a_time_distances():
        return [pairwise_tiled_l2(x, grid, threads=1, exact_near=alpha) for x in xs]

    def batched():
        return detect_many(xs, alpha=alpha, min_clique=10, grid=grid)

    def batched_distances():
        return pairwise_tiled_l2_many(xs, grid, exact_near=alpha, batched_gemm=True if stacked else None)

    # 1. one thread, one prompt at a time (torch itself on one thread too)
    torch.set_num_threads(1)
    detect_many(warm, alpha=alpha, min_clique=10, grid=grid, threads=1)
    t_one, c_one = _median_time(one_at_a_time, args.reps, device)
    t_one_d, _ = _median_time(one_at_a_time_distances, args.reps, device)
    # 2. default threads, all P prompts in one call
    torch.set_num_threads(default_threads)
    detect_many(warm, alpha=alpha, min_clique=10, grid=grid)
    with _Peak(torch, device) as peak:
        found = batched()
    t_many, c_many = _median_time(batched, args.reps, device)
    t_many_d, _ = _median_time(batched_distances, args.reps, device)
    same = [(a.clique.members.tolist(), a.clique.medoid) for a in one_at_a_time()] == [
        (b.clique.members.tolist(), b.clique.medoid) for b in found
    ]
    prof = _profile(torch, batched_distances, device) if getattr(args, "profile", False) else None
    peak_mm = _peak_gflops(torch, n, (size // grid) ** 2 * 3, device)
    useful = p * float(n) * n * size * size * 3
    uint8 = sum(int(x.nbytes) for x in hosts)
    # uint8 tiles take exact int8 products where the device has them (GPU: the stacked path)
    int8 = dist_mod.INT8_PRODUCTS and dist_mod._int8_gram_ok(torch.device(device))
    int8_peak = _int8_peak(torch, device) if int8 else None
    # the stacked path groups prompts per int8 product on a GPU: also timed ungrouped, same process
    group, t_ungrouped = None, None
    if int8 and stacked:
        m, k = dist_mod._int8_rows(n), dist_mod._round8((size // grid) ** 2 * 3)
        group = dist_mod._int8_group(p, m, k, torch.device(device), uint8)
        if group > 1:
            before, dist_mod.INT8_GROUP = dist_mod.INT8_GROUP, 1
            try:
                t_ungrouped, _ = _median_time(batched_distances, args.reps, device)
            finally:
                dist_mod.INT8_GROUP = before
    return {
        "kind": "shard",
        "device": device,
        "size": size,
        "case": args.case,
        "n": n,
        "prompts": p,
        "threads": default_threads,
        "t_one": t_one,
        "t_many": t_many,
        "cpu_one": c_one,
        "cpu_many": c_many,
        "prompts_per_s_one": p / t_one,
        "prompts_per_s_many": p / t_many,
        "ratio": t_one / t_many,
        "t_one_distances": t_one_d,
        "t_many_distances": t_many_d,
        "ratio_distances": t_one_d / t_many_d,
        "gflops_many_distances": useful / t_many_d / 1e9,
        "peak_gflops": max(v[0] for v in peak_mm.values()),
        "roofline_fraction_many": useful / t_many_d / 1e9 / max(v[0] for v in peak_mm.values()),
        "uint8_bytes": uint8,
        "peak_delta": peak.delta,
        "memory_ratio": (peak.delta / uint8) if peak.delta is not None else None,
        "same_cliques": same,
        "clique_sizes": [int(f.clique.size) for f in found],
        "profile_distances": prof,
        "products": "int8" if int8 else "float32",
        "int8_peak_gops": int8_peak,
        "int8_fraction_many": (useful / t_many_d / 1e9 / int8_peak) if int8_peak else None,
        "stacked": stacked,
        "int8_group": group,
        "t_many_distances_ungrouped": t_ungrouped,
        "group_speedup": (t_ungrouped / t_many_d) if t_ungrouped else None,
    }


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------
def _run_config(args, size: int, case: str, threads: int, shard: int = 0) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--size",
        str(size),
        "--case",
        case,
        "--threads",
        str(threads),
        "--n",
        str(args.n),
        "--reps",
        str(args.reps),
        "--alpha",
        str(args.alpha),
        "--device",
        args.device,
        "--shard",
        str(shard),
    ]
    if args.naive_pairs:
        cmd += ["--naive-pairs", str(args.naive_pairs)]
    if args.profile:
        cmd += ["--profile"]
    if args.stacked:
        cmd += ["--stacked"]
    if args.int8_group:
        cmd += ["--int8-group", str(args.int8_group)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise SystemExit(f"worker failed ({size}, {case}, {threads}, shard {shard}):\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _mib(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:.1f}"


def _machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    return (
        f"{cpu}; {os.cpu_count()} logical CPUs; torch {torch.__version__} "
        f"(default {torch.get_num_threads()} threads); load average before the run "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"
    )


def _judged(r: dict) -> float:
    """Roofline fraction used for the target: per CPU second for one thread (a shared machine's
    load does not distort it), per wall second with several threads (process CPU time then
    also counts threads waiting on each other) and on a GPU."""
    return r["roofline_fraction_cpu"] if r["threads"] == 1 and r["device"] == "cpu" else r["roofline_fraction"]


def _vs_one_thread(r: dict, rows: list[dict]) -> float | None:
    """Distance time of the one-thread row of the same size and case over this row's."""
    for o in rows:
        if (
            o.get("kind") == "prompt"
            and o["threads"] == 1
            and (o["size"], o["case"], o["device"])
            == (
                r["size"],
                r["case"],
                r["device"],
            )
        ):
            return o["t_distances"] / r["t_distances"]
    return None


def _products(r: dict) -> str:
    if r.get("products") != "int8":
        return "float32"
    speed = "" if r.get("int8_speedup") is None else f", {r['int8_speedup']:.2f}× float32"
    peak = "" if not r.get("int8_fraction") else f", {r['int8_fraction']:.0%} of {r['int8_peak_gops']:.0f} GOP/s"
    return "int8" + speed + peak


def format_results(rows: list[dict], machine: str) -> str:
    prompt_rows = [r for r in rows if r.get("kind", "prompt") == "prompt"]
    shard_rows = [r for r in rows if r.get("kind") == "shard"]
    head = (
        "| size | case | device, threads | distances ms | × 1 thread | clique ms | prompts/s | useful GFLOP/s "
        "(wall / CPU) | mm peak GFLOP/s (wall / CPU) | roofline (wall / CPU) | products: × float32 "
        "in-process, of the int8 peak | naive s (extrap.) | speedup | peak mem Δ MiB (× uint8) | "
        "clique: size, method, edges |"
    )
    lines = [head, "|" + "---|" * 15]
    for r in prompt_rows:
        c = r["clique"]
        mem = "n/a" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}"
        vs = _vs_one_thread(r, prompt_rows)
        lines.append(
            f"| {r['size']}×{r['size']}×3 | {r['case']} | {r['device']}, {r['threads']} | "
            f"{r['t_distances'] * 1e3:.0f} | {'—' if vs is None or r['threads'] == 1 else f'{vs:.2f}×'} | "
            f"{r['t_clique'] * 1e3:.0f} | "
            f"{r['prompts_per_s']:.2f} | {r['gflops']:.0f} / {r['gflops_cpu']:.0f} | "
            f"{r['peak_gflops']:.0f} / {r['peak_gflops_cpu']:.0f} | "
            f"{r['roofline_fraction']:.0%} / {r['roofline_fraction_cpu']:.0%} | "
            f"{_products(r)} | "
            f"{r['naive_total_s']:.1f} | {r['speedup_distances']:.0f}× | "
            f"{_mib(r['peak_rss_delta'])} ({mem}) | "
            f"{c['size']}, {c['method']}, {c['edge_density']:.0%} |"
        )
    if shard_rows:
        lines += [
            "",
            "Shard rows: P prompts in one process; one thread, one prompt at a time (`detect` each) "
            "against default threads, `detect_many` over the P prompts (distances + cliques; "
            "distances alone in brackets).",
            "",
            "| size | case | device, threads | prompts | one thread, one at a time: prompts/s | "
            "default threads, batched: prompts/s | × | distances only × | batched useful GFLOP/s "
            "(roofline) | peak mem Δ MiB (× uint8 of the P prompts) | same cliques |",
            "|" + "---|" * 11,
        ]
        for r in shard_rows:
            mem = "n/a" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}"
            lines.append(
                f"| {r['size']}×{r['size']}×3 | {r['case']} | {r['device']}, {r['threads']} | {r['prompts']} | "
                f"{r['prompts_per_s_one']:.2f} | {r['prompts_per_s_many']:.2f} | {r['ratio']:.2f}× | "
                f"{r['ratio_distances']:.2f}× | {r['gflops_many_distances']:.0f} "
                f"({r['roofline_fraction_many']:.0%} of {r['peak_gflops']:.0f}) | "
                f"{_mib(r['peak_delta'])} ({mem}) | {'yes' if r['same_cliques'] else 'NO'} |"
            )
    lines.append("")
    lines.append(f"Machine: {machine}.")
    lines.append("")
    lines.append("Targets (issue 17): ≥ 100× the naive reference; one thread ≥ 50 % of roofline at 64×64 and")
    lines.append("≥ 60 % at 256×256 (per CPU second); default threads never slower than one thread, and")
    lines.append("≥ 1.7× one thread at 256×256; a shard of 8 prompts at 64×64 with default threads ≥ 1.6×")
    lines.append("the one-thread, one-prompt-at-a-time rate; peak memory ≤ 3× the uint8 generations.")
    lines.append("")
    for r in prompt_rows:
        target = TARGETS["roofline"].get(r["size"])
        ok = [
            f"speedup {'met' if r['speedup_distances'] >= TARGETS['speedup'] else 'MISSED'}",
            "memory "
            + ("n/a" if r["memory_ratio"] is None else ("met" if r["memory_ratio"] <= TARGETS["memory"] else "MISSED")),
        ]
        if r["threads"] == 1:
            ok.insert(1, "roofline " + ("n/a" if target is None else ("met" if _judged(r) >= target else "MISSED")))
        else:
            vs = _vs_one_thread(r, prompt_rows)
            if vs is not None:
                ok.insert(1, f"not slower than 1 thread {'met' if vs >= 1.0 else 'MISSED'} ({vs:.2f}×)")
                if r["size"] == 256:
                    ok.insert(2, f"≥ {TARGETS['threads_256']}× {'met' if vs >= TARGETS['threads_256'] else 'MISSED'}")
        lines.append(
            f"- {r['size']}×{r['size']} {r['case']}, {r['device']}, {r['threads']} thread(s): " + ", ".join(ok)
        )
    for r in shard_rows:
        ok = "met" if r["ratio"] >= TARGETS["shard"] else "MISSED"
        mem = "n/a" if r["memory_ratio"] is None else ("met" if r["memory_ratio"] <= TARGETS["memory"] else "MISSED")
        lines.append(
            f"- shard of {r['prompts']} at {r['size']}×{r['size']} {r['case']}, {r['device']}: "
            f"≥ {TARGETS['shard']}× {ok} ({r['ratio']:.2f}×), memory {mem}"
            + (
                f", batched distances ≥ {TARGETS['gpu']:.0%} of the float32 peak "
                f"{'met' if r['roofline_fraction_many'] >= TARGETS['gpu'] else 'MISSED'} "
                f"({r['roofline_fraction_many']:.0%}, {r['products']} products)"
                if r["device"].startswith("cuda")
                else ""
            )
        )
    return "\n".join(lines)


METHOD = """Method. One prompt = N = 500 generations, uint8, H×W×3. `random`: independent random
images (no pair is below alpha, the clique step is trivial). `memorized`: 460 noisy copies of one
image (Gaussian noise, σ uniform in [1, 6] grey levels per copy) and 40 unrelated images, so the
generation graph is near-complete (alpha = 0.035) and the near-zero refinement runs. Distances
are computed as detection computes them (`exact_near=alpha`: pairs within the float32 error
bound of alpha recomputed exactly). Each configuration runs in a fresh subprocess, with one
thread (`torch.set_num_threads(1)`) or torch's default; "× 1 thread" is the one-thread distance
time over the default-thread one. Times are medians of repeated runs after a warm-up.
Peak memory is the Linux peak resident set (`VmHWM`, reset through `/proc/self/clear_refs`)
during one detection minus the resident set just before it, with the generations already
loaded; tracemalloc cannot see torch. Roofline = the best median float32 `torch.mm` rate in the
same process and thread setting (1024³, 2048³ and the workload's own N×D×N shape, measured
before and after), both per wall-clock second and per CPU second (process CPU time, all
threads), since the machine is shared and wall-clock figures move with its load; the target is
judged per CPU second for one thread and per wall second for several. Useful flops
exploit symmetry: one multiply-add per pixel per unordered pair,
N²·H·W·C (the full-matrix convention 2·N²·H·W·C would double the GFLOP/s and the fraction).
The naive reference is a per-pair numpy loop in float64 (convert both images, loop over the 16
tiles, `sqrt(mean(diff²))`, max), timed on a random sample of pairs (300 at 64×64, 40 at
256×256) in the same process and extrapolated to N(N−1)/2 pairs; speedup compares distance
times. Shard rows: 8 prompts of one case in one process, first one thread and one prompt at a
time (`detect` on each), then torch's default threads and one `detect_many` over the 8
(distances, exact refinement and cliques included in both)."""


def write_markdown(path: Path, body: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{SECTION}\n\n{body.strip()}\n"
    if SECTION in text:
        start = text.index(SECTION)
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + ("" if nxt < 0 else "\n" + text[nxt + 1 :])
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--cases", nargs="+", default=["random", "memorized"])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 0], help="0 = torch default")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--alpha", type=float, default=0.035)
    p.add_argument("--naive-pairs", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:k]")
    p.add_argument("--shard", type=int, default=0, help="also the shard rows with this many prompts")
    p.add_argument("--shard-sizes", type=int, nargs="+", default=None, help="sizes of the shard rows (default --sizes)")
    p.add_argument("--no-prompt-rows", action="store_true", help="only the shard rows")
    p.add_argument("--json", type=Path, help="also write the raw figures here")
    p.add_argument(
        "--profile", action="store_true", help="shard rows: profile one batched distance call (top ops, host syncs)"
    )
    p.add_argument(
        "--stacked", action="store_true", help="shard rows: the stacked batched-GEMM path on the CPU too (GPU proxy)"
    )
    p.add_argument("--int8-group", type=int, default=0, help="stacked int8 path: prompts per product (0 = its rule)")
    p.add_argument("--markdown", type=Path, help="write/replace the section in this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.threads = args.threads[0]
        if args.int8_group:  # this worker process only
            import memscan.distances as dist_mod

            dist_mod.INT8_GROUP = args.int8_group
        print(json.dumps(shard_worker(args) if args.shard else worker(args)))
        return

    machine = _machine()
    print(METHOD)
    print()
    rows = []
    for threads in [] if args.no_prompt_rows else args.threads:
        for size in args.sizes:
            for case in args.cases:
                r = _run_config(args, size, case, threads)
                rows.append(r)
                mem = r["memory_ratio"]
                print(
                    f"{size}×{size}×3 {case:9s} {args.device} threads={r['threads']}: "
                    f"distances {r['t_distances'] * 1e3:.1f} ms "
                    f"(CPU {r['cpu_distances'] * 1e3:.1f} ms; products {_products(r)}), "
                    f"clique {r['t_clique'] * 1e3:.1f} ms → {r['prompts_per_s']:.2f} prompts/s; "
                    f"useful {r['gflops']:.1f} GFLOP/s wall, {r['gflops_cpu']:.1f} per CPU-s = "
                    f"{r['roofline_fraction']:.0%} / {r['roofline_fraction_cpu']:.0%} of mm peak "
                    f"{r['peak_gflops']:.0f} / {r['peak_gflops_cpu']:.0f}; naive "
                    f"{r['naive_pair_s'] * 1e6:.0f} µs/pair × {r['n'] * (r['n'] - 1) // 2} pairs "
                    f"= {r['naive_total_s']:.1f} s → {r['speedup_distances']:.0f}× "
                    f"(end to end {r['speedup_end_to_end']:.0f}×, naive vs ours max |Δ| "
                    f"{r['naive_max_abs_diff']:.1e}); peak memory Δ {_mib(r['peak_rss_delta'])} MiB "
                    f"= {'n/a' if mem is None else f'{mem:.2f}'}× the "
                    f"{r['uint8_bytes'] / 2**20:.1f} MiB of uint8; clique {r['clique']}; "
                    f"pairs below 0.01: {r['pairs_below_0.01']}; load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
    if args.shard:
        for size in args.shard_sizes or args.sizes:
            for case in args.cases:
                r = _run_config(args, size, case, 0, shard=args.shard)
                rows.append(r)
                print(
                    f"shard of {r['prompts']} {size}×{size}×3 {case:9s} {args.device}: one thread one at a time "
                    f"{r['prompts_per_s_one']:.2f} prompts/s, {r['threads']} threads batched "
                    f"{r['prompts_per_s_many']:.2f} prompts/s = {r['ratio']:.2f}× (distances alone "
                    f"{r['ratio_distances']:.2f}×, {r['gflops_many_distances']:.0f} GFLOP/s = "
                    f"{r['roofline_fraction_many']:.0%} of {r['peak_gflops']:.0f} float32, "
                    f"{r['products']} products"
                    + (
                        f", {r['int8_fraction_many']:.0%} of the int8 peak {r['int8_peak_gops']:.0f} GOP/s"
                        if r.get("int8_peak_gops")
                        else ""
                    )
                    + (
                        f"; int8 products for {r['int8_group']} prompts at once: "
                        f"{r['group_speedup']:.2f}× one prompt per product"
                        if r.get("group_speedup")
                        else ""
                    )
                    + "); peak memory Δ "
                    f"{_mib(r['peak_delta'])} MiB; same cliques {r['same_cliques']}; "
                    f"load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
                prof = r.get("profile_distances")
                if prof:
                    print(f"  profile ({prof['by']}, {prof['ops']} aten ops, host syncs {prof['host_syncs']}):")
                    for e in prof["top"]:
                        print(f"    {e['ms']:8.3f} ms  {e['calls']:5d}×  {e['op']}")
    table = format_results(rows, machine)
    print()
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    if args.markdown:
        write_markdown(args.markdown, METHOD + "\n\n" + table)


if __name__ == "__main__":
    main()
