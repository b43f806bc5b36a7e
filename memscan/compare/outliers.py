"""Memorization or outliers? A model-free outlier score beside each example's memorization score.

A fair criticism of the memorization score (van den Burg & Williams 2021) and of membership
scores is that they may flag atypical examples rather than copies. For every scored example we
compute the **k-NN distance** (Ramaswamy, Rastogi & Shim, "Efficient algorithms for mining
outliers from large data sets", SIGMOD 2000): the distance to its k-th nearest *training*
example, itself excluded (k = 5 by default, the value of that paper's experiments' small-k
regime; an example with at least k exact copies in the training set has distance 0, so it is
never an outlier — one with fewer copies can still be). Spaces:

- images / arrays: the normalised ℓ2 of DESIGN.md, ``sqrt(mean((a − b)²))`` over pixels in
  [0, 1] (exact: a FAISS flat index's float32 candidates, recomputed in float64 and certified
  against a proven bound on FAISS's rounding, else searched further — :func:`knn_distance`);
- text: cosine distance ``1 − cos`` between TF-IDF vectors (scikit-learn);
- a training index (``memscan index``): cosine distance ``1 − cos`` between the index's own
  L2-normalised embeddings (:func:`index_knn_distance`): the reference is every indexed training
  image, an example found in the index by its id is represented by its stored vector and
  excluded from its own neighbours, any other example is embedded with the index's embedder
  (exact, certified as for pixels, with a flat index; over an approximate index's candidates
  otherwise — :func:`embedding_knn_distance`).

Then Spearman's rank correlation between the outlier score and the memorization score
(scipy), and the examples where the two rankings disagree most: high memorization but typical,
and outlying but not memorized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

#: FAISS candidates fetched beyond the k + 1 needed (the example itself may be one of them): the
#: first round's k + 1 + margin nearest, recomputed exactly in float64. They make the result
#: exact only with the certificate of :func:`_certified_kth` (FAISS's float32 error can exceed
#: the gaps between near-duplicates, so the true k-th neighbour may lie outside any fixed margin).
CANDIDATE_MARGIN = 8
#: Rows without a certificate are searched again with this many times more candidates …
CANDIDATE_GROWTH = 8
#: … while that stays within this many; a row still uncertified is then computed over every
#: reference in float64 (:func:`_exact_kth_everywhere`: a blocked float64 GEMM shortlist; a
#: search that large costs about as much as that, and a row that fails its first rounds usually
#: sits in a cluster that no number of float32 candidates resolves).
MAX_CANDIDATES = 128
#: Decimals the distances are rounded to (equal distances must tie in rank statistics).
ROUND = 12
#: Queries re-ranked per block in :func:`embedding_knn_distance`.
CHUNK = 2048
#: Neighbours for the k-NN distance (Ramaswamy et al. 2000 use the k-th neighbour's distance).
DEFAULT_K = 5
#: float64 values gathered at once by the exact steps (64 MB).
_BLOCK_ELEMENTS = 1 << 23
#: … and by the re-ranking of candidates, per block (2 MB: a block stays in cache).
_CACHE_ELEMENTS = 1 << 18
#: :func:`_exact_kth_everywhere`: queries per block (they share one centre), entries of a
#: query block × reference block distance matrix, shortlisted pairs held before they are computed.
_QUERY_BLOCK = 256
_GEMM_ELEMENTS = 1 << 20
_PENDING_PAIRS = 1 << 20
_U32 = 2.0**-24  # float32's unit roundoff
_U64 = 2.0**-53  # float64's


def _gamma(n: int, u: float) -> float:
    """Higham's ``γ_n = n·u / (1 − n·u)``: the relative error bound of a sum of n terms (or a
    dot product of length n) in a floating-point format of unit roundoff u, in any order."""
    return n * u / (1 - n * u)


def _kth_smallest(d: np.ndarray, k: int) -> np.ndarray:
    """Per row of ``d`` (Q×m, ``inf`` = absent) its k-th smallest value (``inf`` if m < k)."""
    if d.shape[1] < k:
        return np.full(d.shape[0], np.inf)
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def _k_smallest(d: np.ndarray, k: int) -> np.ndarray:
    """Per row of ``d`` its k smallest values (unordered; all of them when fewer)."""
    return d if d.shape[1] <= k else np.partition(d, k - 1, axis=1)[:, :k]


def _certified_kth(n_q: int, k: int, kk: int, n_ref: int, candidates, everywhere) -> np.ndarray:
    """The k-th smallest distance of each query to the reference rows, exact, from candidates.

    ``candidates(rows, kk)`` returns, for the queries ``rows``, the k-th smallest float64 distance
    to their ``kk`` (float32) candidates — the query's own row excluded, ``inf`` when fewer than k
    remain — and a *floor*: a lower bound on the float64 distance of every reference row that was
    not a candidate (``+inf`` when every row was). Where the k-th is ≤ the floor, no row outside
    the candidates can come before it, so it is the k-th over all rows; where it is ≤ 0, so is the
    k-th over all rows (more rows can only lower it), and both functions report max(·, 0) = 0.
    The other queries get ``CANDIDATE_GROWTH`` times more candidates while that is at most
    ``MAX_CANDIDATES`` (or every reference row); then ``everywhere(rows)`` computes their k-th
    over every reference row in float64.
    """
    out = np.full(n_q, np.inf)
    todo = np.arange(n_q)
    kk = min(kk, n_ref)
    while todo.size:
        kth, floor = candidates(todo, kk)
        ok = (kth <= floor) | (kth <= 0)
        out[todo[ok]] = kth[ok]
        todo = todo[~ok]
        if not todo.size:
            break
        grown = min(kk * CANDIDATE_GROWTH, n_ref)
        if kk >= n_ref or grown > MAX_CANDIDATES:
            out[todo] = everywhere(todo)
            break
        kk = grown
    return out


def _merge_k_smallest(best: np.ndarray, rows: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """``best`` (B×k, each row ascending, ``inf`` = none) merged with the values ``vals`` of rows
    ``rows``: each row's k smallest, ascending."""
    b, k = best.shape
    g = np.concatenate([np.repeat(np.arange(b), k), rows])
    v = np.concatenate([best.ravel(), vals])
    o = np.lexsort((v, g))
    g, v = g[o], v[o]
    rank = np.arange(len(g)) - np.searchsorted(g, np.arange(b))[g]
    keep = rank < k
    out = np.full_like(best, np.inf)
    out[g[keep], rank[keep]] = v[keep]
    return out


def _exact_kth_everywhere(x64: np.ndarray, rows: np.ndarray, ref_rows: np.ndarray, k: int) -> np.ndarray:
    """The k-th smallest float64 ``mean((x64[r] − x64[i])²)`` over the reference rows ``r`` ≠ i,
    for each row i of ``rows``, exactly as a brute force by direct differences computes it
    (``inf`` where fewer than k other reference rows exist).

    In blocks, without computing every pair by direct differences: per block of
    :data:`_QUERY_BLOCK` queries, centred at their mean c (a distance does not change under a
    shift; centring shrinks the cancellation error), a float64 GEMM gives
    ``D̃ = ‖q̃‖² + ‖r̃‖² − 2 q̃·r̃`` (q̃ = fl(q − c), r̃ = fl(r − c)) for every reference r, with
    ``|D̃ − ‖q − r‖²| ≤ E = (γ_{D+16} + 3u)·(‖q̃‖ + ‖r̃‖)²``, u = 2⁻⁵³ — the rounding of q − c and
    r − c moves ‖q − r‖ by at most u·(‖q − c‖ + ‖r − c‖), which moves its square by at most
    3u·(…)²; the norms and the dot product of length D are within γ_D, the last two operations
    add 2u — and the direct-difference mean ``m`` is within γ_{D+3} (relative) of ‖q − r‖² / D.
    So each pair has bounds ``lo ≤ m ≤ hi`` (``(D̃ ∓ E) / D``, widened by 2γ_{D+16} to cover
    their own rounding). The k-th smallest ``hi`` seen so far, and the k-th smallest exact ``m``
    computed so far, are upper bounds t on the row's exact k-th; a pair with ``lo > t`` is
    strictly above that k-th and cannot change it, so only the pairs with ``lo ≤ t`` are computed
    by direct differences (in bounded batches), and the k-th of those is the exact k-th. Where the
    GEMM cannot separate the rows (float64 data closer than its rounding), more pairs are
    computed directly, still exact.
    """
    n_ref, d = len(ref_rows), x64.shape[1]
    out = np.full(len(rows), np.inf)
    coef = (_gamma(d + 16, _U64) + 3 * _U64) * (1 + 1e-6)
    shrink, grow = 1 - 2 * _gamma(d + 16, _U64), 1 + 2 * _gamma(d + 16, _U64)
    qb = max(1, min(_QUERY_BLOCK, _BLOCK_ELEMENTS // max(1, d)))
    rb = max(1, min(_BLOCK_ELEMENTS // max(1, d), _GEMM_ELEMENTS // qb))
    per = max(1, _CACHE_ELEMENTS // max(1, d))

    def exact(q: np.ndarray, r: np.ndarray) -> np.ndarray:
        # the direct-difference mean of squares of the pairs (q[j], r[j]), as the brute force
        m = np.empty(len(q))
        for s in range(0, len(q), per):
            diff = x64[r[s : s + per]]
            diff -= x64[q[s : s + per]]
            m[s : s + per] = np.square(diff, out=diff).mean(axis=1)
        return m

    def flush(best: np.ndarray, pend: list, thr: np.ndarray, q_rows: np.ndarray) -> np.ndarray:
        # the pending pairs still at or below their row's bound, computed and merged into best
        if pend:
            i, r, lo = (np.concatenate(a) for a in zip(*pend))
            keep = lo <= thr[i]
            best = _merge_k_smallest(best, i[keep], exact(q_rows[i[keep]], r[keep]))
            pend.clear()
        return best

    for s in range(0, len(rows), qb):
        q_rows = rows[s : s + qb]
        c = x64[q_rows].mean(axis=0)
        qc = x64[q_rows] - c
        nq, aq = np.einsum("ij,ij->i", qc, qc), _row_norms(qc)
        best = np.full((len(q_rows), k), np.inf)  # the k smallest exact m computed (ascending)
        hi_best = np.full((len(q_rows), k), np.inf)  # the k smallest upper bounds seen
        pend: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (query, reference, lo)
        n_pend = 0
        for t in range(0, n_ref, rb):
            r_rows = ref_rows[t : t + rb]
            rc = x64[r_rows] - c
            nr, ar = np.einsum("ij,ij->i", rc, rc), _row_norms(rc)
            dd = nq[:, None] + nr[None, :] - 2 * (qc @ rc.T)
            e = coef * (aq[:, None] + ar[None, :]) ** 2 + 2.0**-1000 * d
            lo = np.maximum(dd - e, 0) / d * shrink
            hi = (dd + e) / d * grow
            lo[~(lo >= 0)] = 0  # NaN (an overflow): no bound
            hi[~(hi >= 0)] = np.inf
            own = q_rows[:, None] == r_rows[None, :]
            hi[own] = np.inf
            hi_best = _k_smallest(np.concatenate([hi_best, hi], axis=1), k)
            # t: an upper bound on each row's exact k-th; a pair with lo > t cannot change it
            thr = np.minimum(hi_best.max(axis=1), best[:, -1])
            i, j = np.nonzero((lo <= thr[:, None]) & ~own)
            pend.append((i, r_rows[j], lo[i, j]))
            n_pend += len(i)
            if n_pend > _PENDING_PAIRS:
                best, n_pend = flush(best, pend, thr, q_rows), 0
        best = flush(best, pend, np.minimum(hi_best.max(axis=1), best[:, -1]), q_rows)
        out[s : s + len(q_rows)] = best[:, -1]
    return out


def _row_norms(x, block_elements: int = _BLOCK_ELEMENTS) -> np.ndarray:
    """ℓ2 norms of the rows of ``x`` in float64, in blocks (``x`` may be memory-mapped), rounded
    up by a relative 1e-9 (their own float64 rounding)."""
    n, d = x.shape
    out = np.empty(n)
    per = max(1, block_elements // max(1, d))
    for s in range(0, n, per):
        b = np.asarray(x[s : s + per], np.float64)
        out[s : s + per] = np.sqrt(np.einsum("ij,ij->i", b, b))
    return out * (1 + 1e-9)


def _as_rows(a) -> np.ndarray:
    """``a`` as float64 rows (N×D, the trailing axes flattened; N = 0 allowed)."""
    x = np.asarray(a, np.float64)
    return x.reshape(len(x), math.prod(x.shape[1:]))


def knn_distance(features: np.ndarray, reference: np.ndarray | None = None, k: int = DEFAULT_K) -> np.ndarray:
    """Normalised ℓ2 distance from each row of ``features`` to its k-th nearest reference row,
    the row itself excluded.

    Exact: equal to a float64 brute force ``sqrt(mean((a − b)²))`` by direct differences over
    every reference row. FAISS (float32 ``IndexFlatL2``) proposes the k + 1 +
    :data:`CANDIDATE_MARGIN` nearest, recomputed in float64; a reference it did not return has a
    FAISS squared distance ≥ the last returned one, ``f_last``, so an exact one ≥ ``f_last − E``
    with ``E`` a proven bound on FAISS's float32 error (the rounding of the features to float32
    included): ``E = (γ_{D+16} + 3u) · (‖q‖ + max ‖r‖)²``, u = 2⁻²⁴, ``γ_n = n·u / (1 − n·u)``
    (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1; FAISS computes
    ``‖q‖² + ‖r‖² − 2 q·r`` or ``Σ (q − r)²``, each within that of the exact value). Where the
    k-th exact distance is ≤ that floor, it is the k-th over every row.

    In a cluster of near-duplicates no such certificate exists, and no tighter bound would give
    one: FAISS's *actual* float32 error (``‖q‖²`` ≈ 256 for 768 pixels around 0.5: rounding
    ≈ 1e-5) is as large as the gaps between the copies (noise 1e-4: squared distances
    ≈ 1.5e-5), so its order within the cluster is noise, and a copy it did not return may truly
    be nearer than the k-th it did. Such rows get more candidates while that stays cheap
    (:func:`_certified_kth`), then the blocked float64 search of :func:`_exact_kth_everywhere`
    (a GEMM shortlist with its own proven bound, then direct differences of the shortlist only).

    A row with a non-finite feature (NaN, ±inf) gets NaN and is no row's neighbour (as if not
    a reference row); the other rows are unaffected. Features beyond float32's range are searched
    by :func:`_exact_kth_everywhere` alone.

    Parameters
    ----------
    features : float N×D (pixels in [0, 1], or any vectors; N = 0 gives an empty result)
    reference : bool mask (N,) of the rows that are training examples (default: all)
    k : the neighbour whose distance is the score

    Returns
    -------
    numpy.ndarray (N,), float64; NaN for rows with fewer than k other (finite) reference rows,
    and for rows with a non-finite feature

    >>> knn_distance(np.array([[0.0], [0.5], [2.0], [np.nan]]), k=1).tolist()
    [0.5, 0.5, 1.5, nan]
    >>> knn_distance(np.zeros((0, 4))).shape
    (0,)
    """
    import faiss

    x64 = _as_rows(features)
    n, d = x64.shape
    ref = np.ones(n, bool) if reference is None else np.asarray(reference, bool)
    finite = np.isfinite(x64).all(axis=1)
    queries = np.flatnonzero(finite)  # rows with a non-finite feature stay NaN …
    ref_rows = np.flatnonzero(ref & finite)  # … and are no row's neighbour
    out = np.full(n, np.nan)
    if len(ref_rows) == 0 or k < 1 or len(queries) == 0:
        return out
    n_ref = len(ref_rows)
    with np.errstate(over="ignore"):
        x = np.ascontiguousarray(x64, np.float32)
    if not np.isfinite(x[queries]).all():
        # beyond float32's range: FAISS's values (and their bound) mean nothing
        kth = _exact_kth_everywhere(x64, queries, ref_rows, k)
    else:
        index = faiss.IndexFlatL2(d)
        index.add(x[ref_rows])
        norms = _row_norms(x64)
        # FAISS's error on a squared distance (float32 rounding of the features included; a
        # subnormal's absolute rounding in the last term), then float64's on a mean of squares
        e32 = (_gamma(d + 16, _U32) + 3 * _U32) * (norms + norms[ref_rows].max()) ** 2 * (1 + 1e-6)
        e32 += 2.0**-100 * d
        shrink = 1 - 2 * _gamma(d + 16, _U64)

        def candidates(sub: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
            rows = queries[sub]
            # 1. the kk nearest reference rows in float32 (one may be the row itself)
            f, nn = index.search(np.ascontiguousarray(x[rows]), kk)
            nn = np.asarray(nn, np.int64)
            hits = np.where(nn >= 0, ref_rows[np.maximum(nn, 0)], -1)
            drop = (nn < 0) | (hits == rows[:, None])
            # 2. exact float64 mean of squares to the candidates; the row itself, missing ones: inf
            m = np.full(nn.shape, np.inf)
            per = max(1, _CACHE_ELEMENTS // (kk * d))
            for s in range(0, len(rows), per):
                diff = x64[np.where(drop[s : s + per], 0, hits[s : s + per])]
                diff -= x64[rows[s : s + per], None, :]
                m[s : s + per] = np.square(diff, out=diff).mean(axis=2)
            m[drop] = np.inf
            kth = _kth_smallest(m, k)
            # 3. certificate: a reference not returned has an exact mean of squares ≥ (f_last − E) / D
            if kk >= n_ref:  # every reference row, unless FAISS left a slot empty (−1: a float32 overflow)
                return kth, np.where((nn >= 0).all(axis=1), np.inf, -np.inf)
            floor = (f[:, -1].astype(np.float64) - e32[rows]) / d * shrink
            return kth, np.where(nn[:, -1] < 0, -np.inf, floor)

        def everywhere(sub: np.ndarray) -> np.ndarray:
            # 4. rows without a certificate: float64 over every reference row, in blocks
            return _exact_kth_everywhere(x64, queries[sub], ref_rows, k)

        kth = _certified_kth(len(queries), k, k + 1 + CANDIDATE_MARGIN, n_ref, candidates, everywhere)
    # 5. the distance; rounded so that equal distances tie exactly (rank correlations)
    for i, v in zip(queries, kth):
        if np.isfinite(v):
            out[i] = round(float(np.sqrt(v)), ROUND)
    return out


def text_knn_distance(texts: list[str], reference: np.ndarray | None = None, k: int = DEFAULT_K) -> np.ndarray:
    """Cosine distance in TF-IDF space (scikit-learn defaults, fitted on every text) to the k-th
    nearest reference text, the text itself excluded."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    n = len(texts)
    ref = np.ones(n, bool) if reference is None else np.asarray(reference, bool)
    out = np.full(n, np.nan)
    if n == 0:
        return out
    x = TfidfVectorizer().fit_transform(texts)  # rows are L2-normalised
    sim = (x @ x[np.flatnonzero(ref)].T).toarray()
    ref_rows = np.flatnonzero(ref)
    for i in range(n):
        d = 1.0 - sim[i]
        if ref[i]:
            d = d[ref_rows != i]
        if len(d) < k:
            continue
        out[i] = round(float(np.sort(d)[k - 1]), ROUND)
    return out


def _exact_search(index) -> bool:
    """Whether ``index.search`` is an exhaustive float32 inner-product search (its candidates can
    be certified): a FAISS ``IndexFlat``, a flat :class:`~memscan.index.faiss_index.TrainingIndex`
    (in memory, memory-mapped or in parts)."""
    import faiss

    params = getattr(index, "params", None)
    if params is not None and getattr(params, "index_type", None) == "flat":
        return True
    return isinstance(index, faiss.IndexFlat)


def embedding_knn_distance(
    queries: np.ndarray, reference: np.ndarray, self_rows: np.ndarray | None = None, k: int = DEFAULT_K, index=None
) -> np.ndarray:
    """Cosine distance ``1 − u·v`` from each L2-normalised query vector to its k-th nearest
    reference vector, the query's own reference row excluded.

    Exact (equal to a float64 brute force ``1 − q·r`` over every reference row, clipped at 0) when
    the candidates come from an exhaustive search (``index`` None or flat): the k + 1 +
    :data:`CANDIDATE_MARGIN` most similar in float32, recomputed in float64; a reference not
    returned has a float32 similarity ≤ the last returned one, ``s_last``, so an exact one ≤
    ``s_last + E``, ``E = (γ_{D+16} + 3u) · ‖q‖ · max ‖r‖`` (u = 2⁻²⁴, ``γ_n = n·u / (1 − n·u)``:
    a float32 dot product of any summation order, the rounding of the inputs to float32
    included). A row whose k-th distance is above ``1 − s_last − E`` (near-duplicates within
    float32 rounding of each other) gets more candidates, and at last a float64 search over
    every reference row (:func:`_certified_kth`). With an approximate index (``ivf``,
    ``ivfpq``, ``hnsw``) the result is exact over the candidates it returns only.

    Parameters
    ----------
    queries : float Q×D, L2-normalised
    reference : float N×D, L2-normalised (a training index's embeddings)
    self_rows : int (Q,): the reference row that *is* query i (excluded), or −1 (none)
    k : the neighbour whose distance is the score
    index : an object with ``search(q, k) -> (similarities, rows)`` over ``reference`` (a
        :class:`~memscan.index.faiss_index.TrainingIndex`) giving the candidates; default: an
        exact FAISS inner-product index built here

    Returns
    -------
    numpy.ndarray (Q,), float64; NaN where fewer than k other (finite) reference rows exist,
    and for a query with a non-finite value (a reference row with one is no query's neighbour;
    the bound above is taken over the finite rows, so the other queries are unaffected)

    >>> e = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [np.nan, 0.0]])
    >>> embedding_knn_distance(e, e, np.arange(4), k=1).tolist()
    [0.4, 0.2, 0.2, nan]
    >>> embedding_knn_distance(np.zeros((0, 2)), e).shape
    (0,)
    """
    q64 = _as_rows(queries)
    with np.errstate(over="ignore"):
        q = np.ascontiguousarray(q64, np.float32)
    ref = np.asarray(reference)
    n_q, n_ref = len(q), len(ref)
    rows = np.full(n_q, -1, np.int64) if self_rows is None else np.asarray(self_rows, np.int64)
    out = np.full(n_q, np.nan)
    qrows = np.flatnonzero(np.isfinite(q64).all(axis=1))  # a non-finite query stays NaN
    if len(qrows) == 0 or n_ref == 0 or k < 1:
        return out
    d = q.shape[1]
    exhaustive = index is None or _exact_search(index)
    remap = None  # the reference row of each row of an index built here (finite ones only)
    n_index = n_ref
    if exhaustive:
        rnorms = _row_norms(ref)
        finite = np.isfinite(rnorms)  # a non-finite reference row is no query's neighbour
        if not finite.any():
            return out
    if index is None:
        import faiss

        index = faiss.IndexFlatIP(d)
        if finite.all():
            index.add(np.ascontiguousarray(ref, np.float32))
        else:
            remap = np.flatnonzero(finite)
            n_index = len(remap)
            index.add(np.ascontiguousarray(np.asarray(ref[remap]), np.float32))
    if exhaustive:
        # FAISS's error on a similarity (float32 rounding of both sides included; a subnormal's
        # absolute rounding in the last term), then float64's on 1 − q·r; from the finite rows
        qr = _row_norms(q64) * rnorms[finite].max()
        err = (_gamma(d + 16, _U32) + 3 * _U32) * qr * (1 + 1e-6) + 2.0**-100 * d
        err += _gamma(d + 16, _U64) * qr + 4 * _U64 * (1 + qr)

    def candidates(sub: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        sub = qrows[sub]
        # 1. the kk most similar reference rows in float32 (one may be the query itself)
        sims, nn = index.search(np.ascontiguousarray(q[sub]), kk)
        sims, nn = np.asarray(sims, np.float64), np.asarray(nn, np.int64)
        if remap is not None:
            nn = np.where(nn >= 0, remap[np.maximum(nn, 0)], -1)
        kth = np.empty(len(sub))
        step = max(1, min(CHUNK, _BLOCK_ELEMENTS // (kk * d)))
        for s in range(0, len(sub), step):
            # 2. exact float64 cosine distance to the candidates; the query's own row, missing
            #    candidates (−1) and non-finite distances are set to +inf
            c = nn[s : s + step]
            drop = (c < 0) | (c == rows[sub[s : s + len(c)], None])
            flat = np.where(drop, 0, c).ravel()
            order = np.argsort(flat, kind="stable")  # sorted reads (a memory-mapped index)
            vec = np.empty((len(flat), ref.shape[1]), np.float64)
            vec[order] = np.asarray(ref[flat[order]], np.float64)
            dist = 1.0 - np.einsum("qkd,qd->qk", vec.reshape(*c.shape, -1), q64[sub[s : s + len(c)]])
            dist[drop | ~np.isfinite(dist)] = np.inf
            kth[s : s + len(c)] = _kth_smallest(dist, k)
        # 3. certificate: a reference not returned has an exact distance ≥ 1 − s_last − E
        if not exhaustive:
            return kth, np.full(len(sub), np.inf)
        valid = nn >= 0
        if kk >= n_index:  # every reference row, unless FAISS left a slot empty (a float32 overflow)
            return kth, np.where(valid.all(axis=1), np.inf, -np.inf)
        s_last = np.where(valid, sims, np.inf).min(axis=1)
        floor = 1.0 - s_last - err[sub]
        return kth, np.where(valid.all(axis=1), floor, -np.inf)

    def everywhere(sub: np.ndarray) -> np.ndarray:
        # 4. rows without a certificate: float64 over every reference row, in blocks
        sub = qrows[sub]
        best = np.zeros((len(sub), 0))
        qs = q64[sub]
        per = max(1, min(_BLOCK_ELEMENTS // d, _BLOCK_ELEMENTS // len(sub)))
        for s in range(0, n_ref, per):
            r = np.asarray(ref[s : s + per], np.float64)
            dist = 1.0 - qs @ r.T
            dist[(rows[sub, None] == np.arange(s, s + len(r))) | ~np.isfinite(dist)] = np.inf
            best = _k_smallest(np.concatenate([best, dist], axis=1), k)
        return _kth_smallest(best, k)

    if not np.isfinite(q[qrows]).all():  # beyond float32's range: FAISS's values mean nothing
        kth = everywhere(np.arange(len(qrows)))
    else:
        kth = _certified_kth(len(qrows), k, k + 1 + CANDIDATE_MARGIN, n_index, candidates, everywhere)
    # 5. the k-th; rounded so that equal distances tie exactly (rank correlations)
    out[qrows] = np.where(np.isfinite(kth), np.round(np.maximum(kth, 0.0), ROUND), np.nan)
    return out


def index_knn_distance(index, ids, images=None, k: int = DEFAULT_K, embedder=None) -> np.ndarray:
    """k-NN cosine distance of each example to the training images of a ``memscan index``.

    Parameters
    ----------
    index : :class:`~memscan.index.faiss_index.TrainingIndex` (``TrainingIndex.load(INDEX)``)
    ids : the examples' ids; an id found in the index is represented by its stored embedding and
        is excluded from its own neighbours (the example itself)
    images : uint8 N×H×W×C (or a callable ``rows -> images``) for the examples *not* in the
        index, embedded with the index's recorded embedder; None: such examples get NaN
    k : the neighbour whose distance is the score
    embedder : override the recorded embedder (tests)

    Returns
    -------
    numpy.ndarray (N,), float64 (NaN for an example neither indexed nor given as an image)
    """
    from memscan.index.embedders import l2_normalize, load_embedder

    ids = [str(i) for i in ids]
    pos = {i: r for r, i in enumerate(index.ids)}
    self_rows = np.array([pos.get(i, -1) for i in ids], np.int64)
    q = np.zeros((len(ids), index.dim), np.float32)
    known = self_rows >= 0
    # 1. indexed examples: their own stored vectors
    if known.any():
        q[known] = np.asarray(index.embeddings[self_rows[known]], np.float32)
    missing = np.flatnonzero(~known)
    have = np.ones(len(ids), bool)
    # 2. the others (non-members): embedded with the index's own embedder
    if len(missing):
        if images is None:
            have[missing] = False
        else:
            imgs = images(missing) if callable(images) else np.asarray(images)[missing]
            emb = load_embedder(embedder or index.meta.get("embedder", "pixel"))
            q[missing] = l2_normalize(emb.embed(imgs))
    out = embedding_knn_distance(q, index.embeddings, self_rows, k, index=index)
    out[~have] = np.nan
    return out


@dataclass(frozen=True)
class OutlierAnalysis:
    """Spearman's ρ between memorization and outlier scores, and the most disagreeing examples.

    Attributes
    ----------
    n : examples with both scores
    spearman, p_value : scipy.stats.spearmanr
    table : per example: ``id``, ``score``, ``outlier``, ``score_rank`` / ``outlier_rank``
        (fractional ranks in [0, 1]), ``disagreement`` = score_rank − outlier_rank
    """

    n: int
    spearman: float
    p_value: float
    table: pd.DataFrame

    def most_disagreeing(self, top: int = 5) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(memorized but typical, outlying but not memorized): the ``top`` of each end."""
        t = self.table.dropna(subset=["disagreement"]).sort_values("disagreement", kind="stable")
        return t.iloc[::-1].head(top), t.head(top)


def analyse(ids, score, outlier) -> OutlierAnalysis:
    """Rank correlation and disagreement between ``score`` (memorization / MIA) and ``outlier``."""
    from scipy import stats

    t = pd.DataFrame({"id": [str(i) for i in ids], "score": np.asarray(score, float), "outlier": outlier})
    ok = np.isfinite(t["score"]) & np.isfinite(t["outlier"])
    n = int(ok.sum())
    rho, p = (math.nan, math.nan)
    if n >= 3:
        r = stats.spearmanr(t.loc[ok, "score"], t.loc[ok, "outlier"])
        rho, p = float(r.statistic), float(r.pvalue)
    t["score_rank"] = t["score"].where(ok).rank(pct=True)
    t["outlier_rank"] = t["outlier"].where(ok).rank(pct=True)
    t["disagreement"] = t["score_rank"] - t["outlier_rank"]
    return OutlierAnalysis(n, rho, p, t)
