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
