"""Shared by the distance tests: generations with near copies, the exact integer reference of
the tiled ℓ2, and the parametrization over the two kinds of tile products."""

from __future__ import annotations

import numpy as np
import pytest


def near_copies(rng, n: int, size: int, n_other: int = 4) -> np.ndarray:
    """n − n_other noisy copies of one image (σ 1–6 grey levels) and n_other unrelated ones."""
    base = rng.integers(0, 256, (1, size, size, 3)).astype(np.float64)
    sigma = rng.uniform(1.0, 6.0, (n - n_other, 1, 1, 1))
    copies = np.clip(np.rint(base + rng.standard_normal((n - n_other, size, size, 3)) * sigma), 0, 255)
    other = rng.integers(0, 256, (n_other, size, size, 3))
    return np.concatenate([copies, other]).astype(np.uint8)[rng.permutation(n)]


def exact_cross(q: np.ndarray, r: np.ndarray, grid: int = 4) -> np.ndarray:
    """Exact tiled ℓ2 (integer arithmetic) of every (q, r) pair of uint8 images, float64."""
    _, h, w, c = q.shape
    th, tw = h // grid, w // grid

    def tiles(x):
        return x.reshape(len(x), grid, th, grid, tw, c).transpose(1, 3, 0, 2, 4, 5).reshape(grid * grid, len(x), -1)

    out = np.zeros((len(q), len(r)))
    for a, b in zip(tiles(q.astype(np.int64)), tiles(r.astype(np.int64))):
        diff = a[:, None, :] - b[None, :, :]
        out = np.maximum(out, (diff * diff).sum(-1) / (255.0 * 255.0 * a.shape[1]))
    return np.sqrt(out)


def exact_pairwise(x: np.ndarray, grid: int = 4) -> np.ndarray:
    return exact_cross(x, x, grid)


@pytest.fixture(params=[True, False], ids=["int8", "float32"])
def products(request, monkeypatch):
    """Every test of a module that uses it twice: uint8 tiles from exact int8 products (forced
    on wherever ``torch._int_mm`` runs, fast or not), and from float32 products with the exact
    refinement (the path of float pixels and of devices without int8 products)."""
    import memscan.distances as dist_mod

    monkeypatch.setattr(dist_mod, "INT8_PRODUCTS", request.param)
    monkeypatch.setattr(dist_mod, "_int8_pays_on_cpu", lambda: True)
    monkeypatch.delitem(dist_mod._INT8_OK, "cpu", raising=False)
    return request.param


def values_with_square_sum(total: int, n: int) -> np.ndarray:
    """``n`` uint8 values whose squares sum to ``total`` (a uniform tile of v and v + 1, four
    small values making up the rest): a tile at tiled ℓ2 ``sqrt(total / (255² n))`` from zero."""
    v = int((total / (n - 4)) ** 0.5)
    ups = (total - v * v * (n - 4)) // (2 * v + 1)  # entries raised to v + 1
    rest = total - v * v * (n - 4) - ups * (2 * v + 1)  # < 2v + 1: four squares (Lagrange)
    for a in range(int(rest**0.5) + 1):
        for b in range(a + 1):
            for c in range(b + 1):
                d = int(round((rest - a * a - b * b - c * c) ** 0.5)) if rest >= a * a + b * b + c * c else -1
                if d >= 0 and a * a + b * b + c * c + d * d == rest:
                    out = np.array([v + 1] * ups + [v] * (n - 4 - ups) + [a, b, c, d], np.uint8)
                    assert int((out.astype(np.int64) ** 2).sum()) == total
                    return out
    raise AssertionError(f"no four squares for {rest}")  # pragma: no cover - Lagrange
