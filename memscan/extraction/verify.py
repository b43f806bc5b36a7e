"""Verification stage: candidates vs the training set.

For each candidate (a clique medoid), the ``n_nearest`` training images by exact tiled ℓ2, the
(ℓ, δ)-extraction decision — extracted when ``tiled_l2(x̂, x) ≤ δ`` (Carlini et al. 2023, Def. 1;
paper δ = 0.15) — and the k-eidetic count of the extracted training image: the number of
training images within δ of x, the nearest training image, itself included (Def. 2: x is
k-eidetic memorized when it is extractable and at most k training images lie within δ of it;
the count is centred on x, not on the generation x̂). 0 when nothing is extracted. The count
costs one more exact pass over the training set, for the distinct extracted images only.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from memscan.data.training import TrainingSet
from memscan.distances import nearest_tiled_l2

#: What the extraction table's numbers mean, recorded in the manifest of every run that verifies
#: (``definitions``) and part of its identity: a run started under other definitions is not
#: resumed into a table that would mix them.
DEFINITIONS = {
    "extracted": "tiled_l2(candidate, training image) <= delta (Carlini et al. 2023, Def. 1)",
    "eidetic_k": "training images within delta of the extracted training image x, x included "
    "(Carlini et al. 2023, Def. 2); 0 when nothing is within delta",
}

EXTRACTION_COLUMNS = [
    "prompt_id",
    "rank",
    "train_id",
    "train_caption",
    "tiled_l2",
    "extracted",
    "eidetic_k",
    "expected_train_id",
    "matches_expected",
    "clique_size",
    "mean_clique_distance",
    "delta",
]


def verify_candidates(
    candidates: pd.DataFrame,
    images: np.ndarray,
    training: TrainingSet,
    *,
    delta: float,
    grid: int,
    n_nearest: int,
) -> pd.DataFrame:
    """One row per (candidate, nearest training image), nearest first.

    ``candidates`` has ``prompt_id``, ``train_id`` (expected, may be None), ``clique_size``,
    ``mean_clique_distance``; ``images`` holds the candidate medoids in the same order.
    """
    if len(candidates) == 0:
        return empty_extractions()
    if images.shape[1:] != training.images.shape[1:]:
        raise ValueError(f"candidates are {images.shape[1:]} but training images are {training.images.shape[1:]}")
    # 1. each candidate's nearest training images (pairs near δ recomputed exactly: the
    #    decisions are those of the exact distances rounded once to float32 on every device)
    near = refine_near(delta)
    dist, idx, _ = nearest_tiled_l2(images, training.images, k=n_nearest, grid=grid, exact_near=near)
    expected_first(candidates, images, training, dist, idx, grid, near)
    # 2. the k-eidetic count of each extracted training image x (the nearest, within δ): the
    #    training images within δ of x itself, one pass over the training set for the distinct x
    extracted = dist[:, 0] <= delta_float32(delta)
    xs = np.unique(idx[extracted, 0])
    counts = np.zeros(len(candidates), np.int64)
    if len(xs):
        _, _, within = nearest_tiled_l2(
            training.images[xs], training.images, k=1, grid=grid, within=delta, exact_near=near
        )
        counts[extracted] = within[np.searchsorted(xs, idx[extracted, 0])]
    rows = []
    for c, cand in enumerate(candidates.itertuples(index=False)):
        tids = [training.ids[int(i)] for i in idx[c]]
        caps = [training.captions[int(i)] for i in idx[c]]
        rows.extend(extraction_rows(cand, dist[c], tids, caps, int(counts[c]), delta))
    return pd.DataFrame(rows, columns=EXTRACTION_COLUMNS)


def expected_first(candidates, images, training, dist, idx, grid: int, near) -> None:
    """In place: a candidate whose expected training image (``train_id``) lies at exactly its
    nearest distance gets that image at rank 1. Exact copies of a training image tie with it, and
    :func:`nearest_tiled_l2` resolves ties to the lowest training row, so a perfect copy of the
    prompt's own image was reported as not matching it (``matches_expected`` False) whenever a
    copy sat at a lower row, even one beyond the ``n_nearest`` listed. The distance of an
    unlisted expected image is computed as the search computes it (the same exact values)."""
    if "train_id" not in candidates.columns:
        return
    row_of = None
    for c, e in enumerate(candidates["train_id"].tolist()):
        if not isinstance(e, str) or training.ids[int(idx[c, 0])] == e:
            continue
        if row_of is None:
            row_of = {t: j for j, t in enumerate(training.ids)}
        j = row_of.get(e)
        if j is None:
            continue
        hit = np.flatnonzero(idx[c] == j)
        if hit.size:
            r, d = int(hit[0]), dist[c, hit[0]]
        else:
            r = idx.shape[1] - 1  # listed now; the last row makes way
            d = nearest_tiled_l2(images[c : c + 1], training.images[j : j + 1], k=1, grid=grid, exact_near=near)[0][
                0, 0
            ]
        if d == dist[c, 0]:
            idx[c, 1 : r + 1], dist[c, 1 : r + 1] = idx[c, :r].copy(), dist[c, :r].copy()
            idx[c, 0], dist[c, 0] = j, d


def delta_float32(delta: float) -> np.float32:
    """δ as every ``d ≤ δ`` decision compares it: in float32, the precision of the distances (the
    exact distance rounded once to float32), so a distance equal to δ — the paper's ≤ — is
    extracted whatever δ's type. A float64 δ such as ``np.float64(0.15)`` used to be compared in
    float64 and missed the tie that a Python ``0.15`` (compared in float32) caught.

    >>> d = np.float32(0.15)   # a distance of exactly 0.15, rounded once to float32
    >>> bool(d <= delta_float32(np.float64(0.15))), bool(d <= np.float64(0.15))
    (True, False)
    """
    return np.float32(delta)


def refine_near(delta: float) -> float | None:
    """δ as the ``exact_near`` of the distance functions: the pairs within float32 rounding of
    it are recomputed exactly. None for δ = 0 (pairs near 0 are recomputed exactly anyway)."""
    return float(delta) if delta > 0 else None


def extraction_rows(cand, dist, tids, captions, within: int, delta: float) -> list[dict]:
    """The rows of one candidate: its nearest training images (``tids``, ``captions``) at
    distances ``dist``, ascending; ``within`` is the k-eidetic count of its extracted training
    image (0 when nothing is within δ)."""
    expected = getattr(cand, "train_id", None)
    if expected is not None and pd.isna(expected):  # a prompt table row without one (NaN, None, pd.NA)
        expected = None
    rows = []
    for r in range(len(dist)):
        tid = tids[r]
        rows.append(
            {
                "prompt_id": cand.prompt_id,
                "rank": r + 1,
                "train_id": tid,
                "train_caption": captions[r],
                "tiled_l2": float(dist[r]),
                "extracted": bool(dist[r] <= delta_float32(delta)),
                "eidetic_k": int(within),
                "expected_train_id": expected,
                "matches_expected": None if expected is None else bool(expected == tid),
                "clique_size": int(cand.clique_size),
                "mean_clique_distance": float(cand.mean_clique_distance),
                "delta": float(delta),
            }
        )
    return rows


def empty_extractions() -> pd.DataFrame:
    """The extractions table with no rows (typed columns)."""
    return pd.DataFrame({c: pd.Series(dtype=_dtype(c)) for c in EXTRACTION_COLUMNS})


def _dtype(col: str) -> str:
    return {
        "rank": "int64",
        "tiled_l2": "float64",
        "extracted": "bool",
        "eidetic_k": "int64",
        "clique_size": "int64",
        "mean_clique_distance": "float64",
        "delta": "float64",
    }.get(col, "object")


def extraction_counts(det: pd.DataFrame, ext: pd.DataFrame, min_clique: int) -> dict:
    """The manifest's ``counts``. ``undecided``: prompts not detected whose clique search stopped
    at its budget (``clique_method == "bounded"``) with a proven upper bound still ≥
    ``min_clique`` — a larger search (``ExtractConfig.max_expansions``) could detect them.
    ``extractions`` counts prompts; ``extracted_images`` the distinct training images they
    extracted (the paper's unit: two prompts that extract one image count it once)."""
    top = ext[ext["rank"] == 1] if len(ext) else ext
    undecided = (
        (~det["detected"].astype(bool))
        & (det["clique_method"] == "bounded")
        & (det["clique_upper_bound"] >= min_clique)
        if len(det)
        else pd.Series([], dtype=bool)
    )
    return {
        "prompts": int(len(det)),
        "samples": int(det["n_samples"].sum()) if len(det) else 0,
        "detections": int(det["detected"].sum()) if len(det) else 0,
        "undecided": int(undecided.sum()),
        "extractions": int(top["extracted"].sum()) if len(top) else 0,
        "extracted_images": int(top.loc[top["extracted"].astype(bool), "train_id"].nunique()) if len(top) else 0,
    }
