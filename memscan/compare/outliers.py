"""Memorization or outliers? A model-free outlier score beside each example's memorization score.

A fair criticism of the memorization score (van den Burg & Williams 2021) and of membership
scores is that they may flag atypical examples rather than copies. For every scored example we
compute the **k-NN distance** (Ramaswamy, Rastogi & Shim, "Efficient algorithms for mining
outliers from large data sets", SIGMOD 2000): the distance to its k-th nearest *training*
example, itself excluded (k = 5 by default, the value of that paper's experiments' small-k
regime; an example with at least k exact copies in the training set has distance 0, so it is
never an outlier — one with fewer copies can still be). Spaces:

- images / arrays: the normalised ℓ2 of DESIGN.md, ``sqrt(mean((a − b)²))`` over pixels in
  [0, 1] (exact search with a FAISS flat index);
- text: cosine distance ``1 − cos`` between TF-IDF vectors (scikit-learn);
- a training index (``memscan index``): cosine distance ``1 − cos`` between the index's own
  L2-normalised embeddings (:func:`index_knn_distance`): the reference is every indexed training
  image, an example found in the index by its id is represented by its stored vector and
  excluded from its own neighbours, any other example is embedded with the index's embedder.

Then Spearman's rank correlation between the outlier score and the memorization score
(scipy), and the examples where the two rankings disagree most: high memorization but typical,
and outlying but not memorized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

#: Extra float32 candidates re-ranked in float64 (so near-ties at the k-th place are exact).
CANDIDATE_MARGIN = 8
#: Decimals the distances are rounded to (equal distances must tie in rank statistics).
ROUND = 12
#: Queries re-ranked per block in :func:`embedding_knn_distance`.
CHUNK = 2048
#: Neighbours for the k-NN distance (Ramaswamy et al. 2000 use the k-th neighbour's distance).
DEFAULT_K = 5


def knn_distance(features: np.ndarray, reference: np.ndarray | None = None, k: int = DEFAULT_K) -> np.ndarray:
    """Normalised ℓ2 distance from each row of ``features`` to its k-th nearest reference row,
    the row itself excluded.

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

    x = np.ascontiguousarray(np.asarray(features, np.float32).reshape(len(features), -1))
    n, d = x.shape
    ref = np.ones(n, bool) if reference is None else np.asarray(reference, bool)
    ref_rows = np.flatnonzero(ref)
    out = np.full(n, np.nan)
    if len(ref_rows) == 0 or k < 1:
        return out
    # 1. candidates: the k + 1 + margin nearest reference rows in float32 (one may be the row itself)
    index = faiss.IndexFlatL2(d)
    index.add(x[ref_rows])
    kk = min(k + 1 + CANDIDATE_MARGIN, len(ref_rows))
    _, nn = index.search(x, kk)
    x64 = np.asarray(features, np.float64).reshape(n, -1)
    for i in range(n):
        # 2. exact float64 normalised ℓ2 to the candidates, the row itself dropped
        hits = ref_rows[nn[i][nn[i] >= 0]]
        hits = hits[hits != i]
        dist = np.sort(np.sqrt(((x64[hits] - x64[i]) ** 2).mean(axis=1)))
        if len(dist) < k:
            continue
        # 3. the k-th; rounded so that equal distances tie exactly (rank correlations)
        out[i] = round(float(dist[k - 1]), ROUND)
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


def embedding_knn_distance(
    queries: np.ndarray, reference: np.ndarray, self_rows: np.ndarray | None = None, k: int = DEFAULT_K, index=None
) -> np.ndarray:
    """Cosine distance ``1 − u·v`` from each L2-normalised query vector to its k-th nearest
    reference vector, the query's own reference row excluded.

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
    q = np.ascontiguousarray(np.asarray(queries, np.float32).reshape(len(queries), -1))
    ref = np.asarray(reference)
    n_q, n_ref = len(q), len(ref)
    rows = np.full(n_q, -1, np.int64) if self_rows is None else np.asarray(self_rows, np.int64)
    out = np.full(n_q, np.nan)
    if n_q == 0 or n_ref == 0 or k < 1:
        return out
    # 1. candidates: the k + 1 + margin most similar reference rows (one may be the query itself)
    kk = min(k + 1 + CANDIDATE_MARGIN, n_ref)
    if index is None:
        import faiss

        index = faiss.IndexFlatIP(q.shape[1])
        index.add(np.ascontiguousarray(ref, np.float32))
    _, nn = index.search(q, kk)
    nn = np.asarray(nn, np.int64)
    for s in range(0, n_q, CHUNK):
        # 2. exact float64 cosine distance to the candidates; the query's own row and missing
        #    candidates (−1) are set to +inf
        c = nn[s : s + CHUNK]
        drop = (c < 0) | (c == rows[s : s + CHUNK, None])
        flat = np.where(drop, 0, c).ravel()
        order = np.argsort(flat, kind="stable")  # sorted reads (a memory-mapped index)
        vec = np.empty((len(flat), ref.shape[1]), np.float64)
        vec[order] = np.asarray(ref[flat[order]], np.float64)
        d = 1.0 - np.einsum("qkd,qd->qk", vec.reshape(*c.shape, -1), q[s : s + CHUNK].astype(np.float64))
        d[drop] = np.inf
        # 3. the k-th; rounded so that equal distances tie exactly (rank correlations)
        kth = np.sort(d, axis=1)[:, k - 1] if d.shape[1] >= k else np.full(len(d), np.inf)
        out[s : s + CHUNK] = np.where(np.isfinite(kth), np.round(np.maximum(kth, 0.0), ROUND), np.nan)
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
