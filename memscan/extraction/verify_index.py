"""Verification through the training index: never decode the whole training set.

``memscan extract --train T`` compares every candidate with every training image
(:mod:`memscan.extraction.verify`). At web scale (LAION: ~160M images) that is impossible; the
paper verified by retrieval. With ``--index IDX`` each candidate medoid is

1. embedded with the index's own embedder (recorded in ``index.json``),
2. looked up in the index: its top ``retrieve`` (K, default 100) training images,
3. those images alone are decoded from the training source by random access
   (:class:`memscan.index.locations.SourceReader`: a tar member is one seek + one read),
4. compared by exact tiled ℓ2 (:func:`memscan.distances.nearest_tiled_l2`, the same function
   as the full path), which gives the (ℓ, δ)-extraction decision and the k-eidetic count —
   **among the K retrieved**: a count of K means "at least K".

Retrieved images are passed to ``nearest_tiled_l2`` in training-set order (ascending index row),
so ties resolve as in the full path. When the candidates' retrievals overlap (their union is at
most 2·K images) one call covers the union; with a flat index and K ≥ the training-set size that
is the very call of ``--train``, and the tables are equal bit for bit. Otherwise each candidate
gets its own call over its K images (Q·K pairs rather than Q·union).

Memory is bounded by the candidates and K, never the training set: the index is opened
memory-mapped (:meth:`TrainingIndex.load` with ``mmap=True``) once per process, and what travels
to a Ray worker is the small :class:`IndexVerification` record (the worker opens the index
itself, from a file system every node mounts).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from memscan.data.training import list_source
from memscan.distances import nearest_tiled_l2
from memscan.errors import InputError
from memscan.extraction.verify import EXTRACTION_COLUMNS, empty_extractions, extraction_rows
from memscan.index.embedders import load_embedder
from memscan.index.faiss_index import TrainingIndex
from memscan.index.locations import SourceReader

#: Training images retrieved per candidate by default (``--retrieve``).
DEFAULT_RETRIEVE = 100


@dataclass(frozen=True)
class IndexVerification:
    """What verification through an index needs (small: it travels to every worker).

    Parameters
    ----------
    index : the index folder (``memscan index TRAIN --out INDEX``)
    retrieve : K, training images retrieved (and decoded) per candidate
    train : the training source, when not where the index recorded it (None: the index's own)
    device : where a model embedder runs
    """

    index: str
    retrieve: int = DEFAULT_RETRIEVE
    train: str | None = None
    device: str = "cpu"

    def validate(self) -> IndexVerification:
        if isinstance(self.retrieve, bool) or not isinstance(self.retrieve, int) or self.retrieve < 1:
            raise InputError(f"--retrieve must be a positive integer, got {self.retrieve!r}")
        if not Path(self.index).is_dir():
            raise InputError(
                f"training index {self.index} does not exist", "build it with `memscan index TRAIN --out INDEX`"
            )
        return self


@dataclass
class RetrievalStats:
    """What verification through the index read: counts and the retrieved images that failed."""

    candidates: int = 0
    retrieved: int = 0
    decoded: int = 0
    bytes_read: int = 0
    skipped: list[dict] = field(default_factory=list)

    def add(self, other: dict) -> None:
        for k in ("candidates", "retrieved", "decoded", "bytes_read"):
            setattr(self, k, getattr(self, k) + int(other.get(k, 0)))
        self.skipped.extend(other.get("skipped", []))

    def to_dict(self) -> dict:
        return {**asdict(self), "skipped": self.skipped[:100], "skipped_count": len(self.skipped)}


class IndexVerifier:
    """An index opened memory-mapped, its embedder and a random-access reader of its source.

    ``reader``: anything with ``read(rows, size, channels) → (kept, images, skipped)`` and
    ``bytes_read`` (default: :func:`training_reader`; ``bench/verify_index.py`` passes a source
    that renders synthetic training images on the fly).
    """

    def __init__(self, spec: IndexVerification, reader=None):
        self.spec = spec
        self.index = TrainingIndex.load(spec.index, mmap=True)
        self.embedder = load_embedder(self.index.meta.get("embedder", "pixel"), device=spec.device)
        self.reader = reader if reader is not None else training_reader(self.index, spec.train)
        self._rows: dict[str, int] | None = None

    def row_of(self, train_id: str) -> int | None:
        if self._rows is None:
            self._rows = {tid: i for i, tid in enumerate(self.index.ids)}
        return self._rows.get(train_id)

    def describe(self) -> dict:
        """The manifest's ``verification`` record."""
        p = self.index.params
        return {
            "via": "index",
            "index": self.spec.index,
            "index_type": p.index_type,
            "index_params": asdict(p),
            "retrieve": self.spec.retrieve,
            "embedder": self.index.meta.get("embedder"),
            "source": self.spec.train or self.index.meta.get("source"),
            "indexed_images": len(self.index),
            "eidetic_k": f"counted among the {self.spec.retrieve} retrieved training images (a lower bound)",
        }

    def summary(self, shape) -> dict:
        """The manifest's ``training_set`` record (nothing decoded)."""
        m = self.index.meta
        return {
            "source": self.spec.train or m.get("source"),
            "images": len(self.index),
            "skipped": int(m.get("skipped", 0)),
            "skipped_files": m.get("skipped_files", [])[:100],
            "warnings": len(m.get("warnings", [])),
            "warning_files": m.get("warnings", [])[:100],
            "resolution": list(shape),
            "resize_policy": "bicubic",
            "via_index": self.spec.index,
        }


@lru_cache(maxsize=4)
def open_index_verifier(spec: IndexVerification) -> IndexVerifier:
    """The :class:`IndexVerifier` of ``spec``, opened once per process (driver or worker)."""
    return IndexVerifier(spec.validate())


def training_reader(index: TrainingIndex, train: str | None = None) -> SourceReader:
    """Random access to the images of ``index``: through its recorded locations, or by listing
    ``train`` (or the source the index recorded) when it has none or ``train`` is given."""
    if train is None and index.locations is not None:
        paths = index.locations["path"]
        if len(paths) and not Path(str(paths.iloc[0])).exists():
            raise InputError(
                f"the training images the index {index.meta.get('source')!r} was built from are not where it "
                f"recorded them ({paths.iloc[0]} is missing)",
                "pass --train with the training set's current location",
            )
        return SourceReader(index.ids, index.captions, index.locations)
    source = train or index.meta.get("source_resolved") or index.meta.get("source")
    if not source or not Path(source).exists():
        raise InputError(
            f"the index's training source {source!r} does not exist",
            "pass --train with the training set the index was built from",
        )
    reader = SourceReader.from_listing(list_source(source), index.ids, index.captions)
    if not any(reader.paths):
        raise InputError(f"no id of the index is in the training set {source}", "pass the set the index was built from")
    return reader


def verify_candidates_indexed(
    candidates: pd.DataFrame,
    images: np.ndarray,
    verifier: IndexVerifier,
    *,
    delta: float,
    grid: int,
    n_nearest: int,
) -> tuple[pd.DataFrame, dict]:
    """:func:`memscan.extraction.verify.verify_candidates` among each candidate's retrieved images.

    Returns the extraction rows (same columns) and the retrieval counts of
    :class:`RetrievalStats` (``skipped``: retrieved images that could not be read, by id).
    """
    stats = RetrievalStats(candidates=len(candidates))
    if len(candidates) == 0:
        return empty_extractions(), stats.to_dict()
    k = verifier.spec.retrieve
    # 1. embed the medoids with the index's embedder; the top K rows of each
    _, rows = verifier.index.search(verifier.embedder.embed(images), k)
    # 2. decode each retrieved image once, at the candidates' resolution, by random access
    wanted = np.unique(rows[rows >= 0])
    stats.retrieved = int((rows >= 0).sum())
    before = verifier.reader.bytes_read
    kept, decoded, skipped = verifier.reader.read(wanted, size=images.shape[1:3], channels=images.shape[3])
    stats.decoded, stats.bytes_read, stats.skipped = len(kept), verifier.reader.bytes_read - before, skipped
    order = np.argsort(kept, kind="stable")
    kept, decoded = kept[order], decoded[order]
    out = []
    # 3. exact tiled ℓ2 to the readable retrieved images, in training order: one call over the
    #    union when the candidates' retrievals overlap (Q·U pairs ≤ 2·Q·K; with K ≥ N it is the
    #    --train path's very call, so the very same distances), else one call per candidate
    union = len(kept) <= 2 * k
    if union and len(kept):
        dist, idx, _ = nearest_tiled_l2(images, decoded, k=len(kept), grid=grid)
    at = {int(r): i for i, r in enumerate(kept)}
    for c, cand in enumerate(candidates.itertuples(index=False)):
        if union and len(kept):
            mine = np.isin(kept[idx[c]], rows[c])
            d_c, r_c = dist[c][mine], kept[idx[c]][mine]
        else:
            r_all = np.array(sorted({int(r) for r in rows[c] if int(r) in at}), np.int64)
            if not len(r_all):
                continue
            d1, i1, _ = nearest_tiled_l2(
                images[c : c + 1], decoded[[at[int(r)] for r in r_all]], k=len(r_all), grid=grid
            )
            d_c, r_c = d1[0], r_all[i1[0]]
        if not len(r_c):
            continue
        # 4. this candidate's retrieved images, nearest first; the k-eidetic count among them
        within = int((d_c <= delta).sum())
        top = slice(0, min(n_nearest, len(r_c)))
        out.extend(
            extraction_rows(
                cand,
                d_c[top],
                [verifier.index.ids[int(r)] for r in r_c[top]],
                [verifier.index.captions[int(r)] for r in r_c[top]],
                within,
                delta,
            )
        )
    table = pd.DataFrame(out, columns=EXTRACTION_COLUMNS) if out else empty_extractions()
    return table, stats.to_dict()
