"""Memorization vs outliers for one finished run: every example the run scored (memscore, MIA,
inpainting, lm-mia) with its k-NN outlier score (:mod:`memscan.compare.outliers`).

Used by ``memscan compare`` (one table for every compared run) and by
``memscan report RUN --outliers`` / ``memscan mia|inpaint|memscore … --outliers``, which record
the analysis in the run itself::

    RUN/
      outliers.parquet   id, caption, score, outlier, score_rank, outlier_rank, disagreement,
                         thumbnail (the shown examples' run-relative picture, else "")
      outliers.json      k, space, reference, index, score (what ``score`` is), n, spearman, p_value
      images/outliers/   thumbnails of the examples where the two rankings disagree most

so that the run's report (:mod:`memscan.report.mia`) shows them from its tables alone.

The space:

- with a training index (``index``: a ``memscan index`` folder): cosine distance between the
  index's own embeddings, to every indexed training image, the example itself excluded
  (:func:`~memscan.compare.outliers.index_knn_distance`);
- else images / arrays: normalised ℓ2 on pixels in [0, 1], to the run's *member* examples (the
  training examples the run knows), the example itself excluded;
- texts (lm-mia): TF-IDF cosine distance, to the member texts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from memscan.compare.outliers import (
    DEFAULT_K,
    OutlierAnalysis,
    analyse,
    index_knn_distance,
    knn_distance,
    text_knn_distance,
)
from memscan.errors import InputError
from memscan.store import RunStore, atomic_write_json, safe_name, write_table

#: Examples shown at each end of the disagreement (memorized but typical; outlying, not memorized).
SHOWN = 5
#: Run kinds whose examples carry a per-example score.
SCORED_KINDS = ("mia", "inpaint", "demo-mia", "memscore", "lm-mia")
COLUMNS = {"id": str, "caption": str, "score": float, "outlier": float}
COLUMNS |= {"score_rank": float, "outlier_rank": float, "disagreement": float, "thumbnail": str}


@dataclass
class RunOutliers:
    """The outlier analysis of one run.

    Attributes
    ----------
    table : one row per scored example (columns of ``outliers.parquet``)
    analysis : Spearman's ρ, its p-value and the ranks (:class:`OutlierAnalysis`)
    meta : what ``outliers.json`` records (k, space, reference, index, score, n, spearman, p_value)
    """

    table: pd.DataFrame
    analysis: OutlierAnalysis | None
    meta: dict


def empty_table() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=t) for c, t in COLUMNS.items()})


def features(root: Path, s) -> tuple[np.ndarray | None, list[str] | None, list[str]]:
    """The examples' pixels in [0, 1] (N×H×W×C, or N×D for arrays), or their texts; and their
    captions ("" where none), in the order of ``s.scores``."""
    from memscan.compare.runs import read_manifest

    m = read_manifest(root)
    kind = m.get("kind")
    ids = s.scores["id"].astype(str).tolist()
    captions = [""] * len(ids)
    if (root / "examples.parquet").exists():
        ex = pd.read_parquet(root / "examples.parquet").sort_values("index")
        if "caption" in ex and "id" in ex:
            cap = dict(zip(ex["id"].astype(str), ex["caption"].fillna("").astype(str)))
            captions = [cap.get(i, "") for i in ids]
        if kind == "lm-mia":  # the text is what the page shows
            texts = ex["text"].astype(str).tolist()  # in the order of s.scores (by index)
            return None, texts, texts
    data = (m.get("sources") or {}).get("data")
    if not data or not Path(data).exists():
        return None, None, captions
    if kind == "memscore":
        from memscan.mia.memscore_run import load_array_data

        arr, _, imgs = load_array_data(data)
        if imgs is not None:
            x = imgs.astype(np.float32) / 255.0
            return (x if x.ndim == 4 else x[..., None]), None, captions
        return np.asarray(arr, np.float64).reshape(len(arr), -1), None, captions
    from memscan.data.training import load_training_set

    ts = load_training_set(data)
    pos = {i: n for n, i in enumerate(ts.ids)}
    if not all(i in pos for i in ids):
        return None, None, captions
    if not any(captions):
        captions = [ts.captions[pos[i]] for i in ids]
    return ts.images[[pos[i] for i in ids]].astype(np.float32) / 255.0, None, captions


def load_index(index):
    """A :class:`~memscan.index.faiss_index.TrainingIndex` from a folder (or one as is)."""
    if index is None or hasattr(index, "embeddings"):
        return index
    from memscan.index.faiss_index import TrainingIndex

    if not Path(index).exists():
        raise InputError(f"--index {index} does not exist", "build one with `memscan index TRAIN --out INDEX`")
    return TrainingIndex.load(index)


def score_outliers(
    run: str | Path, s, k: int = DEFAULT_K, index=None, thumbs: RunStore | None = None, prefix: str = ""
) -> RunOutliers:
    """The outlier analysis of run ``run`` read into ``s`` (:func:`memscan.compare.runs.summarize_run`).

    Parameters
    ----------
    run : the run directory
    s : its :class:`~memscan.compare.runs.RunSummary` (``s.scores``: id, score, is_member)
    k : the neighbour of the k-NN distance
    index : a ``memscan index`` folder or loaded index: the embedding space and the reference set
        (every indexed training image); None: pixel space (or TF-IDF) against the run's members
    thumbs : where the thumbnails of the most disagreeing examples go (``images/outliers/``)
    prefix : thumbnail name prefix (``memscan compare``: one folder per run)
    """
    root = Path(run)
    meta = {"k": int(k), "space": None, "reference": None, "index": None, "n": 0}
    meta |= {"spearman": None, "p_value": None, "score": _score_name(s)}
    if not len(s.scores):
        return RunOutliers(empty_table(), None, meta)
    feats, texts, captions = features(root, s)
    ids = s.scores["id"].astype(str).tolist()
    ref = s.scores["is_member"].to_numpy(bool)
    idx = load_index(index)
    if idx is not None:
        if texts is not None or (feats is not None and feats.ndim != 4):
            raise InputError(
                f"run {run}: its examples are not images, so a training index cannot embed them",
                "drop --index (texts use TF-IDF, arrays their values)",
            )
        outlier = index_knn_distance(idx, ids, _at_embedder_size(root, idx, ids, feats), k)
        spec = idx.meta.get("embedder", "pixel")
        meta |= {"space": f"index embedding {_spec_text(spec)}, cosine distance"}
        meta |= {
            "reference": f"the {len(idx)} training images of the index",
            "index": str(index) if isinstance(index, (str, Path)) else None,
        }
    elif texts is not None:
        outlier = text_knn_distance(texts, ref, k)
        meta |= {"space": "TF-IDF, cosine distance", "reference": "the run's member texts"}
    elif feats is not None:
        outlier = knn_distance(feats, ref, k)
        meta |= {"space": "pixels in [0, 1], normalised l2", "reference": "the run's member examples"}
    else:
        return RunOutliers(empty_table(), None, meta)
    a = analyse(ids, s.scores["score"].to_numpy(float), outlier)
    t = a.table.copy()
    t.insert(1, "caption", captions)
    t["thumbnail"] = ""
    if thumbs is not None and feats is not None and feats.ndim == 4:
        from memscan.mia.run_dir import save_thumb

        hi, lo = a.most_disagreeing(SHOWN)
        pos = {i: n for n, i in enumerate(ids)}
        for i in list(hi["id"]) + list(lo["id"]):
            rel = save_thumb(thumbs, "outliers", f"{prefix}{i}", feats[pos[i]])
            t.loc[t["id"] == i, "thumbnail"] = rel
    meta |= {"n": a.n, "spearman": _num(a.spearman), "p_value": _num(a.p_value)}
    return RunOutliers(t, a, meta)


def write_run_outliers(run: str | Path, k: int = DEFAULT_K, index=None) -> RunOutliers:
    """Score a finished memscore / MIA run's examples for outlyingness and record the analysis
    in the run (``outliers.parquet``, ``outliers.json``, ``images/outliers/``; replaced when
    recomputed) for its report.

    Parameters
    ----------
    run : a finished run of a kind in :data:`SCORED_KINDS`
    k : the neighbour of the k-NN distance (≥ 1)
    index : a ``memscan index`` folder: score in its embedding space against its training
        images (see the module)
    """
    from memscan.compare.runs import read_manifest, summarize_run

    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"--k {k!r} must be a positive integer", "e.g. --k 5")
    m = read_manifest(run)
    kind = m.get("kind") or m.get("command")
    if kind not in SCORED_KINDS:
        raise InputError(
            f"run {run} is of kind {kind!r}, whose examples carry no memorization or membership score",
            f"outliers are scored for runs of kinds {', '.join(SCORED_KINDS)}",
        )
    index_path = None if index is None or not isinstance(index, (str, Path)) else str(Path(index).resolve())
    index = load_index(index)  # a bad index is refused before anything in the run changes
    store = RunStore(run)
    old = store.root / "images" / "outliers"
    if old.is_dir():
        for f in old.glob("*.png"):
            f.unlink()
    res = score_outliers(run, summarize_run(run), k, index, thumbs=store)
    if res.analysis is None:
        raise InputError(
            f"run {run}: its examples cannot be read back (its --data {(m.get('sources') or {}).get('data')!r} "
            "is missing or holds other examples)",
            "restore the examples at that path",
        )
    res.meta["made"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    if index_path is not None:
        res.meta["index"] = index_path
    write_table(res.table, store.root / "outliers.parquet")
    atomic_write_json(store.root / "outliers.json", res.meta)
    return res


def _at_embedder_size(root: Path, idx, ids: list[str], feats: np.ndarray):
    """``rows -> images`` of the examples not in the index, decoded from the run's data source
    the way ``memscan index`` decodes (straight to the embedder's input size), so that an
    outside example and an indexed copy of it get the same vector; arrays (``.npy``) as they are."""
    from memscan.compare.runs import read_manifest
    from memscan.index.embedders import load_embedder

    size = getattr(load_embedder(idx.meta.get("embedder", "pixel")), "input_size", None)
    data = (read_manifest(root).get("sources") or {}).get("data")

    def images(rows: np.ndarray) -> np.ndarray:
        if size is None or Path(data).suffix.lower() == ".npy":
            return feats[rows]
        from memscan.data.training import load_training_set

        ts = load_training_set(data, size=tuple(size))
        pos = {i: n for n, i in enumerate(ts.ids)}
        return ts.images[[pos[ids[r]] for r in rows]]

    return images


def _score_name(s) -> str:
    r = s.row
    if r.get("kind") == "memscore":
        return "memorization score M (memscore)"
    if r.get("statistic"):
        t = "" if r.get("timestep") is None else f" at t = {r['timestep']}"
        return f"membership score of {r['statistic']} / {r['attack']}{t} (the best attack)"
    return "score"


def _spec_text(spec) -> str:
    if isinstance(spec, dict):
        return ", ".join(f"{k}={v}" for k, v in spec.items() if k not in ("sha256",))
    return str(spec)


def _num(x) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def thumb_prefix(run: str | Path) -> str:
    """``memscan compare``'s per-run thumbnail folder."""
    return f"{safe_name(str(run))}/"
