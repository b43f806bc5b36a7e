"""Nearest training images in pixel space: ℓ2 through a FAISS flat index, tiled ℓ2 exactly.

Carlini et al. (2023, CIFAR-10 study) compare every one of 2^16 generations with all 50,000
training images. :class:`PixelSearch` does that with one ``faiss.IndexFlatL2`` over the training
pixels (float32 in 0..255 units; FAISS computes ``‖q‖² + ‖r‖² − 2 q·r`` with BLAS for batches of
20 queries or more, ``Σ (q − r)²`` below), then:

- it fetches ``k + margin`` candidates (``margin`` default ``max(8, k)``) and recomputes all of
  their distances exactly from integer pixel differences, re-ranking by the exact distance (ties:
  the lower reference index) — identical images give exactly 0;
- distances are reported as the normalised ℓ2 of DESIGN.md, ``sqrt(mean((a − b)²))`` in [0, 1],
  or the tiled ℓ2 (``metric="tiled_l2"``);
- **certificate.** A reference FAISS did not return has a FAISS distance ≥ the last fetched
  one's, ``f_last``; its exact squared ℓ2 is then ≥ ``f_last − E``, with ``E`` the proven bound
  on the float32 error below (:func:`faiss_l2_error_bound`). When the k-th exact distance is
  strictly below that (for ``tiled_l2``: tiled ℓ2 ≥ ℓ2, as the maximum over equal tiles of the
  tile MSE is at least their mean), no reference outside the candidates can enter the k nearest
  or tie with the k-th: the row is provably exact. Rows without the certificate (many
  near-duplicates within FAISS's rounding of each other; for ``tiled_l2`` also rows whose tiled
  distances exceed the fetched ℓ2 ones) are searched over every reference exactly: ℓ2 by
  integer-valued float64 products (:func:`exact_l2_search`: exact, whatever the order of the
  sums); tiled ℓ2 by :func:`memscan.distances.nearest_tiled_l2` proposing ``k + margin``,
  re-ranked exactly, and by integer sums over every reference for a row whose k-th distance is
  not below the last proposed one by more than the proposals' error bound
  (:func:`memscan.distances.tiled_l2_error_bound`) plus :data:`TILED_TOLERANCE`.

The bound: pixels are integers 0..255, exact in float32, and so are their products (< 2²⁴); a
float32 sum of n non-negative terms, in any order (blocked BLAS, SIMD lanes, FMA), errs by at
most ``γ_{n−1}`` times the sum, ``γ_n = n·u / (1 − n·u)``, u = 2⁻²⁴ (Higham, *Accuracy and
Stability of Numerical Algorithms*, 2nd ed., §3.1 and eq. 3.5). Either form of the distance is
then within ``γ_{D+8} · (‖q‖² + ‖r‖² + 2 q·r)`` of the exact one (the BLAS form adds three
roundings: the sum of the norms, the difference, and a negative result clamped to 0), and
``q·r ≤ ‖q‖·‖r‖``; with ``M`` the largest ‖r‖² of the references,
``E(q) = γ_{D+8} · (‖q‖ + √M)²``. At 64×64×3 (D = 12,288) ``γ ≈ 7.3·10⁻⁴``: ``E`` is at most
``2.9·10⁻³`` in normalised squared ℓ2 (white images), ~``7·10⁻⁴`` for mid-grey ones — far above
the errors FAISS shows in practice (~``7·10⁻⁴`` in ℓ2 near 0, i.e. ~``5·10⁻⁷`` squared), so
the certificate is rigorous, not tight.

:func:`pixel_distances` computes exact distances of given (query, reference) pairs — the
re-ranking step for candidates proposed by an embedding index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from memscan.distances import nearest_tiled_l2, tiled_l2_error_bound
from memscan.errors import InputError

METRICS = ("l2", "tiled_l2")
#: float32's unit roundoff.
F32_UNIT_ROUNDOFF = 2.0**-24


def faiss_l2_error_bound(query_sq_norms, max_reference_sq_norm: float, dim: int) -> np.ndarray:
    """A proven bound on |FAISS's float32 squared ℓ2 − the exact one| between a query of squared
    norm ``query_sq_norms`` and any reference of squared norm ≤ ``max_reference_sq_norm``, for
    integer pixels 0..255 in ``dim`` values (0..255 units; module docstring).

    Examples
    --------
    >>> faiss_l2_error_bound(np.array([0.0]), 0.0, 12).tolist()
    [0.0]
    >>> white = 255.0**2 * 12288  # a white 64×64×3 image; bound in normalised squared ℓ2:
    >>> (faiss_l2_error_bound(np.array([white]), white, 12288) / white).round(5).tolist()
    [0.00293]
    """
    n = dim + 8
    gamma = n * F32_UNIT_ROUNDOFF / (1 - n * F32_UNIT_ROUNDOFF)
    q = np.asarray(query_sq_norms, np.float64)
    return gamma * (np.sqrt(q) + np.sqrt(float(max_reference_sq_norm))) ** 2


@dataclass
class Neighbours:
    """The k nearest references of each query.

    Attributes
    ----------
    distances : Q×k float64, ascending (normalised ℓ2 or tiled ℓ2)
    indices : Q×k int64 into the references
    metric : ``l2`` or ``tiled_l2``
    exact_rows : Q bool — the row is exact (the FAISS candidates certified, or searched exactly
        over every reference; see module docstring): always True as returned by
        :meth:`PixelSearch.search`
    """

    distances: np.ndarray
    indices: np.ndarray
    metric: str
    exact_rows: np.ndarray


def _flat(images: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(images)
    if a.ndim != 4:
        raise InputError(f"{name}: expected N×H×W×C images, got shape {a.shape}", "stack them into one uint8 batch")
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.floating) or (a.size and (a.min() < 0 or a.max() > 1)):
            raise InputError(f"{name}: expected uint8 or float in [0, 1], got {a.dtype}", "pass uint8 0..255")
        a = np.round(a * 255.0).astype(np.uint8)
    # (an explicit width: ``-1`` cannot be inferred for an empty batch)
    return a.reshape(a.shape[0], int(np.prod(a.shape[1:], dtype=np.int64)))


def pixel_distances(
    queries: np.ndarray,
    references: np.ndarray,
    pairs: np.ndarray,
    metric: str = "l2",
    grid: int = 4,
    *,
    chunk_elements: int = 1 << 24,
) -> np.ndarray:
    """Exact distances between ``queries[i]`` and ``references[pairs[i, j]]`` (integer arithmetic).

    Parameters
    ----------
    queries : Q×H×W×C uint8
    references : R×H×W×C uint8
    pairs : Q×m int64 reference indices; entries < 0 give ``inf``
    metric : ``l2`` (normalised ℓ2) or ``tiled_l2`` (``grid × grid`` tiles)

    Examples
    --------
    >>> import numpy as np
    >>> from memscan.distances import l2
    >>> rng = np.random.default_rng(0)
    >>> q = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8); r = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    >>> d = pixel_distances(q, r, np.array([[4, -1], [0, 2]]))
    >>> bool(np.isclose(d[0, 0], l2(q[0], r[4]))), bool(np.isinf(d[0, 1]))
    (True, True)
    """
    sums, per_value = pixel_square_sums(queries, references, pairs, metric, grid, chunk_elements=chunk_elements)
    out = np.full(sums.shape, np.inf, np.float64)
    ok = sums >= 0
    out[ok] = np.sqrt(sums[ok].astype(np.float64) / per_value)
    return out


def pixel_square_sums(
    queries: np.ndarray,
    references: np.ndarray,
    pairs: np.ndarray,
    metric: str = "l2",
    grid: int = 4,
    *,
    chunk_elements: int = 1 << 24,
) -> tuple[np.ndarray, float]:
    """The exact integer sums behind :func:`pixel_distances`: per pair, the sum of squared pixel
    differences (``l2``) or its largest tile's (``tiled_l2``), int64 (-1 where ``pairs`` < 0),
    and the divisor (``255² ×`` values per image or tile) that makes them a squared distance."""
    if metric not in METRICS:
        raise InputError(f"metric {metric!r} is not one of {', '.join(METRICS)}")
    q = np.asarray(queries)
    r = np.asarray(references)
    if q.shape[1:] != r.shape[1:]:
        raise InputError(f"queries are {q.shape[1:]} but references are {r.shape[1:]}", "compare images of one size")
    pairs = np.asarray(pairs, dtype=np.int64)
    nq, m = pairs.shape
    h, w, c = q.shape[1:]
    if metric == "tiled_l2" and (h % grid or w % grid):
        raise InputError(f"image size {h}×{w} does not divide by grid={grid}", "choose a grid that divides both sides")
    th, tw = (h // grid, w // grid) if metric == "tiled_l2" else (h, w)
    per_value = 255.0 * 255.0 * th * tw * c
    out = np.full((nq, m), -1, np.int64)
    if nq == 0 or m == 0:
        return out, per_value
    rt = torch.from_numpy(np.ascontiguousarray(r))
    qt = torch.from_numpy(np.ascontiguousarray(q))
    # only the valid pairs are computed, as one flat list (a row of mostly -1 costs nothing)
    rows, cols = np.nonzero(pairs >= 0)
    qi, ri = torch.from_numpy(rows), torch.from_numpy(pairs[rows, cols])
    per = max(1, chunk_elements // (h * w * c))
    flat = np.empty(rows.size, np.int64)
    for s in range(0, rows.size, per):
        # 1. gather both sides (uint8), difference in int16, squares in int32, sums in int64: exact
        a = rt[ri[s : s + per]].to(torch.int16)
        diff = a.sub_(qt[qi[s : s + per]].to(torch.int16)).to(torch.int32)
        sq = diff.mul_(diff)
        n = sq.shape[0]
        if metric == "l2":
            d = sq.view(n, -1).sum(dim=1, dtype=torch.int64)
        else:
            d = sq.view(n, grid, th, grid, tw, c).sum(dim=(2, 4, 5), dtype=torch.int64).view(n, -1).amax(dim=1)
        flat[s : s + n] = d.numpy()
    out[rows, cols] = flat
    return out, per_value


def exact_l2_search(
    queries: np.ndarray, references: np.ndarray, k: int, *, block_elements: int = 1 << 22
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest references of each query by exact squared ℓ2, over every reference.

    ``queries`` Q×D and ``references`` R×D hold integers 0..255 (uint8). Distances come from
    ``‖q‖² + ‖r‖² − 2 q·r`` in float64: every product and partial sum is an integer below 2⁵³,
    so each is exact whatever the summation order. Returns the integer squared distances
    (int64, Q×k, ascending; ties by the lower index) and the indices.

    Examples
    --------
    >>> import numpy as np
    >>> r = np.array([[0, 0], [3, 4], [1, 1], [0, 0]], np.uint8)
    >>> d, i = exact_l2_search(np.array([[0, 0]], np.uint8), r, 3)
    >>> d.tolist(), i.tolist()
    ([[0, 0, 2]], [[0, 3, 2]])
    """
    q = np.asarray(queries, np.float64)
    nq, dim = q.shape
    nr = len(references)
    k = min(int(k), nr)
    q_norm = np.einsum("ij,ij->i", q, q)
    best_d = np.zeros((nq, 0), np.int64)
    best_i = np.zeros((nq, 0), np.int64)
    per = max(1, block_elements // max(1, dim))
    for s in range(0, nr, per):
        # 1. one block of references as float64 (exact integers), its squared distances
        r = np.asarray(references[s : s + per], np.float64)
        d = q_norm[:, None] + np.einsum("ij,ij->i", r, r)[None, :] - 2.0 * (q @ r.T)
        cand_d = np.concatenate([best_d, np.rint(d).astype(np.int64)], axis=1)
        cand_i = np.concatenate([best_i, np.broadcast_to(np.arange(s, s + len(r)), (nq, len(r)))], axis=1)
        # 2. keep the k best (ties: the lower index)
        order = np.lexsort((cand_i, cand_d), axis=1)[:, :k]
        best_d, best_i = np.take_along_axis(cand_d, order, 1), np.take_along_axis(cand_i, order, 1)
    return best_d, best_i


class PixelSearch:
    """Exact k-nearest training images by normalised ℓ2 or tiled ℓ2 over pixels.

    Parameters
    ----------
    references : R×H×W×C uint8 (or float in [0, 1]) training images
    grid : tiles per side for ``tiled_l2``
    add_chunk : references converted to float32 and added to FAISS per step (memory: the index
        holds ``4·R·H·W·C`` bytes, plus one chunk)

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> refs = rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    >>> nb = PixelSearch(refs).search(refs[[7, 3]], k=2)
    >>> nb.indices[:, 0].tolist(), nb.distances[:, 0].tolist()
    ([7, 3], [0.0, 0.0])
    """

    def __init__(self, references: np.ndarray, grid: int = 4, *, add_chunk: int = 8192):
        import faiss

        self.images = np.asarray(references)
        flat = _flat(self.images, "references")
        if flat.shape[0] == 0:
            raise InputError("no reference images to search", "pass at least one training image")
        if self.images.dtype != np.uint8:
            self.images = flat.reshape(self.images.shape)
            flat = self.images.reshape(flat.shape[0], -1)
        self.flat = flat
        self.dim = flat.shape[1]
        self.grid = grid
        self.index = faiss.IndexFlatL2(self.dim)
        max_sq = 0
        for s in range(0, flat.shape[0], add_chunk):
            block = flat[s : s + add_chunk].astype(np.float32)
            self.index.add(block)
            max_sq = max(max_sq, int(_sq_norms(flat[s : s + add_chunk]).max()))
        #: the largest squared norm of a reference (0..255 units), for the error bound
        self.max_sq_norm = max_sq

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(
        self,
        queries: np.ndarray,
        k: int = 1,
        metric: str = "l2",
        *,
        margin: int | None = None,
        query_chunk: int = 8192,
    ) -> Neighbours:
        """The ``k`` nearest references of every query, exact (module docstring: the ``k + margin``
        FAISS candidates re-ranked exactly, certified, else an exact search over all references)."""
        if metric not in METRICS:
            raise InputError(f"metric {metric!r} is not one of {', '.join(METRICS)}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InputError(f"k must be a positive integer, got {k!r}")
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, np.integer)) or margin < 0):
            raise InputError(f"margin must be a non-negative integer, got {margin!r}")
        qimg = np.asarray(queries)
        if qimg.ndim == 3:
            qimg = qimg[None]
        qflat = _flat(qimg, "queries")
        if qflat.shape[1] != self.dim:
            raise InputError(
                f"queries have {qflat.shape[1]} values per image, references {self.dim}", "use one H×W×C for both"
            )
        if qimg.dtype != np.uint8:
            qimg = qflat.reshape(qimg.shape)
        k = min(int(k), len(self))
        extra = margin if margin is not None else max(8, k)
        k_fetch = min(len(self), k + extra)
        nq = qflat.shape[0]
        dist = np.empty((nq, k), np.float64)
        idx = np.empty((nq, k), np.int64)
        exact = np.ones(nq, bool)
        for s in range(0, nq, query_chunk):
            qf = qflat[s : s + query_chunk]
            qs = qimg[s : s + query_chunk]
            # 1. FAISS flat search (float32) over the whole training set: k + margin candidates
            f2, ii = self.index.search(qf.astype(np.float32), k_fetch)
            # 2. the candidates' exact distances (integer sums), re-ranked; ties by the lower index
            sums, per_value = pixel_square_sums(qs, self.images, ii, metric, self.grid)
            sums = np.where(ii < 0, np.iinfo(np.int64).max, sums)  # (a flat index returns no -1)
            order = rowsort(sums, ii)
            sums_sorted = np.take_along_axis(sums, order, 1)
            dist[s : s + len(qs)] = np.sqrt(sums_sorted[:, :k] / per_value)
            idx[s : s + len(qs)] = np.take_along_axis(ii, order, 1)[:, :k]
            # 3. certificate: a reference not fetched has exact squared ℓ2 ≥ f_last − E > the k-th
            if k_fetch < len(self):
                floor = f2[:, -1].astype(np.float64) - faiss_l2_error_bound(
                    _sq_norms(qf), self.max_sq_norm, self.dim
                )  # in 0..255 units, per image
                kth = sums_sorted[:, k - 1].astype(np.float64) / per_value  # normalised squared
                # (float64 rounding of the two quotients: a relative 1e-12 to spare)
                exact[s : s + len(qs)] = kth < floor / (255.0 * 255.0 * self.dim) * (1 - 1e-12)
        # 4. rows without a certificate: exact search over every reference
        todo = np.nonzero(~exact)[0]
        if todo.size and metric == "l2":
            d2, ti = exact_l2_search(qflat[todo], self.flat, k)
            dist[todo] = np.sqrt(d2 / (255.0 * 255.0 * self.dim))
            idx[todo] = ti
        elif todo.size:
            dist[todo], idx[todo] = self._tiled_everywhere(qimg[todo], k, k_fetch)
        exact[todo] = True
        return Neighbours(dist, idx, metric, exact)

    def _tiled_everywhere(self, queries: np.ndarray, k: int, k_fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact tiled ℓ2 k-nearest over every reference: :func:`nearest_tiled_l2` proposes
        ``k_fetch``, re-ranked exactly; a row whose k-th exact distance is not below the last
        proposed one by its error bound and :data:`TILED_TOLERANCE` is searched by exact integer
        sums over all (a reference not proposed has a proposed distance ≥ the last one, so an
        exact one ≥ the last one less the bound)."""
        td, ti, _ = nearest_tiled_l2(queries, self.images, k=k_fetch, grid=self.grid)
        tolerance = TILED_TOLERANCE + tiled_l2_error_bound(queries, self.images, self.grid)
        sums, per_value = pixel_square_sums(queries, self.images, ti, "tiled_l2", self.grid)
        order = rowsort(sums, ti)
        sums, ti = np.take_along_axis(sums, order, 1), np.take_along_axis(ti, order, 1)
        dist = np.sqrt(sums[:, :k] / per_value)
        idx = ti[:, :k].copy()
        if k_fetch < len(self):
            unsure = np.nonzero(dist[:, k - 1] >= td[:, -1].astype(np.float64) - tolerance)[0]
            for row in unsure:
                dist[row], idx[row] = self._tiled_brute_force(queries[row], k)
        return dist, idx

    def _tiled_brute_force(self, query: np.ndarray, k: int, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """One query's exact tiled ℓ2 k-nearest by integer sums over every reference."""
        best_s, best_i = np.zeros(0, np.int64), np.zeros(0, np.int64)
        per_value = 1.0
        for s in range(0, len(self), chunk):
            cols = np.arange(s, min(len(self), s + chunk), dtype=np.int64)
            sums, per_value = pixel_square_sums(query[None], self.images, cols[None], "tiled_l2", self.grid)
            cand_s, cand_i = np.concatenate([best_s, sums[0]]), np.concatenate([best_i, cols])
            order = np.lexsort((cand_i, cand_s))[:k]
            best_s, best_i = cand_s[order], cand_i[order]
        return np.sqrt(best_s / per_value), best_i


#: The margin, on top of :func:`memscan.distances.tiled_l2_error_bound`, by which a row's k-th
#: exact tiled ℓ2 must lie below the last distance :func:`memscan.distances.nearest_tiled_l2`
#: proposed for the proposals to be trusted. The bound is what makes it exact: 2⁻²⁵ with int8
#: products (uint8; each distance the exact one rounded once to float32), else the rigorous
#: float32 bound (4.6·10⁻⁴ for CIFAR-10's 8×8×3 tiles; errors measured there stay below 5·10⁻⁷).
TILED_TOLERANCE = 1e-4


def _sq_norms(flat: np.ndarray, block_elements: int = 1 << 22) -> np.ndarray:
    """Exact squared norms (int64) of uint8 rows (in blocks: no int64 copy of them all)."""
    x = np.asarray(flat)
    out = np.zeros(len(x), np.int64)
    per = max(1, block_elements // max(1, x.shape[1] if x.ndim == 2 else 1))
    for s in range(0, len(x), per):
        b = x[s : s + per].astype(np.int64)
        out[s : s + per] = np.einsum("ij,ij->i", b, b)
    return out


def rowsort(d: np.ndarray, ii: np.ndarray) -> np.ndarray:
    """Per-row order by (distance, index): ties resolve to the lower reference index."""
    return np.lexsort((ii, d), axis=1)


def nearest_pixels(
    queries: np.ndarray, references: np.ndarray, k: int = 1, metric: str = "l2", grid: int = 4
) -> Neighbours:
    """One-shot :class:`PixelSearch`: the ``k`` nearest references of each query.

    Examples
    --------
    >>> import numpy as np
    >>> r = np.random.default_rng(2).integers(0, 256, (20, 8, 8, 1), dtype=np.uint8)
    >>> nearest_pixels(r[[4]], r, k=1, metric="tiled_l2", grid=2).indices.tolist()
    [[4]]
    """
    return PixelSearch(references, grid).search(queries, k, metric)
