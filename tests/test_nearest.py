"""PixelSearch and the calibrated distance on an empty batch of queries: empty results of the
right shapes and dtypes (as TrainingIndex.search gives), not a numpy reshape error."""

from __future__ import annotations

import numpy as np
import pytest

from memscan.extraction.calibrated import calibrated_distance
from memscan.index.nearest import PixelSearch


@pytest.fixture(scope="module")
def train():
    return np.random.default_rng(0).integers(0, 256, (60, 8, 8, 3), dtype=np.uint8)


@pytest.mark.parametrize("metric", ["l2", "tiled_l2"])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_pixel_search_of_no_queries_is_empty(train, metric, dtype):
    nb = PixelSearch(train, grid=2).search(np.zeros((0, 8, 8, 3), dtype), 2, metric)
    assert nb.distances.shape == (0, 2) and nb.distances.dtype == np.float64
    assert nb.indices.shape == (0, 2) and nb.indices.dtype == np.int64
    assert nb.exact_rows.shape == (0,) and nb.exact_rows.dtype == bool
    assert nb.metric == metric


def test_calibrated_distance_of_no_generations_is_empty(train):
    r = calibrated_distance(np.zeros((0, 8, 8, 3), np.uint8), train)
    assert r.nearest_index.shape == (0,) and r.nearest_index.dtype == np.int64
    for a in (r.nearest_distance, r.mean_distance, r.calibrated):
        assert a.shape == (0,) and a.dtype == np.float64
    assert r.extracted.shape == (0,) and r.extracted.dtype == bool
    assert r.n == 50
