"""The k-NN outlier scores are exact: equal to a float64 brute force over every reference row,
also in clusters of near-duplicates closer to each other than FAISS's float32 rounding (where a
fixed number of FAISS candidates misses the true k-th neighbour)."""

from __future__ import annotations

import numpy as np
import pytest

from memscan.compare import outliers
from memscan.compare.outliers import embedding_knn_distance, knn_distance
from memscan.index.faiss_index import TrainingIndex


def _brute_l2_knn(x, ref, k):
    """k-th smallest sqrt(mean((a − b)²)) to the other reference rows, float64, rounded to 12."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).mean(-1))
    out = np.full(len(x), np.nan)
    for i in range(len(x)):
        others = np.sort([d[i, j] for j in range(len(x)) if ref[j] and j != i])
        if len(others) >= k:
            out[i] = round(float(others[k - 1]), 12)
    return out


def _brute_cosine_knn(q, ref, self_rows, k):
    """k-th smallest 1 − q·r over the reference rows, row self_rows[i] excluded, float64."""
    q, ref = np.asarray(q, np.float64), np.asarray(ref, np.float64)
    out = np.full(len(q), np.nan)
    for i in range(len(q)):
        d = np.sort([1.0 - float(ref[j] @ q[i]) for j in range(len(ref)) if j != self_rows[i]])
        if len(d) >= k:
            out[i] = round(max(float(d[k - 1]), 0.0), 12)
    return out


def _near_copy_images(seed=0):
    """A 32×32×3 uint8 image, 39 near-copies (copy j: one grey level off in j pixels) and 20
    unrelated images, as pixels in [0, 1] (float32)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(150, 255, (32, 32, 3), dtype=np.uint8)
    imgs = [base]
    for j in range(1, 40):
        c = base.copy().reshape(-1)
        c[rng.choice(c.size, j, replace=False)] -= 1
        imgs.append(c.reshape(32, 32, 3))
    imgs += list(rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8))
    return np.stack(imgs).astype(np.float32) / 255.0


def _near_copy_embeddings(seed=1, dim=256):
    """A unit vector, 39 copies within cosine distance ~1e-7 of it (below float32's rounding of
    a 256-long dot product) and 20 unrelated unit vectors, float32."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=dim)
    x = np.array(
        [base] + [base + 1e-5 * j * rng.normal(size=dim) for j in range(1, 40)] + list(rng.normal(size=(20, dim)))
    )
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("k", [1, 5, 12])
def test_knn_distance_is_exact_among_near_duplicate_images(k):
    x = _near_copy_images()
    ref = np.ones(len(x), bool)
    np.testing.assert_allclose(knn_distance(x, None, k), _brute_l2_knn(x, ref, k), rtol=0, atol=1e-12)
    ref[::3] = False  # queries outside the reference set too
    np.testing.assert_allclose(knn_distance(x, ref, k), _brute_l2_knn(x, ref, k), rtol=0, atol=1e-12)


def test_knn_distance_rows_searched_over_every_reference_are_exact(monkeypatch):
    """With no room to grow the candidates, uncertified rows take the float64 search over all."""
    monkeypatch.setattr(outliers, "MAX_CANDIDATES", 5 + 1 + outliers.CANDIDATE_MARGIN)
    x = _near_copy_images(seed=4)
    ref = np.arange(len(x)) % 4 != 1
    np.testing.assert_allclose(knn_distance(x, ref, 5), _brute_l2_knn(x, ref, 5), rtol=0, atol=1e-12)


def test_knn_distance_of_float64_vectors_closer_than_float32_resolution():
    """Features given in float64 whose differences float32 partly rounds away: exact all the same."""
    rng = np.random.default_rng(2)
    base = rng.random(64)
    x = np.array([base + 1e-9 * j * rng.normal(size=64) for j in range(40)] + list(rng.random((10, 64))))
    ref = np.ones(len(x), bool)
    np.testing.assert_allclose(knn_distance(x, None, 5), _brute_l2_knn(x, ref, 5), rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [1, 5])
def test_embedding_knn_distance_is_exact_among_near_duplicates(k):
    e = _near_copy_embeddings()
    self_rows = np.arange(len(e))
    want = _brute_cosine_knn(e, e, self_rows, k)
    np.testing.assert_allclose(embedding_knn_distance(e, e, self_rows, k), want, rtol=0, atol=2e-12)
    # candidates from a flat training index (as index_knn_distance passes it)
    index = TrainingIndex.from_embeddings(e, [f"t{i}" for i in range(len(e))], params="flat")
    got = embedding_knn_distance(e, index.embeddings, self_rows, k, index=index)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-12)
    # queries that are not reference rows
    q = e[[0, 3, 45]]
    want = _brute_cosine_knn(q, e, np.full(3, -1), k)
    np.testing.assert_allclose(embedding_knn_distance(q, e, None, k), want, rtol=0, atol=2e-12)


def test_embedding_rows_searched_over_every_reference_are_exact(monkeypatch):
    monkeypatch.setattr(outliers, "MAX_CANDIDATES", 5 + 1 + outliers.CANDIDATE_MARGIN)
    e = _near_copy_embeddings(seed=5)
    self_rows = np.where(np.arange(len(e)) % 5 == 0, -1, np.arange(len(e)))
    want = _brute_cosine_knn(e, e, self_rows, 5)
    np.testing.assert_allclose(embedding_knn_distance(e, e, self_rows, 5), want, rtol=0, atol=2e-12)


def _count_everywhere(monkeypatch):
    """Count the rows that reach the float64 search over every reference (the fallback)."""
    seen = {"rows": 0}
    certified = outliers._certified_kth

    def counted(n_q, k, kk, n_ref, candidates, everywhere):
        def every(rows):
            seen["rows"] += len(rows)
            return everywhere(rows)

        return certified(n_q, k, kk, n_ref, candidates, every)

    monkeypatch.setattr(outliers, "_certified_kth", counted)
    return seen


def _cluster(kind, n=120, d=48, seed=7):
    """Half the rows near-duplicates of one row (``noise``: 1e-4 pixels, or 1e-9 in float64,
    below even float64's rounding of uncentred squared norms), or interleaved tight clusters."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, d))
    if kind == "interleaved":  # consecutive rows in different clusters: a block spans them all
        return rng.random((5, d))[np.arange(n) % 5] + 1e-7 * rng.normal(size=(n, d))
    noise = {"pixels": 1e-4, "float64": 1e-9}[kind]
    x[: n // 2] = np.clip(x[0] + noise * rng.normal(size=(n // 2, d)), 0, 1)
    return x


@pytest.mark.parametrize("kind", ["pixels", "float64", "interleaved"])
@pytest.mark.parametrize("k", [1, 5])
def test_blocked_search_over_every_reference_equals_a_direct_brute_force(monkeypatch, kind, k):
    """The fallback (forced: no room to grow the candidates) in small blocks — several query
    blocks, reference blocks and flushes of shortlisted pairs — gives bit for bit the float64
    brute force by direct differences."""
    monkeypatch.setattr(outliers, "MAX_CANDIDATES", k + 1 + outliers.CANDIDATE_MARGIN)
    monkeypatch.setattr(outliers, "_QUERY_BLOCK", 16)
    monkeypatch.setattr(outliers, "_GEMM_ELEMENTS", 16 * 24)
    monkeypatch.setattr(outliers, "_PENDING_PAIRS", 50)
    seen = _count_everywhere(monkeypatch)
    x = _cluster(kind)
    ref = np.arange(len(x)) % 7 != 3
    np.testing.assert_array_equal(knn_distance(x, ref, k), _brute_l2_knn(x, ref, k))
    assert seen["rows"] >= len(x) // 2 - 10  # the cluster's rows took the fallback


def test_blocked_search_agrees_with_every_pair(monkeypatch):
    """The shortlist of the blocked search against every pair computed by direct differences
    (the shortlist bound widened to infinity)."""
    x = _cluster("pixels", n=90, d=32, seed=3)
    rows, ref_rows = np.arange(len(x)), np.flatnonzero(np.arange(len(x)) % 3 != 0)
    got = outliers._exact_kth_everywhere(x, rows, ref_rows, 4)
    monkeypatch.setattr(outliers, "_U64", 2.0**-8)  # a huge "rounding": every pair shortlisted
    np.testing.assert_array_equal(outliers._exact_kth_everywhere(x, rows, ref_rows, 4), got)
    want = np.array([np.sort(((x[ref_rows[ref_rows != i]] - x[i]) ** 2).mean(axis=1))[3] for i in rows])
    np.testing.assert_array_equal(got, want)


def test_a_non_finite_row_gets_nan_is_no_neighbour_and_slows_no_other_row(monkeypatch):
    seen = _count_everywhere(monkeypatch)
    rng = np.random.default_rng(9)
    x = rng.random((300, 96))
    x[7, 3], x[40, 0], x[41, 5] = np.nan, np.inf, -np.inf
    ref = np.arange(len(x)) % 4 != 2
    got = knn_distance(x, ref, 5)
    bad = np.zeros(len(x), bool)
    bad[[7, 40, 41]] = True
    assert np.isnan(got[bad]).all()
    # the others: as if the non-finite rows were not there
    want = _brute_l2_knn(x[~bad], ref[~bad], 5)
    np.testing.assert_allclose(got[~bad], want, rtol=0, atol=1e-12)
    assert not np.isnan(want).any()
    assert seen["rows"] == 0  # every other row certified by its first candidates
    # fewer than k finite reference rows: NaN
    assert np.isnan(knn_distance(np.array([[0.0], [1.0], [np.nan], [2.0]]), k=3)).all()


def test_embedding_non_finite_queries_and_reference_rows(monkeypatch):
    seen = _count_everywhere(monkeypatch)
    rng = np.random.default_rng(10)
    e = rng.normal(size=(200, 32))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    e[5, 0] = np.nan
    e[9, 1] = np.inf
    self_rows = np.arange(len(e))
    got = embedding_knn_distance(e, e, self_rows, 5)
    assert np.isnan(got[[5, 9]]).all()
    ok = np.setdiff1d(np.arange(len(e)), [5, 9])
    want = _brute_cosine_knn(e[ok], e[ok], np.arange(len(ok)), 5)
    np.testing.assert_allclose(got[ok], want, rtol=0, atol=2e-12)
    assert seen["rows"] == 0
    # a flat training index holding a non-finite row: the same for the finite queries
    index = TrainingIndex.from_embeddings(e.astype(np.float32), [f"t{i}" for i in range(len(e))], params="flat")
    got = embedding_knn_distance(e[ok].astype(np.float32), index.embeddings, ok, 5, index=index)
    want = _brute_cosine_knn(e[ok].astype(np.float32), e[ok].astype(np.float32), np.arange(len(ok)), 5)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-12)


def test_empty_input_gives_an_empty_result():
    for shape in [(0, 4), (0, 3, 3, 1), (0,)]:
        assert knn_distance(np.zeros(shape)).shape == (0,)
    assert knn_distance(np.zeros((0, 4)), np.zeros(0, bool)).shape == (0,)
    assert embedding_knn_distance(np.zeros((0, 4)), np.eye(4)).shape == (0,)
    assert np.isnan(embedding_knn_distance(np.eye(4), np.zeros((0, 4)))).all()


def test_squared_distances_beyond_float32_range_are_not_lost():
    """Features within float32's range whose squared distances overflow it: FAISS leaves those
    slots empty (label −1), and a search over every reference row took the k-th from the rest
    (a NaN for row 0, whose only neighbour's squared distance is 4e38)."""
    x = np.array([[0.0], [2e19], [3e19], [4e19], [5e19]])
    np.testing.assert_array_equal(knn_distance(x, None, 1), [2e19, 1e19, 1e19, 1e19, 1e19])
    np.testing.assert_allclose(knn_distance(x, None, 1), _brute_l2_knn(x, np.ones(5, bool), 1), rtol=1e-15)
    # cosine distances of unnormalised embeddings beyond float32: 1 − (−2e40) for the third
    q, ref = np.array([[1e20, 0.0]]), np.array([[-1e20, 0.0], [-2e20, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(embedding_knn_distance(q, ref, k=3), [1 + 2e40], rtol=1e-12)


def test_features_beyond_float32_range_are_exact():
    x = np.random.default_rng(11).random((40, 6)) * 1e39
    ref = np.ones(len(x), bool)
    np.testing.assert_allclose(knn_distance(x, None, 3), _brute_l2_knn(x, ref, 3), rtol=1e-15)
