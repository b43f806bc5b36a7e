"""Exact int8 products for uint8 tiles (``torch._int_mm``, pixels − 128): every distance the
exact one rounded once to float32, on the CPU work items and on the stacked (GPU) path run on
the CPU. (test_distances.py and test_detect_batched.py run everything else under both kinds of
products.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from distance_support import exact_cross as _exact_cross
from distance_support import exact_pairwise as _ref
from distance_support import near_copies as _near_copies

import memscan.distances as dist_mod
from memscan.distances import cross_tiled_l2, pairwise_tiled_l2, pairwise_tiled_l2_many

ALPHA = 0.035
REAL_PAYS = dist_mod._int8_pays_on_cpu  # before any fixture replaces it


@pytest.fixture(autouse=True)
def int8_products(monkeypatch):
    """int8 products on, whether or not they are faster than float32 on this CPU (correctness
    is tested everywhere ``torch._int_mm`` runs)."""
    monkeypatch.setattr(dist_mod, "INT8_PRODUCTS", True)
    monkeypatch.setattr(dist_mod, "_int8_pays_on_cpu", lambda: True)
    monkeypatch.delitem(dist_mod._INT8_OK, "cpu", raising=False)
    if not dist_mod._int8_gram_ok(torch.device("cpu")):
        pytest.skip("torch._int_mm does not run on this CPU")


@pytest.mark.parametrize("size, grid", [(20, 2), (106, 1)])
def test_int8_products_give_the_exact_distances(size, grid, monkeypatch):
    """uint8 tiles on the CPU path from exact int8 products: every distance is the exact one
    rounded once to float32 — pairwise on one and two threads, and cross with several row blocks
    of queries (5 queries: fewer than the 24 rows the int8 kernels want, padded); the 106×106×3
    tile holds the largest distance, 255²·D > 2³¹ (int64)."""
    calls = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b, **k: calls.append(a.shape) or real(a, b, **k))
    rng = np.random.default_rng(21)
    x = rng.integers(0, 256, (37, size, size, 3), dtype=np.uint8)
    x[3] = x[30]
    x[0], x[1] = 0, 255
    x[5:9] = np.clip(x[4].astype(int) + rng.integers(-2, 3, (4, size, size, 3)), 0, 255)
    want = _exact_cross(x, x, grid).astype(np.float32)
    for threads in (1, 2):
        np.testing.assert_array_equal(pairwise_tiled_l2(x, grid=grid, threads=threads), want)
    got = cross_tiled_l2(x[:5], x, grid=grid, block_elements=2 * 37)
    np.testing.assert_array_equal(got, want[:5])
    assert want[0, 1] == 1.0 and want[3, 30] == 0.0
    k = -(-((size // grid) ** 2) * 3 // 8) * 8  # a tile's values, padded to a multiple of 8
    assert sum(shape[1] == k for shape in calls) == 2 * grid * grid + 3 * grid * grid  # pairwise ×2; 3 blocks


@pytest.mark.parametrize("size, grid", [(16, 4), (20, 2), (106, 1)])
def test_int8_stacked_path_is_exact(size, grid, monkeypatch):
    """uint8 tiles from exact int8 products (pixels − 128; int32, or int64 for tiles over 2¹⁵
    values — the 106×106×3 tile): every distance is the exact one rounded once to float32, bit
    for bit the brute-force integer reference; rows and values padded for the int8 kernels (N
    not a multiple of 8; a 5×5×3 tile of 75 values)."""
    assert dist_mod._int8_gram_ok(torch.device("cpu"))
    calls = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b, **k: calls.append(a.shape) or real(a, b, **k))
    rng = np.random.default_rng(11)
    prompts = [_near_copies(rng, 13, size, n_other=3), rng.integers(0, 256, (13, size, size, 3), dtype=np.uint8)]
    prompts[0][4] = prompts[0][7]
    prompts[1][:, 0, 0, :] = (0, 255, 128)  # the extremes of the int8 range
    prompts[1][0], prompts[1][1] = 0, 255  # the largest distance: 255²·D passes 2³¹ at 106×106×3
    got = pairwise_tiled_l2_many(prompts, grid=grid, exact_near=ALPHA, batched_gemm=True)
    for x, d in zip(prompts, got):
        np.testing.assert_array_equal(d, _ref(x, grid).astype(np.float32))
    assert got[0][4, 7] == 0.0 and got[1][0, 1] == 1.0
    th = size // grid
    assert calls and all(s == (24, -(-th * th * 3 // 8) * 8) for s in calls)
    assert len(calls) == 2 * grid * grid  # one product per (prompt, tile)


@pytest.mark.parametrize("group", [2, 3])
@pytest.mark.parametrize("size, grid", [(16, 4), (106, 1)])
def test_grouped_int8_products_keep_each_prompts_exact_distances(size, grid, group, monkeypatch):
    """The stacked path's grouped products (a GPU's choice: G prompts' tiles in one product, its
    G diagonal blocks kept): every distance still the exact one rounded once to float32, with 3
    prompts of different contents in groups of 2 (the last group alone) and of 3; one product per
    tile and group, of G × 24 rows."""
    monkeypatch.setattr(dist_mod, "INT8_GROUP", group)
    calls = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b, **k: calls.append(a.shape) or real(a, b, **k))
    rng = np.random.default_rng(5)
    prompts = [
        _near_copies(rng, 13, size, n_other=3),
        rng.integers(0, 256, (13, size, size, 3), dtype=np.uint8),
        _near_copies(rng, 13, size, n_other=6),
    ]
    prompts[1][0], prompts[1][1] = 0, 255  # the largest distance (int64 at 106×106×3)
    prompts[2][2] = prompts[2][9]
    got = pairwise_tiled_l2_many(prompts, grid=grid, exact_near=ALPHA, batched_gemm=True)
    for x, d in zip(prompts, got):
        np.testing.assert_array_equal(d, _ref(x, grid).astype(np.float32))
    assert got[1][0, 1] == 1.0 and got[2][2, 9] == 0.0
    sizes = [len(range(s, min(3, s + group))) for s in range(0, 3, group)]
    assert sorted(s[0] for s in calls) == sorted([24 * g for g in sizes] * grid * grid)


def test_int8_group_size_rule():
    """One prompt per product on a CPU (arithmetic-bound: the discarded blocks would cost their
    time); on a GPU, prompts grouped until a product reaches INT8_GROUP_MACS multiply-adds or its
    output INT8_GROUP_MEMORY × the uint8 input; INT8_GROUP overrides."""
    m, k = 504, 768  # 500 images of 64×64×3 in 4×4 tiles
    shard = 8 * 500 * 64 * 64 * 3
    assert dist_mod._int8_group(8, m, k, "cpu", shard) == 1
    # (4·504)²·768 = 3.1·10⁹ ≤ 2³² < (5·504)²·768; 4·(4·504)² bytes = 16.3 MB ≤ 0.35 × 49 MB
    assert dist_mod._int8_group(8, m, k, "cuda", shard) == 4
    assert dist_mod._int8_group(3, m, k, "cuda", shard) == 3  # never more than the prompts
    assert dist_mod._int8_group(8, m, 64 * 64 * 3, "cuda", shard * 16) == 1  # 256×256: big enough alone
    assert dist_mod._int8_group(8, m, k, "cuda", 2 * 500 * 64 * 64 * 3) == 2  # memory: 2 prompts' worth
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dist_mod, "INT8_GROUP", 6)
        assert dist_mod._int8_group(8, m, k, "cpu", shard) == 6
        assert dist_mod._int8_group(2, m, k, "cpu", shard) == 2


def test_int8_products_unavailable_fall_back_to_the_float_path(monkeypatch):
    monkeypatch.setitem(dist_mod._INT8_OK, "cpu", False)
    monkeypatch.setattr(torch, "_int_mm", lambda *a, **k: pytest.fail("int8 product used"))
    x = _near_copies(np.random.default_rng(4), 30, 16)
    d = pairwise_tiled_l2_many([x], exact_near=ALPHA, batched_gemm=True)[0]
    assert np.abs(d - _ref(x)).max() <= 1e-5
    np.testing.assert_array_equal(d < ALPHA, _ref(x).astype(np.float32) < ALPHA)
    monkeypatch.delitem(dist_mod._INT8_OK, "cpu")
    monkeypatch.setattr(torch, "_int_mm", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no int8 kernel")))
    assert dist_mod._int8_gram_ok(torch.device("cpu")) is False


def test_batches_whose_tiles_pad_to_the_same_width_do_not_share_padding():
    """Two batches in one call whose tiles hold 8 and 5 values (both padded to 8): each gets
    its exact distances, in either order and on one or two threads (a shared buffer would
    leave the first batch's pixels in the second's padding columns)."""
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, (5, 4, 4, 2), dtype=np.uint8)  # 2×2 tiles of 2×2×2 = 8 values
    b = rng.integers(0, 256, (7, 10, 2, 1), dtype=np.uint8)  # 2×2 tiles of 5×1×1 = 5 values; 24 rows too
    for order in ((a, b), (b, a)):
        for threads in (1, 2):
            got = pairwise_tiled_l2_many(list(order), grid=2, threads=threads)
            for x, d in zip(order, got):
                np.testing.assert_array_equal(d, _exact_cross(x, x, 2).astype(np.float32))


def test_a_cpu_where_int8_products_do_not_pay_keeps_the_float32_path(monkeypatch):
    """A CPU where an int8 product is not clearly faster than a float32 one keeps the float32
    products (and their exact refinement)."""
    monkeypatch.setattr(dist_mod, "_int8_pays_on_cpu", lambda: False)
    monkeypatch.delitem(dist_mod._INT8_OK, "cpu")
    assert dist_mod._int8_gram_ok(torch.device("cpu")) is False
    monkeypatch.setattr(torch, "_int_mm", lambda *a, **k: pytest.fail("int8 product used"))
    x = _near_copies(np.random.default_rng(8), 30, 16)
    d = pairwise_tiled_l2(x, exact_near=ALPHA)
    assert np.abs(d - _ref(x)).max() <= 1e-5
    np.testing.assert_array_equal(d < ALPHA, _ref(x).astype(np.float32) < ALPHA)


@pytest.mark.parametrize("int8_s, float_s, pays", [(0.1, 1.0, True), (0.5, 1.0, False)])
def test_the_speed_check_compares_the_two_products_and_restores_threads(monkeypatch, int8_s, float_s, pays):
    """The check's decision from the two timings (a fake clock: the int8 product takes
    ``int8_s``, the float32 one ``float_s``), with torch's thread setting restored."""
    clock = {"now": 0.0, "next": 0.0}
    real_int_mm = torch._int_mm

    def fake_int_mm(*a, **k):
        clock["next"] = int8_s
        return real_int_mm(*a, **k)

    def fake_counter():
        clock["now"] += clock["next"]
        clock["next"] = float_s  # anything but an int8 product is the float32 one here
        return clock["now"]

    monkeypatch.setattr(torch, "_int_mm", fake_int_mm)
    monkeypatch.setattr(dist_mod.time, "thread_time", fake_counter)
    before = torch.get_num_threads()
    assert REAL_PAYS() is pays
    assert torch.get_num_threads() == before
