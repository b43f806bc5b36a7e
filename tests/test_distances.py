"""Tests for memscan.distances: ℓ2, tiled ℓ2 and their matrix forms against brute force.

The reference is a plain numpy loop in float64 over the definitions in DESIGN.md:
``l2 = sqrt(mean((a - b)**2))`` with pixels in [0, 1], tiled ℓ2 = max over a g×g grid of tiles.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from distance_support import (
    exact_cross,
    products,  # noqa: F401 - the fixture
    values_with_square_sum,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from memscan.distances import (
    cross_tiled_l2,
    l2,
    nearest_tiled_l2,
    pairwise_tiled_l2,
    tiled_l2,
    tiled_l2_error_bound,
)
from memscan.errors import InputError

pytestmark = pytest.mark.usefixtures("products")


TOL = 1e-5  # max abs error allowed against the float64 reference


# --------------------------------------------------------------------------------------------
# brute-force reference
# --------------------------------------------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)


def ref_tiled(a: np.ndarray, b: np.ndarray, grid: int = 4) -> float:
    a, b = _unit(a), _unit(b)
    h, w, _ = a.shape
    th, tw = h // grid, w // grid
    worst = 0.0
    for i in range(grid):
        for j in range(grid):
            ta = a[i * th : (i + 1) * th, j * tw : (j + 1) * tw]
            tb = b[i * th : (i + 1) * th, j * tw : (j + 1) * tw]
            worst = max(worst, float(np.sqrt(np.mean((ta - tb) ** 2))))
    return worst


def ref_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((_unit(a) - _unit(b)) ** 2)))


def ref_cross(q: np.ndarray, r: np.ndarray, grid: int = 4) -> np.ndarray:
    """Every (query, reference) pair: a loop over queries and tiles, float64, no GEMM."""
    q, r = _unit(q), _unit(r)
    th, tw = q.shape[1] // grid, q.shape[2] // grid
    out = np.zeros((len(q), len(r)))
    for n, x in enumerate(q):
        for i in range(grid):
            for j in range(grid):
                tile = (slice(None), slice(i * th, (i + 1) * th), slice(j * tw, (j + 1) * tw))
                diff = x[tile[1:]][None] - r[tile]
                out[n] = np.maximum(out[n], np.sqrt(np.mean(diff**2, axis=(1, 2, 3))))
    return out


def test_references_agree():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    loop = np.array([[ref_tiled(a, b, 2) for b in x] for a in x])
    np.testing.assert_allclose(ref_cross(x, x, 2), loop, atol=1e-15, rtol=0)


def _images(rng, n, h, w, c, kind):
    if kind == "uint8":
        return rng.integers(0, 256, (n, h, w, c), dtype=np.uint8)
    return rng.random((n, h, w, c)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# paired distances
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["uint8", "float"])
@pytest.mark.parametrize("c", [1, 3])
def test_paired_vs_brute_force(kind, c):
    rng = np.random.default_rng(c)
    a = _images(rng, 5, 16, 12, c, kind)
    b = _images(rng, 5, 16, 12, c, kind)
    # single images give Python floats
    for n in range(5):
        assert isinstance(l2(a[n], b[n]), float)
        assert l2(a[n], b[n]) == pytest.approx(ref_l2(a[n], b[n]), abs=TOL)
        assert tiled_l2(a[n], b[n], grid=4) == pytest.approx(ref_tiled(a[n], b[n], 4), abs=TOL)
        assert tiled_l2(a[n], b[n], grid=2) == pytest.approx(ref_tiled(a[n], b[n], 2), abs=TOL)
    # batches give one distance per pair, as numpy
    dl = l2(a, b)
    dt = tiled_l2(a, b, grid=4)
    assert isinstance(dl, np.ndarray) and dl.shape == (5,)
    assert isinstance(dt, np.ndarray) and dt.shape == (5,)
    np.testing.assert_allclose(dl, [ref_l2(x, y) for x, y in zip(a, b)], atol=TOL, rtol=0)
    np.testing.assert_allclose(dt, [ref_tiled(x, y) for x, y in zip(a, b)], atol=TOL, rtol=0)
    assert tiled_l2(a[0], a[0]) == 0.0
    assert l2(a[0], a[0]) == 0.0


def test_float64_and_float16_inputs():
    rng = np.random.default_rng(3)
    a = rng.random((8, 8, 3))
    b = rng.random((8, 8, 3))
    assert tiled_l2(a, b, grid=2) == pytest.approx(ref_tiled(a, b, 2), abs=TOL)
    a16, b16 = a.astype(np.float16), b.astype(np.float16)
    assert tiled_l2(a16, b16, grid=2) == pytest.approx(ref_tiled(a16, b16, 2), abs=TOL)


def test_shared_background_one_differing_tile():
    """The case tiling exists for: same background, one tile differs.

    64×64×3, grid 4 → 16 tiles of 16×16. Both images are grey 128; in ``b`` tile (1, 2) is
    179, a difference of 51/255 = 0.2 per pixel. Tile ℓ2 there = 0.2, elsewhere 0, so
    tiled ℓ2 = 0.2 while plain ℓ2 = sqrt(0.2² / 16) = 0.05.
    """
    a = np.full((64, 64, 3), 128, np.uint8)
    b = a.copy()
    b[16:32, 32:48] = 179
    assert l2(a, b) == pytest.approx(0.05, abs=1e-7)
    assert tiled_l2(a, b, grid=4) == pytest.approx(0.2, abs=1e-7)
    assert tiled_l2(a, b, grid=1) == pytest.approx(0.05, abs=1e-7)  # one tile = plain ℓ2
    # an 8×8 object inside that tile: tile ℓ2 = 0.2·sqrt(64/256) = 0.1, plain 0.2·sqrt(64/4096)
    c = a.copy()
    c[20:28, 36:44] = 179
    assert tiled_l2(a, c) == pytest.approx(0.1, abs=1e-7)
    assert l2(a, c) == pytest.approx(0.025, abs=1e-7)
    # the matrix forms agree; b and c differ on 192 of that tile's 256 pixels: 0.2·sqrt(3/4)
    bc = 0.2 * np.sqrt(0.75)
    d = pairwise_tiled_l2(np.stack([a, b, c]))
    np.testing.assert_allclose(d, [[0, 0.2, 0.1], [0.2, 0, bc], [0.1, bc, 0]], atol=1e-6)
    x = cross_tiled_l2(a[None], np.stack([b, c, a]))
    np.testing.assert_allclose(x, [[0.2, 0.1, 0.0]], atol=1e-6)
    assert x[0, 2] == 0.0


def test_extremes_of_the_range():
    a = np.zeros((8, 8, 1), np.uint8)
    b = np.full((8, 8, 1), 255, np.uint8)
    assert l2(a, b) == 1.0 and tiled_l2(a, b) == 1.0
    assert pairwise_tiled_l2(np.stack([a, b]))[0, 1] == pytest.approx(1.0, abs=1e-6)
    assert l2(a.astype(np.float32), b.astype(np.float32) / 255) == 1.0


# --------------------------------------------------------------------------------------------
# matrices
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["uint8", "float"])
@pytest.mark.parametrize("c", [1, 3])
def test_pairwise_and_cross_vs_brute_force(kind, c):
    rng = np.random.default_rng(10 + c)
    x = _images(rng, 12, 16, 16, c, kind)
    x[7] = x[2]  # an identical pair
    ref = ref_cross(x, x)
    d = pairwise_tiled_l2(x)
    assert d.dtype == np.float32 and d.shape == (12, 12)
    assert np.abs(d - ref).max() <= TOL
    assert (d == d.T).all()
    assert (np.diag(d) == 0.0).all()
    assert d[2, 7] == 0.0 and d[7, 2] == 0.0
    q = x[[2, 5, 9]]
    xc = cross_tiled_l2(q, x)
    assert xc.shape == (3, 12)
    assert np.abs(xc - ref[[2, 5, 9]]).max() <= TOL
    assert xc[0, 2] == 0.0 and xc[0, 7] == 0.0 and xc[1, 5] == 0.0 and xc[2, 9] == 0.0


def test_identical_images_are_exactly_zero():
    rng = np.random.default_rng(4)
    one = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    x = np.stack([one] * 6)
    assert (pairwise_tiled_l2(x) == 0.0).all()
    assert (cross_tiled_l2(x[:2], x) == 0.0).all()
    xf = x.astype(np.float32) / 255
    assert (pairwise_tiled_l2(xf) == 0.0).all()


def test_near_duplicates_are_accurate():
    """Distances near zero come from the refinement, not from ‖a‖² + ‖b‖² − 2a·b."""
    rng = np.random.default_rng(5)
    base = rng.integers(1, 255, (1, 32, 32, 3), dtype=np.uint8)
    x = np.repeat(base, 8, 0)
    for n in range(1, 8):  # n pixels changed by ±1 → tiny, distinct distances
        idx = rng.choice(32 * 32 * 3, n, replace=False)
        x[n].reshape(-1)[idx] += rng.choice(np.array([-1, 1], dtype=np.int16), n).astype(np.uint8)
    d = pairwise_tiled_l2(x)
    ref = ref_cross(x, x)
    assert np.abs(d - ref).max() <= 1e-7
    assert (d[0, 1:] > 0).all()


@pytest.mark.parametrize("kind", ["uint8", "float"])
def test_refinement_paths(kind):
    """Near-zero pairs are recomputed exactly: a cluster of near copies (one float64 GEMM over
    the cluster) and many scattered near pairs (pixel differences) both match brute force."""
    rng = np.random.default_rng(15)
    cluster = np.repeat(rng.integers(1, 255, (1, 16, 16, 3), dtype=np.uint8), 30, 0)
    for n in range(1, 30):
        idx = rng.choice(cluster[n].size, n % 5, replace=False)
        cluster[n].reshape(-1)[idx] += np.uint8(1)
    scattered = rng.integers(1, 255, (40, 16, 16, 3), dtype=np.uint8)
    scattered[1::2] = scattered[::2]  # 20 disjoint pairs, one pixel apart or identical
    scattered[1:30:2, 3, 3, 0] += np.uint8(1)
    for x in (cluster, scattered, np.concatenate([cluster, scattered])):
        xx = x if kind == "uint8" else x.astype(np.float32) / 255
        d = pairwise_tiled_l2(xx)
        ref = ref_cross(xx, xx)
        assert np.abs(d - ref).max() <= 1e-7
        assert (d[ref == 0] == 0).all() and (d[ref > 0] > 0).all()
        c = cross_tiled_l2(xx[:7], xx)
        assert np.abs(c - ref[:7]).max() <= 1e-7
        assert (c[ref[:7] == 0] == 0).all()


def test_many_identical_images_take_one_float64_product_not_a_recompute_per_pair(monkeypatch):
    """The memorized extreme: every pair identical. Used to cost one exact per-pair recompute
    for each of the N(N−1)/2 pairs (minutes at 256×256); now one float64 tiled product over
    the images involved (the timing is in bench/detect.py, not here)."""
    import memscan.distances as dist_mod

    direct = []
    real = dist_mod._direct_tiled
    monkeypatch.setattr(dist_mod, "_direct_tiled", lambda a, *r: direct.append(a.shape[0]) or real(a, *r))
    rng = np.random.default_rng(16)
    x = np.repeat(rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8), 300, 0)
    x[150:] = rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    d = pairwise_tiled_l2(x, threads=1)
    assert sum(direct) == 0  # uint8: the float64 product is exact, no pair recomputed alone
    assert (d[:150, :150] == 0).all() and (d[150:, 150:] == 0).all()
    assert d[0, 200] == pytest.approx(ref_tiled(x[0], x[200]), abs=TOL)


def test_mixed_dtypes_in_cross():
    rng = np.random.default_rng(6)
    q = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    r = rng.random((5, 8, 8, 3)).astype(np.float32)
    r[1] = q[0] / 255.0
    for qq, rr in ((q, r), (r, q)):
        got = cross_tiled_l2(qq, rr, grid=2)
        assert np.abs(got - ref_cross(qq, rr, 2)).max() <= TOL


@pytest.mark.parametrize("block_elements", [1, 7, 40, 1 << 22])
def test_small_blocks_give_the_same_result(block_elements):
    rng = np.random.default_rng(7)
    x = rng.integers(0, 256, (23, 8, 8, 3), dtype=np.uint8)
    x[20] = x[3]
    full = pairwise_tiled_l2(x, grid=2)
    small = pairwise_tiled_l2(x, grid=2, block_elements=block_elements)
    np.testing.assert_allclose(small, full, atol=1e-6, rtol=0)
    assert (small == small.T).all() and (np.diag(small) == 0).all() and small[3, 20] == 0.0
    xc = cross_tiled_l2(x[:9], x, grid=2, block_elements=block_elements)
    np.testing.assert_allclose(xc, full[:9], atol=1e-6, rtol=0)
    assert np.abs(small - ref_cross(x, x, 2)).max() <= TOL


def test_large_symmetric_batch_uses_row_blocks():
    """≥ 256 images take the block-triangular path; compare a sample against brute force."""
    rng = np.random.default_rng(8)
    x = rng.integers(0, 256, (300, 8, 8, 1), dtype=np.uint8)
    x[299] = x[0]
    d = pairwise_tiled_l2(x, grid=2)
    assert (d == d.T).all() and (np.diag(d) == 0).all() and d[0, 299] == 0.0
    rows = [0, 1, 74, 75, 76, 150, 298]
    np.testing.assert_allclose(d[rows], ref_cross(x[rows], x, 2), atol=TOL, rtol=0)


def test_empty_and_single():
    x = np.zeros((0, 8, 8, 3), np.uint8)
    assert pairwise_tiled_l2(x).shape == (0, 0)
    one = np.zeros((1, 8, 8, 3), np.uint8)
    assert pairwise_tiled_l2(one).tolist() == [[0.0]]
    assert cross_tiled_l2(one, x).shape == (1, 0)


# --------------------------------------------------------------------------------------------
# torch in → torch out
# --------------------------------------------------------------------------------------------
def test_torch_input_gives_torch_output():
    rng = np.random.default_rng(9)
    x = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    t = torch.from_numpy(x)
    tf = t.float() / 255
    got = pairwise_tiled_l2(t, grid=2)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), pairwise_tiled_l2(x, grid=2))
    np.testing.assert_allclose(pairwise_tiled_l2(tf, grid=2).numpy(), got.numpy(), atol=1e-6)
    got = cross_tiled_l2(t[:2], t, grid=2)
    assert isinstance(got, torch.Tensor)
    np.testing.assert_array_equal(got.numpy(), cross_tiled_l2(x[:2], x, grid=2))
    got = tiled_l2(t[:3], t[3:], grid=2)
    assert isinstance(got, torch.Tensor)
    np.testing.assert_array_equal(got.numpy(), tiled_l2(x[:3], x[3:], grid=2))
    got = l2(tf[:3], tf[3:])
    assert isinstance(got, torch.Tensor)
    np.testing.assert_allclose(got.numpy(), l2(x[:3], x[3:]), atol=1e-6)
    assert tiled_l2(t[0], t[1]) == pytest.approx(tiled_l2(x[0], x[1]), abs=1e-12)
    assert isinstance(tiled_l2(t[0], t[1]), float)


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------
def test_error_mismatched_shapes():
    a = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(InputError, match="same shape"):
        l2(a, np.zeros((8, 8, 1), np.uint8))
    with pytest.raises(InputError, match="same shape"):
        tiled_l2(a, np.zeros((8, 4, 3), np.uint8))
    with pytest.raises(InputError, match="queries are .* but references are"):
        cross_tiled_l2(a[None], np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(InputError, match="queries are .* but references are"):
        nearest_tiled_l2(a[None], np.zeros((2, 8, 8, 1), np.uint8))
    with pytest.raises(InputError, match="expected H×W×C or N×H×W×C"):
        pairwise_tiled_l2(np.zeros((8, 8), np.uint8))
    with pytest.raises(InputError, match="expected H×W×C or N×H×W×C"):
        pairwise_tiled_l2(a)  # one image is not a batch


def test_error_size_not_divisible_by_grid():
    a = np.zeros((10, 12, 3), np.uint8)
    with pytest.raises(InputError, match=r"10×12 does not divide by grid=4"):
        tiled_l2(a, a)
    with pytest.raises(InputError, match="does not divide by grid=4"):
        pairwise_tiled_l2(a[None])
    with pytest.raises(InputError, match="does not divide by grid=4"):
        cross_tiled_l2(a[None], a[None])
    with pytest.raises(InputError, match="grid must be a positive integer"):
        tiled_l2(a, a, grid=0)


@pytest.mark.parametrize("bad", [1.5, -0.25, 255.0])
def test_error_float_outside_unit_range(bad):
    a = np.zeros((8, 8, 3), np.float32)
    b = a.copy()
    b[0, 0, 0] = bad
    with pytest.raises(InputError, match=r"float pixels must lie in \[0, 1\]"):
        l2(a, b)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        pairwise_tiled_l2(np.stack([a, b]))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        cross_tiled_l2(a[None], b[None])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_error_nan(bad):
    a = np.zeros((8, 8, 3), np.float32)
    b = a.copy()
    b[3, 3, 1] = bad
    with pytest.raises(InputError, match="NaN"):
        tiled_l2(a, b)
    with pytest.raises(InputError, match="NaN"):
        pairwise_tiled_l2(np.stack([a, b]))
    with pytest.raises(InputError, match="NaN"):
        nearest_tiled_l2(a[None], np.stack([a, b]))
    with pytest.raises(InputError, match="NaN"):
        pairwise_tiled_l2(torch.from_numpy(np.stack([a, b])))


def test_error_bad_dtype():
    with pytest.raises(InputError, match="not an image dtype"):
        l2(np.zeros((4, 4, 1), bool), np.zeros((4, 4, 1), bool))
    with pytest.raises(InputError, match="not supported"):
        l2(np.zeros((4, 4, 1), np.int64), np.zeros((4, 4, 1), np.int64))


def test_input_error_is_a_value_error():
    with pytest.raises(ValueError):
        l2(np.zeros((4, 4, 1), np.uint8), np.zeros((4, 4, 3), np.uint8))


# --------------------------------------------------------------------------------------------
# nearest references
# --------------------------------------------------------------------------------------------
def test_nearest_vs_brute_force():
    rng = np.random.default_rng(11)
    refs = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    queries = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    queries[0] = refs[13]  # an exact copy
    refs[31] = refs[13]  # ... held twice in the references
    noisy = refs[5].astype(np.int16) + rng.integers(-6, 7, refs[5].shape)
    queries[1] = np.clip(noisy, 0, 255).astype(np.uint8)  # a near copy
    ref = ref_cross(queries, refs)
    order = np.argsort(ref, axis=1, kind="stable")
    values = np.sort(ref.ravel())
    widest = 40 + int(np.argmax(np.diff(values[40:200])))
    within = float((values[widest] + values[widest + 1]) / 2)  # well away from any distance
    k = 4
    for chunk in (40, 7, 1, 4096):
        dist, idx, counts = nearest_tiled_l2(queries, refs, k=k, within=within, reference_chunk=chunk)
        assert dist.shape == (6, k) and idx.shape == (6, k) and dist.dtype == np.float32
        np.testing.assert_array_equal(idx, order[:, :k])
        np.testing.assert_allclose(dist, np.take_along_axis(ref, order[:, :k], 1), atol=TOL)
        assert (np.diff(dist, axis=1) >= 0).all()
        np.testing.assert_array_equal(counts, (ref <= within).sum(1))
    # the exact copy: both copies at distance exactly 0, lower index first; within=0 counts them
    dist, idx, counts = nearest_tiled_l2(queries, refs, k=2, within=0.0, reference_chunk=16)
    assert idx[0].tolist() == [13, 31] and dist[0].tolist() == [0.0, 0.0]
    assert counts.tolist() == [2, 0, 0, 0, 0, 0]
    assert idx[1, 0] == 5
    # no within → no counts; k larger than the references → all of them
    dist, idx, counts = nearest_tiled_l2(queries[:2], refs[:3], k=10)
    assert counts is None and idx.shape == (2, 3)


def test_nearest_torch_and_errors():
    rng = np.random.default_rng(12)
    refs = rng.integers(0, 256, (9, 8, 8, 1), dtype=np.uint8)
    d1, i1, _ = nearest_tiled_l2(refs[:3], refs, k=2, reference_chunk=4)
    d2, i2, _ = nearest_tiled_l2(torch.from_numpy(refs[:3]), torch.from_numpy(refs), k=2)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, atol=1e-7)
    with pytest.raises(InputError, match="k must be a positive integer"):
        nearest_tiled_l2(refs[:1], refs, k=0)
    with pytest.raises(InputError, match="reference_chunk must be a positive integer"):
        nearest_tiled_l2(refs[:1], refs, reference_chunk=0)
    with pytest.raises(InputError, match="within must be a finite number"):
        nearest_tiled_l2(refs[:1], refs, within=float("nan"))
    with pytest.raises(InputError, match="exact_near must be a positive number"):
        nearest_tiled_l2(refs[:1], refs, exact_near=0.0)
    with pytest.raises(InputError, match="exact_near must be a positive number"):
        cross_tiled_l2(refs[:1], refs, exact_near=float("inf"))


DELTA = 0.15  # the paper's δ


def _around_delta(offsets, size: int = 512):
    """A zero image and, per offset o, a reference at exact tiled ℓ2 δ + o·1.04e-9 from it (one
    tile of a near-uniform 39, squares summing to 255²·D·δ² + o, at D = 49,152 values) followed
    by three white ones: every block of 4 or more references is centred near 200, where float32
    products err by up to ~3e-4 at δ (the zero image and the tile both far from the centre)."""
    th = size // 4
    d = th * th * 3
    centre = round(DELTA**2 * 255**2 * d)  # 71,912,448 at D = 49,152: exactly δ
    refs = np.full((4 * len(offsets), size, size, 3), 255, np.uint8)
    for n, o in enumerate(offsets):
        refs[4 * n] = 0
        refs[4 * n, :th, :th] = values_with_square_sum(centre + o, d).reshape(th, th, 3)
    query = np.zeros((1, size, size, 3), np.uint8)
    exact = np.concatenate([exact_cross(query, refs[n : n + 1]) for n in range(len(refs))], axis=1)
    return query, refs, exact


def test_verification_near_delta_is_decided_by_the_exact_distance():
    """``d ≤ δ`` with either kind of products (the ``products`` fixture) is the exact decision:
    on the float32 fallback (``INT8_PRODUCTS = False``, float pixels) the pairs within the float32 error bound of δ are recomputed
    exactly (``exact_near=δ``; ``within=δ`` implies it) — against the exact integer reference,
    with references at exact distances from δ − 4.2e-7 to δ + 4.2e-7 but never within one
    float32 ulp of it (1.5e-8), where a rounded value could fall on either side. Before, the
    float32 fallback decided 6 of these 12 wrongly (errors up to 3e-4)."""
    offsets = [s * o for o in (16, 32, 64, 128, 256, 400) for s in (1, -1)]  # d − δ: ±1.7e-8 … ±4.2e-7
    query, refs, exact = _around_delta(offsets)
    near = exact[0, ::4]
    assert np.abs(near - DELTA).min() > 2.0**-26 and np.abs(near - DELTA).max() < 5e-7
    want = exact[0] <= DELTA
    assert want.sum() == len(offsets) // 2 and (exact[0, want] > DELTA - 5e-7).all()  # white: 1.0
    for chunk in (4, 64):  # 4 references per product: the whole tile in one (the largest errors)
        dist, idx, counts = nearest_tiled_l2(query, refs, k=len(refs), within=DELTA, reference_chunk=chunk)
        np.testing.assert_array_equal(dist[0] <= DELTA, want[idx[0]])
        assert counts.tolist() == [want.sum()]
        dist, idx, _ = nearest_tiled_l2(query, refs, k=len(refs), exact_near=DELTA, reference_chunk=chunk)
        np.testing.assert_array_equal(dist[0] <= DELTA, want[idx[0]])
    np.testing.assert_array_equal(cross_tiled_l2(query, refs, exact_near=DELTA)[0] <= DELTA, want)
    np.testing.assert_array_equal(cross_tiled_l2(query, refs[:8], exact_near=DELTA)[0] <= DELTA, want[:8])
    # float pixels (always float32 products): the float64 brute force over those very pixels
    fq, fr = query.astype(np.float32) / 255, refs[32:].astype(np.float32) / 255  # δ ± 2.7e-7, ± 4.2e-7
    exact_f = ref_cross(fq, fr)[0]
    assert (np.abs(exact_f - DELTA) > 2.0**-26).all() and (exact_f <= DELTA).sum() == 2
    dist, idx, counts = nearest_tiled_l2(fq, fr, k=len(fr), within=DELTA, reference_chunk=4)
    np.testing.assert_array_equal(dist[0] <= DELTA, exact_f[idx[0]] <= DELTA)
    assert counts.tolist() == [(exact_f <= DELTA).sum()]
    np.testing.assert_array_equal(cross_tiled_l2(fq, fr[:8], exact_near=DELTA)[0] <= DELTA, exact_f[:8] <= DELTA)


def test_verify_candidates_decides_extraction_by_the_exact_distance():
    """The verification stage passes δ as ``exact_near``: a candidate at exact distance just above
    δ from its nearest training image is not extracted, one just below is, and the k-eidetic
    count is exact too — on the float32 fallback as with int8 products."""
    import pandas as pd

    from memscan.data.training import TrainingSet
    from memscan.extraction.verify import verify_candidates

    offsets = [64, -64, 400, -400]
    query, refs, exact = _around_delta(offsets)
    cands = pd.DataFrame({"prompt_id": ["p"], "train_id": [None], "clique_size": [5], "mean_clique_distance": [0.0]})
    for n, o in enumerate(offsets):
        # one training set per offset: the reference near δ and its three white ones
        ts = TrainingSet(ids=[f"t{i}" for i in range(4)], captions=[""] * 4, images=refs[4 * n : 4 * n + 4])
        ext = verify_candidates(cands, query, ts, delta=DELTA, grid=4, n_nearest=2)
        top = ext[ext["rank"] == 1].iloc[0]
        assert top["train_id"] == "t0" and bool(top["extracted"]) == (o < 0) == (exact[0, 4 * n] <= DELTA)
        assert top["eidetic_k"] == (1 if o < 0 else 0)
        assert abs(top["tiled_l2"] - exact[0, 4 * n]) <= 2.0**-25


def test_tiled_l2_error_bound_covers_the_fallback_errors():
    """The bound nearest-neighbour certificates rely on (memscan.index.nearest): 2⁻²⁵ where every
    value is the exact distance rounded once to float32 (int8 products), else the rigorous
    float32 bound 4γ/REFINE_BELOW — at least every error the float32 products make."""
    import memscan.distances as dist_mod

    rng = np.random.default_rng(31)
    x = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    x[3:6] = np.clip(x[2].astype(int) + rng.integers(-9, 10, (3, 32, 32, 3)), 0, 255)
    x[8], x[9] = 0, 250  # far from the centre: the largest energies
    for q, r in ((x, x), (x.astype(np.float32) / 255, x)):
        bound = tiled_l2_error_bound(q, r, grid=4)
        err = np.abs(cross_tiled_l2(q, r).astype(np.float64) - ref_cross(q, r)).max()
        assert err <= bound
        exact_products = q.dtype == np.uint8 and dist_mod._int8_applies(torch.uint8, torch.uint8, 192, "cpu")
        assert bound == (2.0**-25 if exact_products else pytest.approx(4 * 194 * 2.0**-24 / 0.1 + 2.0**-22))


# --------------------------------------------------------------------------------------------
# properties (hypothesis)
# --------------------------------------------------------------------------------------------
PROP = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _batch(n_max=6, c=st.sampled_from([1, 3])):
    return st.tuples(st.integers(1, n_max), c).flatmap(
        lambda nc: arrays(np.uint8, (nc[0], 8, 8, nc[1]), elements=st.integers(0, 255))
    )


@PROP
@given(x=_batch(), dup=st.booleans())
def test_prop_pairwise_symmetric_zero_diagonal(x, dup):
    if dup:
        x = np.concatenate([x, x[:1]])
    d = pairwise_tiled_l2(x, grid=2)
    assert (d == d.T).all()
    assert (np.diag(d) == 0.0).all()
    assert (d >= 0).all() and (d <= 1 + 1e-6).all()
    if dup:
        assert d[0, -1] == 0.0


@PROP
@given(x=_batch(n_max=3).filter(lambda a: a.shape[0] == 3))
def test_prop_l2_triangle_inequality(x):
    a, b, c = x
    assert l2(a, c) <= l2(a, b) + l2(b, c) + 1e-12
    assert tiled_l2(a, c, grid=2) <= tiled_l2(a, b, grid=2) + tiled_l2(b, c, grid=2) + 1e-12


@PROP
@given(x=_batch(n_max=2).filter(lambda a: a.shape[0] == 2), grid=st.sampled_from([1, 2, 4]))
def test_prop_tiled_at_least_every_tile_and_plain(x, grid):
    a, b = x
    t = tiled_l2(a, b, grid=grid)
    s = 8 // grid
    for i in range(grid):
        for j in range(grid):
            tile = (slice(i * s, (i + 1) * s), slice(j * s, (j + 1) * s))
            assert t >= l2(a[tile], b[tile]) - 1e-12
    assert t >= l2(a, b) - 1e-12


# --------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["uint8", "float"])
def test_cuda_matches_brute_force(kind):
    rng = np.random.default_rng(20)
    x = rng.integers(0, 256, (300, 16, 16, 3), dtype=np.uint8)
    x[10] = x[3]
    x[20:60] = x[20]  # a cluster of near copies: the float64 refinement runs on the GPU
    x[21:60, 0, 0, 0] ^= np.arange(1, 40, dtype=np.uint8) % 4
    xx = x if kind == "uint8" else x.astype(np.float32) / 255
    t = torch.from_numpy(xx).cuda()
    ref = ref_cross(xx, xx)
    d = pairwise_tiled_l2(t)
    assert d.is_cuda and d.dtype == torch.float32
    d = d.cpu().numpy()
    assert np.abs(d - ref).max() <= TOL
    assert (d == d.T).all() and (d[ref == 0] == 0).all()
    c = cross_tiled_l2(t[:17], t, block_elements=1000)
    assert c.is_cuda
    assert np.abs(c.cpu().numpy() - ref[:17]).max() <= TOL
    p = tiled_l2(t[:5], t[5:10])
    assert p.is_cuda
    np.testing.assert_allclose(p.cpu().numpy(), ref[np.arange(5), np.arange(5, 10)], atol=TOL)
    dist, idx, counts = nearest_tiled_l2(t[:4], t, k=3, within=0.05, reference_chunk=64)
    order = np.argsort(ref[:4], axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(idx, order)
    np.testing.assert_array_equal(counts, (ref[:4] <= 0.05).sum(1))
