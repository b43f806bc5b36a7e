"""Detection stage: one prompt's generations → generation graph → largest clique.

Carlini et al. 2023, §4.1: a prompt is flagged when its largest clique under tiled ℓ2 < α has at
least k members; the clique medoid is the candidate copy, ranked by the mean intra-clique
distance (lower = more confident).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from memscan.cliques import CliqueResult, largest_clique, upper_mask
from memscan.devices import check_device
from memscan.distances import pairwise_tiled_l2_many


@dataclass(frozen=True)
class Detection:
    """Result of detection on one prompt."""

    clique: CliqueResult
    detected: bool
    median_pairwise: float
    min_pairwise: float

    def row(self) -> dict:
        c = self.clique
        return {
            "clique_size": int(c.size),
            "clique_upper_bound": int(c.upper_bound),
            "clique_method": c.method,
            "mean_clique_distance": float(c.mean_distance),
            "medoid_index": int(c.medoid),
            "graph_edges": int(c.n_edges),
            "median_pairwise_distance": self.median_pairwise,
            "min_pairwise_distance": self.min_pairwise,
            "detected": bool(self.detected),
        }


#: Prompts whose detection :func:`detect_many` may run together in ``extraction/shard.py``, and
#: the most bytes of uint8 generations they may hold: the distances of all of them are built in
#: one call (tiles × prompts on worker threads; one batched GEMM per tile on a GPU), and their
#: generations stay in memory until then.
DETECT_BATCH_PROMPTS = 8
DETECT_BATCH_BYTES = 1 << 29


def detect(
    images,
    *,
    alpha: float,
    min_clique: int,
    grid: int = 4,
    max_expansions: int = 100_000,
    threads: int | None = None,
) -> Detection:
    """Pairwise tiled ℓ2 of one prompt's generations, then the largest clique.

    ``images`` may be a numpy array or a torch tensor on any device (the distances are computed
    there). Pairs whose float32 distance lies within its rounding error bound of ``alpha`` are
    recomputed exactly (uint8 with int8 products: every distance is exact already), so the
    generation graph is the one of the exact distances rounded once to float32, compared with
    ``alpha``: it does not depend on the device, on ``threads`` or on batching
    (:func:`detect_many`), and differs from the exact distances' graph only for a pair within
    half a float32 ulp of ``alpha`` (about 4·10⁻⁹ at 0.08; :mod:`memscan.distances`).
    """
    return detect_many(
        [images], alpha=alpha, min_clique=min_clique, grid=grid, max_expansions=max_expansions, threads=threads
    )[0]


def detect_many(
    batches,
    *,
    alpha: float,
    min_clique: int,
    grid: int = 4,
    max_expansions: int = 100_000,
    threads: int | None = None,
    device: str | None = None,
) -> list[Detection]:
    """:func:`detect` for several prompts at once (one array of generations each): the same
    results, with the distances of all of them built in one call
    (:func:`memscan.distances.pairwise_tiled_l2_many`: tiles × prompts on worker threads, or on
    a GPU one batched GEMM per tile), then each prompt's clique, median and minimum, the
    prompts on up to ``threads`` threads (:func:`_summarise_all`; the same results as one by
    one).

    ``device``: where to compute the distances (``"cuda"``, ``"cuda:1"``; None or ``"cpu"``:
    where the arrays are). Extra memory, beyond the generations: the prompts' N×N matrices,
    the worker buffers (≤ 1.5× the uint8 generations, see ``WORKER_MEMORY``) and the
    refinement's temporaries, then per clique thread one prompt's float64 N×N copy and
    boolean adjacency.
    """
    if device is not None and device != "cpu":
        import torch

        check_device(device)
        batches = [torch.as_tensor(b).to(device) for b in batches]
    dists = pairwise_tiled_l2_many(batches, grid, threads=threads, exact_near=alpha)
    if len(dists) > 1 and all(
        hasattr(d, "cpu") and (d.shape, d.device) == (dists[0].shape, dists[0].device) for d in dists
    ):
        import torch

        dists = list(torch.stack(dists).cpu().numpy())  # one copy back from a GPU, not one per prompt
    return _summarise_all(dists, alpha, min_clique, max_expansions, threads)


def _post_threads(n_prompts: int, threads: int | None) -> int:
    """Threads for the per-prompt cliques and medians: one per prompt, at most ``threads``
    (default: torch's setting)."""
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    return max(1, min(int(threads), n_prompts))


def _summarise_all(dists, alpha: float, min_clique: int, max_expansions: int, threads: int | None) -> list[Detection]:
    """:func:`_summarise` of each prompt, the prompts spread over :func:`_post_threads` threads.

    Each prompt's summary is computed by one thread from its own matrix alone (no shared
    state), so the results are those of the serial loop, in the same order. The numpy parts
    (comparisons, takes, the median's partition) release the GIL and run in parallel; the
    clique search's Python steps take turns.
    """
    workers = _post_threads(len(dists), threads)
    if workers == 1:
        return [_summarise(d, alpha, min_clique, max_expansions) for d in dists]
    with ThreadPoolExecutor(workers, thread_name_prefix="memscan-cliques") as pool:
        return list(pool.map(lambda d: _summarise(d, alpha, min_clique, max_expansions), dists))


def _summarise(d, alpha: float, min_clique: int, max_expansions: int) -> Detection:
    """One prompt's distance matrix → its largest clique, median and minimum pairwise distance."""
    d = d.cpu().numpy() if hasattr(d, "cpu") else np.asarray(d)
    clique = largest_clique(d, alpha, max_expansions=max_expansions)
    off = d[upper_mask(d.shape[0])]  # a fresh copy: the median may reorder it in place
    return Detection(
        clique=clique,
        detected=clique.size >= min_clique,
        min_pairwise=float(off.min()) if off.size else 0.0,
        median_pairwise=float(_median_in_place(off)) if off.size else 0.0,
    )


def _median_in_place(a: np.ndarray):
    """``np.median(a)`` of a 1-D array without NaN (the same value and dtype), reordering
    ``a``: one partition at the lower middle and the minimum above it (np.median partitions
    at both middles and the end, ~15× slower on the 124 750 distances of 500 generations).
    The mean of the two middles is taken as np.median takes it (``np.mean`` of a pair)."""
    h = a.size // 2
    if a.size % 2:
        a.partition(h)
        return np.mean(a[h : h + 1])
    a.partition(h - 1)
    return np.mean(np.array([a[h - 1], a[h:].min()], dtype=a.dtype))
