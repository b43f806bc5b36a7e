"""Batched and threaded detection (issue 17): the same distances, edges and cliques as one
prompt on one thread, on random and near-copy inputs; edges decided as by the exact distance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from distance_support import exact_pairwise as _ref
from distance_support import near_copies as _near_copies
from distance_support import products  # noqa: F401 - the fixture

import memscan.distances as dist_mod
from memscan.distances import cross_tiled_l2, pairwise_tiled_l2, pairwise_tiled_l2_many
from memscan.errors import InputError
from memscan.extraction.detect import detect, detect_many

ALPHA = 0.035

pytestmark = pytest.mark.usefixtures("products")


def _prompts(seed: int = 0):
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8),
        _near_copies(rng, 30, 16),
        _near_copies(rng, 17, 16, n_other=2),
        rng.integers(0, 256, (1, 16, 16, 3), dtype=np.uint8),
        _near_copies(rng, 40, 16, n_other=10),
    ]


def _same_detection(a, b):
    assert a.clique.members.tolist() == b.clique.members.tolist()
    assert (a.clique.size, a.clique.medoid, a.clique.n_edges, a.clique.method) == (
        b.clique.size,
        b.clique.medoid,
        b.clique.n_edges,
        b.clique.method,
    )
    assert a.detected == b.detected
    assert a.clique.mean_distance == pytest.approx(b.clique.mean_distance, abs=1e-6)
    assert a.median_pairwise == pytest.approx(b.median_pairwise, abs=1e-6)


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_batched_and_threaded_equal_one_prompt_one_thread_bit_for_bit(threads, monkeypatch):
    monkeypatch.setattr(dist_mod, "MIN_WORK_PER_THREAD", 1)  # small inputs: force the workers
    monkeypatch.setattr(dist_mod, "WORKER_MEMORY", 1e6)
    prompts = _prompts()
    one = [pairwise_tiled_l2(x, threads=1, exact_near=ALPHA) for x in prompts]
    many = pairwise_tiled_l2_many(prompts, threads=threads, exact_near=ALPHA)
    for x, a, b in zip(prompts, one, many):
        np.testing.assert_array_equal(a, b)  # CPU: bit for bit, whatever the threads
        assert np.abs(a - _ref(x)).max() <= 1e-5
    cross_one = cross_tiled_l2(prompts[1][:7], prompts[4], threads=1)
    cross_many = cross_tiled_l2(prompts[1][:7], prompts[4], threads=threads, block_elements=64)
    np.testing.assert_array_equal(cross_one, cross_tiled_l2(prompts[1][:7], prompts[4], threads=threads))
    np.testing.assert_allclose(cross_many, cross_one, atol=1e-6, rtol=0)


@pytest.mark.parametrize("threads", [1, 2])
def test_detect_many_equals_detect(threads, monkeypatch):
    monkeypatch.setattr(dist_mod, "MIN_WORK_PER_THREAD", 1)
    prompts = _prompts(1)
    singles = [detect(x, alpha=ALPHA, min_clique=10, threads=1) for x in prompts]
    for a, b in zip(singles, detect_many(prompts, alpha=ALPHA, min_clique=10, threads=threads)):
        _same_detection(a, b)
    assert [d.detected for d in singles] == [False, True, True, False, True]
    assert detect_many([], alpha=ALPHA, min_clique=10) == []


def test_batched_gemm_path_gives_the_same_edges_and_cliques():
    """The GPU path (stacked prompts, one baddbmm per tile), run on the CPU: distances within
    the float32 bound, edges and cliques identical (pairs near alpha are recomputed exactly)."""
    prompts = _prompts(2)
    prompts = [prompts[1], prompts[2][:1].repeat(30, 0), prompts[4][:30], prompts[0][:30]]
    prompts[1][5:, 0, 0, 0] ^= 1
    one = [pairwise_tiled_l2(x, threads=1, exact_near=ALPHA) for x in prompts]
    stacked = pairwise_tiled_l2_many(prompts, exact_near=ALPHA, batched_gemm=True)
    for x, a, b in zip(prompts, one, stacked):
        assert np.abs(b - _ref(x)).max() <= 1e-5
        assert np.abs(a - b).max() <= 1e-5
        assert (b == b.T).all() and (np.diag(b) == 0).all()
        np.testing.assert_array_equal(a < ALPHA, b < ALPHA)
        np.testing.assert_array_equal(b[_ref(x) == 0], 0.0)
    t = pairwise_tiled_l2_many([torch.from_numpy(x) for x in prompts], exact_near=ALPHA, batched_gemm=True)
    assert all(isinstance(d, torch.Tensor) for d in t)
    floats = [x.astype(np.float32) / 255 for x in prompts[:2]]
    for x, a, b in zip(prompts, pairwise_tiled_l2_many(floats, exact_near=ALPHA, batched_gemm=True), one):
        assert np.abs(a - _ref(x)).max() <= 1e-5
        np.testing.assert_array_equal(a < ALPHA, b < ALPHA)
        np.testing.assert_array_equal(a[_ref(x) == 0], 0.0)


def _refine_case():
    """Four prompts of 24 images: a cluster of near copies (dense), 10 disjoint near-duplicate
    pairs among random images (sparse: 10 pairs among 20 images), random images with no pair
    to refine, and a second cluster; the pairs to refine are marked in a P×N×N mask."""
    rng = np.random.default_rng(7)
    n = 24
    dense = _near_copies(rng, n, 16, n_other=3)
    dense[2] = dense[1]  # identical images in a cluster too
    sparse = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    sparse[1::2] = sparse[0::2]
    sparse[1::2, 3, 5, 0] ^= 7  # near, not identical; pairs (2m, 2m+1)
    sparse[5] = sparse[4]  # one identical pair
    x = np.stack([dense, sparse, rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8), dense[::-1].copy()])
    refs = [_ref(b) for b in x]
    mask = np.zeros((4, n, n), dtype=bool)
    iu = np.triu_indices(n, 1)
    for q in (0, 3):
        m = np.zeros((n, n), dtype=bool)
        m[iu] = refs[q][iu] < 0.1
        mask[q] = m
    mask[1, np.arange(0, n, 2), np.arange(1, n, 2)] = True
    return x, refs, mask


@pytest.mark.parametrize("budget", [dist_mod.STACKED_REFINE_MEMORY, 1e-9])
def test_stacked_refinement_gives_the_exact_values_of_the_marked_pairs(budget, monkeypatch):
    """The GPU path's refinement of all prompts at once (clusters stacked into one float64
    GEMM per tile, other pairs from pixel differences), run on the CPU: every marked pair gets
    its exact tiled ℓ2 rounded to float32 — the brute-force integer reference, bit for bit —
    and nothing else changes; the same with the clusters refined one group at a time."""
    monkeypatch.setattr(dist_mod, "STACKED_REFINE_MEMORY", budget)
    direct_pairs = []
    real_direct = dist_mod._direct_tiled
    monkeypatch.setattr(
        dist_mod, "_direct_tiled", lambda a, b, *args: direct_pairs.append(a.shape[0]) or real_direct(a, b, *args)
    )
    gemms = []
    real_baddbmm = torch.baddbmm
    monkeypatch.setattr(torch, "baddbmm", lambda *a, **k: gemms.append(a[1].shape[0]) or real_baddbmm(*a, **k))
    x, refs, mask = _refine_case()
    acc = torch.full(mask.shape, 0.5, dtype=torch.float32)
    dist_mod._refine_stacked(torch.from_numpy(x), acc, torch.from_numpy(mask), 4, 4, 4, 1 << 22)
    got = acc.numpy()
    for q in range(4):
        np.testing.assert_array_equal(got[q][mask[q]], refs[q][mask[q]].astype(np.float32))
        assert (got[q][~mask[q]] == 0.5).all()
    assert sum(direct_pairs) == mask[1].sum() == 12  # the sparse prompt's pairs only
    assert gemms == ([2] * 16 if budget > 1 else [1] * 32)  # two clusters: stacked or one by one
    assert got[1, 4, 5] == 0.0 and mask[0].sum() > 150  # a cluster: dense


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_stacked_refinement_and_batched_path_on_cuda():
    x, refs, mask = _refine_case()
    acc = torch.full(mask.shape, 0.5, dtype=torch.float32, device="cuda")
    dist_mod._refine_stacked(torch.from_numpy(x).cuda(), acc, torch.from_numpy(mask).cuda(), 4, 4, 4, 1 << 22)
    got = acc.cpu().numpy()
    for q in range(4):
        np.testing.assert_array_equal(got[q][mask[q]], refs[q][mask[q]].astype(np.float32))
        assert (got[q][~mask[q]] == 0.5).all()
    prompts = [torch.from_numpy(b).cuda() for b in x]
    for b, d in zip(x, pairwise_tiled_l2_many(prompts, exact_near=ALPHA)):
        assert d.is_cuda
        np.testing.assert_array_equal(d.cpu().numpy() < ALPHA, _ref(b).astype(np.float32) < ALPHA)
        assert np.abs(d.cpu().numpy() - _ref(b)).max() <= 1e-5


def test_stacked_refinement_of_float_pixels_keeps_identical_images_at_zero():
    x, refs, mask = _refine_case()
    xf = torch.from_numpy(x).float().div_(255.0)
    acc = torch.full(mask.shape, 0.5, dtype=torch.float32)
    dist_mod._refine_stacked(xf, acc, torch.from_numpy(mask), 4, 4, 4, 1 << 22)
    for q in range(4):
        np.testing.assert_allclose(acc[q].numpy()[mask[q]], refs[q][mask[q]], rtol=0, atol=1e-6)
        zero = mask[q] & (refs[q] == 0)
        assert (acc[q].numpy()[zero] == 0.0).all()
        assert (acc[q].numpy()[~mask[q]] == 0.5).all()
    assert (mask & (np.stack(refs) == 0)).sum() >= 3  # identical images are among the marked pairs


def test_edges_follow_the_exact_distance_at_alpha():
    """alpha set exactly on some pairs' exact distances (rounded to float32, as stored): each
    pair is an edge exactly when its exact distance, rounded to float32, is below alpha."""
    rng = np.random.default_rng(3)
    x = _near_copies(rng, 40, 32, n_other=0)
    ref = _ref(x)
    ref32 = ref.astype(np.float32)
    iu = np.triu_indices(40, 1)
    for alpha in np.quantile(ref32[iu], np.linspace(0.05, 0.95, 19)):  # without exact_near 2 differ
        alpha = float(ref32[iu][np.argmin(np.abs(ref32[iu] - alpha))])  # a tie with some pair
        for d in (
            pairwise_tiled_l2(x, exact_near=alpha),
            pairwise_tiled_l2_many([x], exact_near=alpha, batched_gemm=True)[0],
        ):
            np.testing.assert_array_equal(d < np.float32(alpha), ref32 < np.float32(alpha))


def test_threads_setting_is_restored_and_small_problems_stay_on_one_thread(monkeypatch):
    before = torch.get_num_threads()
    used = []
    real = dist_mod._run_items
    monkeypatch.setattr(dist_mod, "_run_items", lambda items, workers: (used.append(workers), real(items, workers))[1])
    x = np.random.default_rng(4).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    pairwise_tiled_l2(x, threads=4)
    assert used == [1]  # too little work for a second thread
    assert torch.get_num_threads() == before
    with pytest.raises(InputError, match="does not divide"):
        pairwise_tiled_l2_many([x, x[:, :7]], threads=2)
    assert torch.get_num_threads() == before
    with pytest.raises(InputError, match="threads must be a positive integer"):
        pairwise_tiled_l2(x, threads=0)
    with pytest.raises(InputError, match="exact_near must be a positive number"):
        pairwise_tiled_l2(x, exact_near=float("nan"))


def test_memory_bound_limits_the_workers(monkeypatch):
    monkeypatch.setattr(dist_mod, "MIN_WORK_PER_THREAD", 1)
    x = np.zeros((500, 64, 64, 3), np.uint8)
    m = dist_mod._Matrix(torch.from_numpy(x), torch.from_numpy(x), True, torch.float32, 4, 1 << 22)
    per = m.worker_bytes()
    assert per < 4 << 20  # one tile's product and its gather buffers, not the whole prompt
    workers = dist_mod._plan_threads([m], 64)
    assert workers * per <= dist_mod.WORKER_MEMORY * x.nbytes
    assert workers >= 2
    eight = [dist_mod._Matrix(torch.from_numpy(x), torch.from_numpy(x), True, torch.float32, 4, 1 << 22)] * 8
    assert dist_mod._plan_threads(eight, 64) >= 16  # eight prompts: room for many more workers


def test_native_syrk_matches_a_product():
    for dtype in (torch.float32, torch.float64):
        syrk = dist_mod._cpu_syrk(dtype)
        a = torch.randn(37, 53, dtype=dtype)
        c = torch.zeros(37, 37, dtype=dtype)
        syrk(c, a, 0.0)
        syrk(c, a, 1.0)
        full = 2 * a @ a.T
        iu = torch.triu_indices(37, 37)
        torch.testing.assert_close(c[iu[0], iu[1]], full[iu[0], iu[1]])
        assert (torch.tril(c, -1) == 0).all()


def _greedy_reference(adj: np.ndarray) -> list[int]:
    """The bitset greedy that cliques._greedy replaced (max over ascending positions)."""
    n = adj.shape[0]
    nbrs = [sum(1 << int(j) for j in np.flatnonzero(adj[i])) for i in range(n)]
    cand, clique = (1 << n) - 1, []
    while cand:
        v = max((u for u in range(n) if cand >> u & 1), key=lambda u: (nbrs[u] & cand).bit_count())
        clique.append(v)
        cand &= nbrs[v]
    return clique


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_numpy_greedy_equals_the_bitset_greedy(p):
    from memscan.cliques import _greedy

    rng = np.random.default_rng(int(p * 100))
    for n in (1, 7, 60):
        upper = np.triu(rng.random((n, n)) < p, 1)
        adj = upper | upper.T
        assert _greedy(adj) == _greedy_reference(adj)


def _fields(det):
    c = det.clique
    return (
        c.members.tolist(),
        c.size,
        c.medoid,
        c.mean_distance,
        c.method,
        c.upper_bound,
        c.expansions,
        c.n_nodes,
        c.n_edges,
        det.detected,
        det.median_pairwise,
        det.min_pairwise,
    )


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_parallel_post_processing_equals_the_serial_one(threads, monkeypatch):
    """Cliques, medians and minima of several prompts on threads: exactly the serial results
    (==, not approx), on random and near-copy prompts and a near-complete 200-node graph; and
    the median, minimum and mean clique distance as the plain numpy formulas give them."""
    import memscan.extraction.detect as detect_mod

    rng = np.random.default_rng(7)
    prompts = _prompts(5) + [_near_copies(rng, 200, 8, n_other=20), rng.integers(0, 256, (200, 8, 8, 3), np.uint8)]
    dists = pairwise_tiled_l2_many(prompts, threads=1, exact_near=ALPHA)
    serial = [detect_mod._summarise(d, ALPHA, 10, 100_000) for d in dists]
    pools = []

    class Recording(detect_mod.ThreadPoolExecutor):
        def __init__(self, workers, **kw):
            pools.append(workers)
            super().__init__(workers, **kw)

    monkeypatch.setattr(detect_mod, "ThreadPoolExecutor", Recording)
    parallel = detect_mod._summarise_all(dists, ALPHA, 10, 100_000, threads)
    assert pools == [min(threads, len(dists))]  # really on threads
    assert [_fields(a) for a in parallel] == [_fields(b) for b in serial]
    assert [d.detected for d in serial] == [False, True, True, False, True, True, False]
    for d, det in zip(dists, serial):
        n = d.shape[0]
        off = d[np.triu_indices(n, 1)]
        if off.size:
            assert det.median_pairwise == float(np.median(off)) and det.min_pairwise == float(off.min())
        m = det.clique.members
        sub = d.astype(np.float64)[np.ix_(m, m)]
        if len(m) > 1:
            assert det.clique.mean_distance == float(sub[np.triu_indices(len(m), 1)].mean())
        adj = (d < ALPHA) & ~np.eye(n, dtype=bool)
        assert adj[np.ix_(m, m)].sum() == len(m) * (len(m) - 1)  # a clique
    got = detect_many(prompts, alpha=ALPHA, min_clique=10, threads=threads)
    assert [_fields(a) for a in got] == [_fields(b) for b in serial]
    assert len(pools) == 2


def test_greedy_takes_runs_of_universal_candidates_as_the_one_by_one_greedy():
    """Near-complete graphs (a clique with a few missing edges, isolated vertices): the greedy
    that takes every candidate joined to all others at once picks the same vertices, in the
    same order, as the one-by-one reference."""
    from memscan.cliques import _greedy

    rng = np.random.default_rng(11)
    for n, k, missing in ((40, 35, 0), (40, 35, 3), (60, 50, 10), (30, 30, 1), (25, 5, 2)):
        adj = np.zeros((n, n), bool)
        members = rng.choice(n, k, replace=False)
        adj[np.ix_(members, members)] = True
        for _ in range(missing):
            i, j = rng.choice(members, 2, replace=False)
            adj[i, j] = adj[j, i] = False
        np.fill_diagonal(adj, False)
        assert _greedy(adj) == _greedy_reference(adj)


def test_median_in_place_equals_numpy_median():
    from memscan.extraction.detect import _median_in_place

    rng = np.random.default_rng(12)
    for size in (1, 2, 3, 4, 5, 10, 11, 1000, 1001, 124_750):
        for dtype in (np.float32, np.float64):
            a = rng.random(size).astype(dtype)
            if size > 4:
                a[: size // 3] = a[size // 2]  # ties at the middle
                rng.shuffle(a)
            want = np.median(a)
            got = _median_in_place(a.copy())
            assert got == want and got.dtype == want.dtype
