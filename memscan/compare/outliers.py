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
#: … up to this many; a row still uncertified is then computed over every reference in float64.
MAX_CANDIDATES = 1024
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
    The other queries get ``CANDIDATE_GROWTH`` times more candidates, up to ``MAX_CANDIDATES``;
    then ``everywhere(rows)`` computes their k-th over every reference row in float64.
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
        if kk >= min(MAX_CANDIDATES, n_ref):
            out[todo] = everywhere(todo)
            break
        kk = min(kk * CANDIDATE_GROWTH, MAX_CANDIDATES, n_ref)
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


def knn_distance(features: np.ndarray, reference: np.ndarray | None = None, k: int = DEFAULT_K) -> np.ndarray:
    """Normalised ℓ2 distance from each row of ``features`` to its k-th nearest reference row,
    the row itself excluded.

    Exact: equal to a float64 brute force ``sqrt(mean((a − b)²))`` over every reference row.
    FAISS (float32 ``IndexFlatL2``) proposes the k + 1 + :data:`CANDIDATE_MARGIN` nearest,
    recomputed in float64; a reference it did not return has a FAISS squared distance ≥ the last
    returned one, ``f_last``, so an exact one ≥ ``f_last − E`` with ``E`` a proven bound on
    FAISS's float32 error (the rounding of the features to float32 included):
    ``E = (γ_{D+16} + 3u) · (‖q‖ + max ‖r‖)²``, u = 2⁻²⁴, ``γ_n = n·u / (1 − n·u)`` (Higham,
    *Accuracy and Stability of Numerical Algorithms*, §3.1; FAISS computes
    ``‖q‖² + ‖r‖² − 2 q·r`` or ``Σ (q − r)²``, each within that of the exact value). A row whose
    k-th distance is not below that floor (clusters of near-duplicates within FAISS's rounding of
    each other) gets more candidates (:func:`_certified_kth`), and at last a float64 search over
    every reference row.

    Parameters
    ----------
    features : float N×D (pixels in [0, 1], or any vectors)
    reference : bool mask (N,) of the rows that are training examples (default: all)
    k : the neighbour whose distance is the score

    Returns
    -------
    numpy.ndarray (N,), float64; NaN for rows with fewer than k other reference rows
    """
    import faiss

    x64 = np.asarray(features, np.float64).reshape(len(features), -1)
    x = np.ascontiguousarray(x64, np.float32)
    n, d = x.shape
    ref = np.ones(n, bool) if reference is None else np.asarray(reference, bool)
    ref_rows = np.flatnonzero(ref)
    out = np.full(n, np.nan)
    if len(ref_rows) == 0 or k < 1 or n == 0:
        return out
    n_ref = len(ref_rows)
    index = faiss.IndexFlatL2(d)
    index.add(x[ref_rows])
    norms = _row_norms(x64)
    # FAISS's error on a squared distance (float32 rounding of the features included; a
    # subnormal's absolute rounding in the last term), then float64's on a mean of squares
    e32 = (_gamma(d + 16, _U32) + 3 * _U32) * (norms + norms[ref_rows].max()) ** 2 * (1 + 1e-6) + 2.0**-100 * d
    shrink = 1 - 2 * _gamma(d + 16, _U64)

    def candidates(rows: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
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
        if kk >= n_ref:
            return kth, np.full(len(rows), np.inf)
        floor = (f[:, -1].astype(np.float64) - e32[rows]) / d * shrink
        return kth, np.where(nn[:, -1] < 0, -np.inf, floor)

    def everywhere(rows: np.ndarray) -> np.ndarray:
        # 4. rows without a certificate: float64 over every reference row
        kth = np.empty(len(rows))
        per = max(1, _BLOCK_ELEMENTS // d)
        for j, i in enumerate(rows):
            best = np.zeros(0)
            for s in range(0, n_ref, per):
                r = ref_rows[s : s + per]
                m = ((x64[r] - x64[i]) ** 2).mean(axis=1)
                m[r == i] = np.inf
                best = _k_smallest(np.concatenate([best, m])[None], k)[0]
            kth[j] = _kth_smallest(best[None], k)[0]
        return kth

    kth = _certified_kth(n, k, k + 1 + CANDIDATE_MARGIN, n_ref, candidates, everywhere)
    # 5. the distance; rounded so that equal distances tie exactly (rank correlations)
    for i in np.flatnonzero(np.isfinite(kth)):
        out[i] = round(float(np.sqrt(kth[i])), ROUND)
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
    numpy.ndarray (Q,), float64; NaN where fewer than k other reference rows exist
    """
    q64 = np.asarray(queries, np.float64).reshape(len(queries), -1)
    q = np.ascontiguousarray(q64, np.float32)
    ref = np.asarray(reference)
    n_q, n_ref = len(q), len(ref)
    rows = np.full(n_q, -1, np.int64) if self_rows is None else np.asarray(self_rows, np.int64)
    out = np.full(n_q, np.nan)
    if n_q == 0 or n_ref == 0 or k < 1:
        return out
    d = q.shape[1]
    if index is None:
        import faiss

        index = faiss.IndexFlatIP(d)
        index.add(np.ascontiguousarray(ref, np.float32))
    exhaustive = _exact_search(index)
    if exhaustive:
        # FAISS's error on a similarity (float32 rounding of both sides included; a subnormal's
        # absolute rounding in the last term), then float64's on 1 − q·r
        qr = _row_norms(q64) * _row_norms(ref).max()
        err = (_gamma(d + 16, _U32) + 3 * _U32) * qr * (1 + 1e-6) + 2.0**-100 * d
        err += _gamma(d + 16, _U64) * qr + 4 * _U64 * (1 + qr)

    def candidates(sub: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        # 1. the kk most similar reference rows in float32 (one may be the query itself)
        sims, nn = index.search(np.ascontiguousarray(q[sub]), kk)
        sims, nn = np.asarray(sims, np.float64), np.asarray(nn, np.int64)
        kth = np.empty(len(sub))
        step = max(1, min(CHUNK, _BLOCK_ELEMENTS // (kk * d)))
        for s in range(0, len(sub), step):
            # 2. exact float64 cosine distance to the candidates; the query's own row and missing
            #    candidates (−1) are set to +inf
            c = nn[s : s + step]
            drop = (c < 0) | (c == rows[sub[s : s + len(c)], None])
            flat = np.where(drop, 0, c).ravel()
            order = np.argsort(flat, kind="stable")  # sorted reads (a memory-mapped index)
            vec = np.empty((len(flat), ref.shape[1]), np.float64)
            vec[order] = np.asarray(ref[flat[order]], np.float64)
            dist = 1.0 - np.einsum("qkd,qd->qk", vec.reshape(*c.shape, -1), q64[sub[s : s + len(c)]])
            dist[drop] = np.inf
            kth[s : s + len(c)] = _kth_smallest(dist, k)
        # 3. certificate: a reference not returned has an exact distance ≥ 1 − s_last − E
        if not exhaustive or kk >= n_ref:
            return kth, np.full(len(sub), np.inf)
        valid = nn >= 0
        s_last = np.where(valid, sims, np.inf).min(axis=1)
        floor = 1.0 - s_last - err[sub]
        return kth, np.where(valid.all(axis=1), floor, -np.inf)

    def everywhere(sub: np.ndarray) -> np.ndarray:
        # 4. rows without a certificate: float64 over every reference row
        best = np.zeros((len(sub), 0))
        qs = q64[sub]
        per = max(1, min(_BLOCK_ELEMENTS // d, _BLOCK_ELEMENTS // len(sub)))
        for s in range(0, n_ref, per):
            r = np.asarray(ref[s : s + per], np.float64)
            dist = 1.0 - qs @ r.T
            dist[rows[sub, None] == np.arange(s, s + len(r))] = np.inf
            best = _k_smallest(np.concatenate([best, dist], axis=1), k)
        return _kth_smallest(best, k)

    kth = _certified_kth(n_q, k, k + 1 + CANDIDATE_MARGIN, n_ref, candidates, everywhere)
    # 5. the k-th; rounded so that equal distances tie exactly (rank correlations)
    return np.where(np.isfinite(kth), np.round(np.maximum(kth, 0.0), ROUND), np.nan)


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
