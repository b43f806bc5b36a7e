"""Calibrated distance and exact pixel nearest neighbours against brute-force references."""

import numpy as np
import pytest

from memscan import InputError
from memscan.extraction.calibrated import CalibratedConfig, calibrated_distance, calibrated_from_neighbours
from memscan.index.nearest import PixelSearch, nearest_pixels, pixel_distances


def _brute(q: np.ndarray, r: np.ndarray, grid: int | None) -> np.ndarray:
    """Q×R normalised ℓ2 (grid None) or tiled ℓ2, float64, straight from the definition."""
    qf, rf = q.astype(np.float64) / 255, r.astype(np.float64) / 255
    diff2 = (qf[:, None] - rf[None]) ** 2  # Q×R×H×W×C
    if grid is None:
        return np.sqrt(diff2.mean(axis=(2, 3, 4)))
    qn, rn, h, w, c = diff2.shape
    tiles = diff2.reshape(qn, rn, grid, h // grid, grid, w // grid, c).mean(axis=(3, 5, 6))
    return np.sqrt(tiles.reshape(qn, rn, -1).max(axis=2))


def _data(seed=0, nq=12, nr=90, size=8):
    rng = np.random.default_rng(seed)
    refs = rng.integers(0, 256, (nr, size, size, 3), dtype=np.uint8)
    # queries: near-copies of some references (small noise), one exact copy, and fresh images
    noisy = np.clip(refs[:4].astype(int) + rng.integers(-6, 7, (4, size, size, 3)), 0, 255).astype(np.uint8)
    fresh = rng.integers(0, 256, (nq - 5, size, size, 3), dtype=np.uint8)
    return np.concatenate([noisy, refs[10:11], fresh]), refs


def _reference_calibrated(q, r, n, alpha_c, grid):
    d = np.sort(_brute(q, r, grid), axis=1)[:, :n]
    nearest, mean = d[:, 0], d.mean(axis=1)
    cal = np.divide(nearest, alpha_c * mean, out=np.zeros_like(nearest), where=mean > 0)
    return cal, nearest, mean


@pytest.mark.parametrize("metric,grid", [("l2", None), ("tiled_l2", 4)])
def test_calibrated_distance_matches_brute_force(metric, grid):
    q, r = _data()
    for n, alpha_c in [(50, 0.5), (7, 0.8), (1, 0.5)]:
        cfg = CalibratedConfig(alpha_c=alpha_c, n=n, metric=metric, grid=4)
        res = calibrated_distance(q, r, cfg)
        ref_cal, ref_near, ref_mean = _reference_calibrated(q, r, n, alpha_c, grid)
        np.testing.assert_allclose(res.nearest_distance, ref_near, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(res.mean_distance, ref_mean, rtol=1e-5)
        np.testing.assert_allclose(res.calibrated, ref_cal, rtol=1e-5, atol=1e-9)
        np.testing.assert_array_equal(res.extracted, ref_cal < 1)
        np.testing.assert_array_equal(res.nearest_index, np.argmin(_brute(q, r, grid), axis=1))
    # with the paper's defaults the near-copies and the exact copy are extracted, fresh images not
    res = calibrated_distance(q, r, CalibratedConfig(metric=metric))
    assert res.extracted.tolist() == [True] * 5 + [False] * (len(q) - 5)
    assert res.nearest_distance[4] == 0.0 and res.calibrated[4] == 0.0


def test_calibrated_hand_worked_and_edge_cases():
    # nearest 0.1, mean (0.1 + 0.3 + 0.5) / 3 = 0.3 → 0.1 / (0.5 · 0.3) = 2/3
    cal, near, mean = calibrated_from_neighbours(np.array([[0.1, 0.3, 0.5]]))
    assert cal[0] == pytest.approx(2 / 3) and near[0] == 0.1 and mean[0] == pytest.approx(0.3)
    # exactly at the boundary is not extracted (ℓ < 1 is strict): 0.2 / (0.5 · 0.4) = 1
    cal, _, _ = calibrated_from_neighbours(np.array([[0.2, 0.6]]))
    assert cal[0] == pytest.approx(1.0) and not (cal[0] < 1 - 1e-12)
    # n larger than the training set uses every training image: the effective n, with a warning
    q, r = _data(nr=20)
    with pytest.warns(UserWarning, match="holds 20 images, fewer than n=50"):
        res = calibrated_distance(q, r, CalibratedConfig(n=50))
    assert res.n == 20 and res.n_requested == 50
    ref_cal, _, _ = _reference_calibrated(q, r, 20, 0.5, None)
    np.testing.assert_allclose(res.calibrated, ref_cal, rtol=1e-5)
    # one training image: ℓ = d / (0.5 · d) = 2 for every generation not equal to it
    with pytest.warns(UserWarning, match="1/alpha_c = 2"):
        one = calibrated_distance(q[:4], r[:1], CalibratedConfig(n=50))
    np.testing.assert_allclose(one.calibrated, 2.0)
    assert one.n == 1 and not one.extracted.any()
    # the paper's formula counts copies of x among the n nearest: x three times, n = 3 → ℓ = 1/α_c
    dup = np.concatenate([r[:1], r[:1], r[:1], r[1:]])
    near_x = np.clip(r[:1].astype(int) + 4, 0, 255).astype(np.uint8)
    res = calibrated_distance(near_x, dup, CalibratedConfig(n=3))
    assert res.calibrated[0] == pytest.approx(2.0) and not res.extracted[0]
    with pytest.raises(InputError, match="alpha_c"):
        CalibratedConfig(alpha_c=0).validate()
    with pytest.raises(InputError, match="metric"):
        CalibratedConfig(metric="cosine").validate()
    with pytest.raises(InputError, match="finite"):
        calibrated_from_neighbours(np.array([[np.nan, 0.1]]))


@pytest.mark.parametrize("metric,grid", [("l2", None), ("tiled_l2", 2)])
def test_pixel_search_equals_brute_force(metric, grid):
    q, r = _data(seed=3, nq=20, nr=150)
    search = PixelSearch(r, grid=grid or 4)
    nb = search.search(q, k=10, metric=metric)
    full = _brute(q, r, grid)
    order = np.lexsort((np.broadcast_to(np.arange(r.shape[0]), full.shape), full), axis=1)[:, :10]
    np.testing.assert_array_equal(nb.indices, order)
    np.testing.assert_allclose(nb.distances, np.take_along_axis(full, order, 1), rtol=1e-6, atol=1e-6)
    assert nb.exact_rows.all()
    # the nearest is recomputed exactly: an identical image is at exactly 0
    assert nb.distances[4, 0] == 0.0 and nb.indices[4, 0] == 10


def test_tiled_search_without_certificate_falls_back_to_exact():
    # one bright tile separates tiled ℓ2 from ℓ2: the ℓ2-nearest is not the tiled-nearest
    base = np.full((1, 8, 8, 1), 100, np.uint8)
    spread = base.copy()
    spread[0] += 12  # uniform small difference everywhere: ℓ2 = tiled ℓ2 = 12/255
    spot = base.copy()
    spot[0, :4, :4] = 120  # one tile of four differs by 20: ℓ2 = 10/255, tiled ℓ2 = 20/255
    noise = np.random.default_rng(0).integers(0, 256, (30, 8, 8, 1), dtype=np.uint8)
    refs = np.concatenate([spot, noise, spread])
    search = PixelSearch(refs, grid=2)
    nb = search.search(base, k=1, metric="tiled_l2", margin=0)  # fetch only the ℓ2-nearest (spot)
    assert nb.indices[0, 0] == refs.shape[0] - 1  # …yet the answer is the tiled-nearest (spread)
    assert nb.distances[0, 0] == pytest.approx(12 / 255)
    assert nb.exact_rows.all()
    assert nearest_pixels(base, refs, k=1, metric="l2").indices[0, 0] == 0  # ℓ2 prefers the spot


def test_pixel_distances_of_given_pairs():
    q, r = _data(seed=5)
    pairs = np.array([[3, 40, -1]] * len(q))
    d = pixel_distances(q, r, pairs, "tiled_l2", grid=4)
    full = _brute(q, r, 4)
    np.testing.assert_allclose(d[:, :2], full[:, [3, 40]], rtol=1e-9)
    assert np.isinf(d[:, 2]).all()
    with pytest.raises(InputError, match="divide"):
        pixel_distances(q, r, pairs, "tiled_l2", grid=3)


def test_float_images_are_compared_as_their_8_bit_pixels():
    """As documented: float images in [0, 1] are quantized to round(255·x) before the exact
    search, so they give exactly what their uint8 pixels give (not the float images' ℓ2)."""
    rng = np.random.default_rng(5)
    train = rng.uniform(0.4, 0.6, (60, 8, 8, 3))
    gen = np.clip(train[:3] + rng.normal(0, 0.01, (3, 8, 8, 3)), 0, 1)
    q = lambda x: np.round(x * 255.0).astype(np.uint8)  # noqa: E731
    as_float, as_uint8 = calibrated_distance(gen, train), calibrated_distance(q(gen), q(train))
    np.testing.assert_array_equal(as_float.calibrated, as_uint8.calibrated)
    np.testing.assert_array_equal(as_float.nearest_index, as_uint8.nearest_index)
    brute = np.sqrt(((q(gen)[:, None].astype(float) - q(train)[None].astype(float)) ** 2).mean((2, 3, 4))) / 255.0
    np.testing.assert_allclose(as_float.nearest_distance, brute.min(1), rtol=1e-12)
