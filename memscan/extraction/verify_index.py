"""Verification through the training index: never decode the whole training set.

``memscan extract --train T`` compares every candidate with every training image
(:mod:`memscan.extraction.verify`). At web scale (LAION: ~160M images) that is impossible; the
paper verified by retrieval. With ``--index IDX`` each candidate medoid is

1. embedded with the index's own embedder (recorded in ``index.json``),
2. looked up in the index: its top ``retrieve`` (K, default 100) training images,
3. those images alone are decoded from the training source by random access
   (:class:`memscan.index.locations.SourceReader`: a tar member is one seek + one read),
4. compared by exact tiled ℓ2 (:func:`memscan.distances.nearest_tiled_l2`, the same function
   as the full path), which gives the (ℓ, δ)-extraction decision; then the k-eidetic count of
   the extracted training image x — its retrieved images within δ of x
   (:func:`memscan.distances.cross_tiled_l2`) — **among the candidate's retrieved images**: a
   count equal to the number retrieved (the ``retrieved`` column) means "at least that many".
   An IVF index can return fewer than K (its ``nprobe`` cells hold fewer): ``retrieved`` says
   how many, and the manifest's ``retrieval.fewer_than_k`` how many candidates got fewer.
   (Both paths pass δ as ``exact_near``: a pair whose distance could fall on either side of δ
   is recomputed exactly — with int8 products every distance is exact already — so these counts
   equal the full path's on the float32 fallback too.)

Retrieved images are passed to ``nearest_tiled_l2`` in training-set order (ascending index row),
so ties resolve as in the full path. When the candidates' retrievals overlap (their union is at
most 2·K images) one call covers the union; with a flat index and K ≥ the training-set size that
is the very call of ``--train``, and the tables are equal bit for bit. Otherwise the candidates
are re-ranked :data:`RERANK_GROUP` (8) at a time, one :func:`memscan.distances.cross_tiled_l2`
call over the union of their retrievals (a call's fixed cost, ~1.5 ms, is shared; its product,
8 × 8·K pairs, stays cheap); each candidate keeps the distances to its own K and sorts them
stably in training order (ties: the lower row, as ``nearest_tiled_l2``).

The whole search for a batch is one FAISS call, each distinct retrieved image is read once, and
a batch of a shard's few candidates runs single-threaded (:func:`verification_threads`: on a
busy machine a two-thread barrier costs more than the work). Many candidates at once
(``memscan verify RUN``) are verified in chunks of at most :data:`VERIFY_CHUNK` candidates and
:data:`VERIFY_CHUNK_BYTES` of retrieved images. ``bench/verify_index.py`` times each part.

Memory is bounded by the chunk and K, never the training set: the index is opened
memory-mapped (:meth:`TrainingIndex.load` with ``mmap=True``) once per process, and what travels
to a Ray worker is the small :class:`IndexVerification` record (the worker opens the index
itself, from a file system every node mounts).
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from memscan.distances import cross_tiled_l2, nearest_tiled_l2
from memscan.errors import InputError
from memscan.extraction.verify import (
    EXTRACTION_COLUMNS,
    delta_float32,
    empty_extractions,
    extraction_rows,
    refine_near,
)
from memscan.index.embedders import load_embedder
from memscan.index.faiss_index import TrainingIndex
from memscan.index.locations import training_reader

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
    #: the index's parts served by Ray actors (:class:`memscan.runners.ray_runner.RayIndexParts`,
    #: from :func:`memscan.index.faiss_index.serve_index_on_ray`): every process that opens this
    #: record searches through them instead of opening the parts. Not part of the record's identity
    #: (equality, hash), but :func:`open_index_verifier` keys its cache by it.
    served: object = field(default=None, compare=False, repr=False)

    def validate(self) -> IndexVerification:
        if isinstance(self.retrieve, bool) or not isinstance(self.retrieve, int) or self.retrieve < 1:
            raise InputError(f"--retrieve must be a positive integer, got {self.retrieve!r}")
        if not Path(self.index).is_dir():
            raise InputError(
                f"training index {self.index} does not exist", "build it with `memscan index TRAIN --out INDEX`"
            )
        return self


#: A manifest names at most this many skipped images and unverified prompts (the counts are
#: complete; shard records and ``run.log`` name every one).
LISTED = 100

#: Columns of an extractions table verified through an index: the ``--train`` path's, then
#: ``retrieved`` — the training images the index returned for the row's candidate (K, or fewer:
#: fewer indexed images, or an IVF search whose ``nprobe`` cells held fewer); its ``eidetic_k``
#: is counted among them.
INDEXED_EXTRACTION_COLUMNS = [*EXTRACTION_COLUMNS, "retrieved"]


def empty_indexed_extractions() -> pd.DataFrame:
    """The extractions table of :data:`INDEXED_EXTRACTION_COLUMNS` with no rows (typed)."""
    return empty_extractions().assign(retrieved=pd.Series(dtype="int64"))


#: The counts of a retrieval record (summed over shards).
COUNTS = ("candidates", "retrieved", "decoded", "bytes_read", "fewer_than_k")


@dataclass
class RetrievalStats:
    """What verification through the index read: counts, the retrieved images that failed
    (``skipped``) and the prompts whose candidate could not be verified because none of its
    retrieved images was readable (``unverified``)."""

    candidates: int = 0
    retrieved: int = 0
    decoded: int = 0
    bytes_read: int = 0
    #: candidates for which the index returned fewer than K (and fewer than it holds); None where
    #: not counted (left out of the record rather than recorded as 0)
    fewer_than_k: int | None = None
    skipped: list[dict] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)
    #: how many more were counted than listed (records already cut to ``LISTED``)
    unlisted: dict = field(default_factory=lambda: {"skipped": 0, "unverified": 0})

    def add(self, other: dict) -> None:
        """Add a record of :meth:`to_dict` (a shard's, or an older one without some fields)."""
        for k in COUNTS:
            if k == "fewer_than_k" and other.get(k) is None:
                continue
            setattr(self, k, (getattr(self, k) or 0) + int(other.get(k, 0)))
        for k in ("skipped", "unverified"):
            listed = other.get(k, [])
            getattr(self, k).extend(listed)
            self.unlisted[k] += int(other.get(f"{k}_count", len(listed))) - len(listed)

    def to_dict(self, limit: int | None = LISTED) -> dict:
        """The record: counts, and the lists cut to ``limit`` (None: complete, for shard records)."""
        out = {k: getattr(self, k) for k in COUNTS if getattr(self, k) is not None}
        for k in ("skipped", "unverified"):
            items = getattr(self, k)
            out[k] = list(items if limit is None else items[:limit])
            out[f"{k}_count"] = len(items) + self.unlisted[k]
        return out

    def log(self, log) -> None:
        """Name every listed skip and unverified candidate through ``log`` (a run's ``store.log``)."""
        if self.fewer_than_k:
            log(
                f"{self.fewer_than_k} of {self.candidates} candidates got fewer training images from the index "
                "than --retrieve asked (an IVF search's nprobe cells held fewer): their k-eidetic counts are "
                "counted among the images retrieved (the extractions' `retrieved` column)"
            )
        for sk in self.skipped:
            log(f"skipped retrieved training image {sk['id']} ({sk['path']}): {sk['reason']}")
        for prompt in self.unverified:
            log(
                f"candidate of prompt {prompt} not verified: none of its retrieved training images could be read "
                "(or the index returned none)"
            )
        for k, n in self.unlisted.items():
            if n:
                log(f"{n} more {k} not named (older shard records list at most {LISTED})")


class IndexVerifier:
    """An index opened memory-mapped, its embedder and a random-access reader of its source.

    ``reader``: anything with ``read(rows, size, channels) → (kept, images, skipped)`` and
    ``bytes_read`` (default: :func:`training_reader`; ``bench/verify_index.py`` passes a source
    that renders synthetic training images on the fly). ``index``: the index already opened
    (default: ``spec.index`` memory-mapped) — e.g. one whose parts are served by Ray actors
    (:func:`memscan.index.faiss_index.serve_index_on_ray`).
    """

    def __init__(self, spec: IndexVerification, reader=None, index: TrainingIndex | None = None):
        self.spec = spec
        if index is None and spec.served is not None:  # ids and locations here, the parts in the actors
            index = TrainingIndex.load(spec.index, mmap=True, open_parts=False)
            index.index = spec.served
        self.index = index if index is not None else TrainingIndex.load(spec.index, mmap=True)
        self.embedder = load_embedder(self.index.meta.get("embedder", "pixel"), device=spec.device)
        self.reader = reader if reader is not None else training_reader(self.index, spec.train)
        self._rows: dict[str, int] | None = None

    def row_of(self, train_id: str) -> int | None:
        """The index row of ``train_id`` (None if absent): a binary search over the loaded
        index's Arrow ids (a sort order of 4 bytes a row, built on first use), or a dict over the
        ids of an index built in memory."""
        find = getattr(self.index.ids, "find", None)
        if find is not None:
            return find(str(train_id))
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
            "eidetic_k": (
                f"counted among each candidate's retrieved training images — at most {self.spec.retrieve}, "
                "fewer where the index returned fewer (the extractions' `retrieved` column; "
                "retrieval.fewer_than_k counts those candidates) — a lower bound"
            ),
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
            # the indexed training set's content hash (``memscan index`` records it; None for
            # an index saved by the library without a build run): ``memscan compare`` checks it
            "training_set_sha256": index_training_set_sha256(self.spec.index),
        }


def index_training_set_sha256(index: str | Path) -> str | None:
    """The ``training_set_sha256`` of the training set an index was built from (its build
    run's ``manifest.json``, :func:`memscan.data.training.training_set_sha256` of the listing),
    or None where the folder has no readable build manifest."""
    try:
        m = json.loads((Path(index) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    v = m.get("training_set_sha256") if isinstance(m, dict) and m.get("kind") == "index" else None
    return v if isinstance(v, str) else None


#: Index verifiers kept open per process (the most recently used).
VERIFIER_CACHE = 4
_verifiers: OrderedDict = OrderedDict()
_verifiers_lock = threading.Lock()


def open_index_verifier(spec: IndexVerification) -> IndexVerifier:
    """The :class:`IndexVerifier` of ``spec``, opened once per process (driver or worker) for as
    long as the index folder holds the same build.

    The cache key is the record, the identity of the build on disk (``index.json``'s inode,
    size and modification time: a rebuild in place, ``memscan index --overwrite``, writes a new
    ``index.json`` by rename, so the next call opens the new index) and the parts serving it
    (``spec.served``: its ``key`` — the Ray actors' ids, the same in every process — or, for
    another object, the object itself), so a record with served parts never gets back a
    verifier that opened the parts locally, nor the other way round.
    """
    served = spec.served
    key = (spec, _build_identity(spec.index), None if served is None else getattr(served, "key", None) or id(served))
    with _verifiers_lock:
        verifier = _verifiers.get(key)
        if verifier is not None:
            _verifiers.move_to_end(key)
            return verifier
    verifier = IndexVerifier(spec.validate())
    with _verifiers_lock:
        for old in [k for k in _verifiers if k[0] == spec and k[2] == key[2] and k[1] != key[1]]:
            del _verifiers[old]  # an earlier build of the folder: let its memory maps go
        _verifiers[key] = verifier  # holds ``served`` alive: an id() in a key is never reused
        while len(_verifiers) > VERIFIER_CACHE:
            _verifiers.popitem(last=False)
    return verifier


def _build_identity(index: str) -> tuple | None:
    """Which build the index folder holds now (``index.json`` is replaced by rename at each build)."""
    try:
        st = os.stat(Path(index) / "index.json")
    except OSError:
        return None  # opening it names what is wrong
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


#: Candidates re-ranked together: one exact tiled-ℓ2 call over the union of their retrieved
#: images (a call has a fixed cost of ~1.5 ms; its product grows with candidates × union:
#: measured per candidate at K = 100, 64×64: 1.94 ms CPU alone, 1.06 at 4, 1.10 at 8, 1.31 at 16).
RERANK_GROUP = 8

#: Below this many candidates a verification call runs single-threaded (see
#: :func:`verification_threads`).
SINGLE_THREAD_BELOW = 64

#: Most candidates verified in one piece (more are verified in chunks: ``memscan verify RUN``
#: passes all of a run's candidates at once) ...
VERIFY_CHUNK = 32
#: ... and most bytes of retrieved images a piece decodes at once (K × H × W × C per candidate).
VERIFY_CHUNK_BYTES = 256 << 20


@contextmanager
def verification_threads(n_candidates: int):
    """One thread for torch, FAISS (OpenMP) and BLAS while verifying a small batch.

    A shard's candidates are a few images: their embedding, search and re-ranking take
    milliseconds, too little for a parallel region to pay, and on a busy machine a two-thread
    barrier waits for a descheduled thread (the pixel embedding of 8 images took 6.5 ms with
    two threads at load 8, 0.3 ms with one). Parallelism comes from the runner's workers.
    Batches of :data:`SINGLE_THREAD_BELOW` or more (``extract-unconditional``'s batches of
    generations) keep the default threads. Restored on exit.
    """
    if n_candidates >= SINGLE_THREAD_BELOW:
        yield
        return
    import faiss
    import torch

    blas = _blas_libraries()
    before = torch.get_num_threads(), faiss.omp_get_max_threads(), [lib.num_threads for lib in blas]
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    for lib in blas:
        lib.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])
        for lib, n in zip(blas, before[2]):
            lib.set_num_threads(n)


@lru_cache(maxsize=1)
def _blas_libraries() -> list:
    """The loaded BLAS libraries' thread controls (threadpoolctl; scanned once per process)."""
    from memscan.distances import _blas_controller

    controller = _blas_controller()
    return [] if controller is None else list(controller.select(user_api="blas").lib_controllers)


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

    Returns the extraction rows (same columns) and the retrieval record of
    :class:`RetrievalStats` with complete lists (``skipped``: retrieved images that could not be
    read, by id; ``unverified``: prompts none of whose retrieved images could be read).
    """
    stats = RetrievalStats(candidates=len(candidates), fewer_than_k=0)
    if len(candidates) == 0:
        return empty_indexed_extractions(), stats.to_dict(limit=None)
    # a shard's few candidates at once; many (memscan verify RUN) in chunks, so that memory stays
    # bounded by the chunk's retrieved images and each chunk runs single-threaded
    per = verification_chunk(verifier.spec.retrieve, images.shape[1:])
    tables = []
    for s in range(0, len(candidates), per):
        part = RetrievalStats()
        with verification_threads(min(per, len(candidates) - s)):
            tables.append(_verify(candidates.iloc[s : s + per], images[s : s + per], verifier, part, delta, grid,
                                  n_nearest))  # fmt: skip
        for name in ("retrieved", "decoded", "bytes_read", "fewer_than_k"):
            setattr(stats, name, getattr(stats, name) + getattr(part, name))
        stats.skipped.extend(part.skipped)
        stats.unverified.extend(part.unverified)
    tables = [t for t in tables if len(t)]
    if len(tables) == 1:  # a shard's few candidates: one piece, nothing to concatenate
        return tables[0], stats.to_dict(limit=None)
    return (pd.concat(tables, ignore_index=True) if tables else empty_indexed_extractions()), stats.to_dict(limit=None)


def _eidetic_counts(per_candidate, rows, readable, kept, decoded, delta, grid) -> np.ndarray:
    """For each candidate whose nearest retrieved image x lies within δ: how many of its readable
    retrieved images lie within δ of x (x included) — Carlini et al. 2023's k-eidetic count,
    centred on the training image, among the retrieval (a lower bound of the full count). 0
    for the others. One cross_tiled_l2 call per group of ``RERANK_GROUP`` distinct x."""
    counts = np.zeros(len(per_candidate), np.int64)
    delta32 = delta_float32(delta)
    hits = [c for c, pc in enumerate(per_candidate) if pc is not None and len(pc[0]) and pc[0][0] <= delta32]
    if not hits:
        return counts
    x_of = {c: int(per_candidate[c][1][0]) for c in hits}
    xs = np.unique(list(x_of.values()))
    for group in np.array_split(xs, -(-len(xs) // RERANK_GROUP)):
        mine = [c for c in hits if x_of[c] in set(group.tolist())]
        union = np.unique(np.concatenate([rows[c][readable[c]] for c in mine]))
        x, refs = decoded[np.searchsorted(kept, group)], decoded[np.searchsorted(kept, union)]
        dist = cross_tiled_l2(x, refs, grid=grid, exact_near=refine_near(delta))
        for c in mine:
            own = np.unique(rows[c][readable[c]])
            d = dist[np.searchsorted(group, x_of[c]), np.searchsorted(union, own)]
            counts[c] = int((d <= delta32).sum())
    return counts


def verification_chunk(retrieve: int, shape) -> int:
    """Candidates verified together: at most :data:`VERIFY_CHUNK`, and no more than
    :data:`VERIFY_CHUNK_BYTES` of retrieved images (K × H × W × C bytes each)."""
    per_candidate = max(1, int(retrieve) * int(np.prod(shape)))
    return int(max(1, min(VERIFY_CHUNK, VERIFY_CHUNK_BYTES // per_candidate)))


def _verify(candidates, images, verifier, stats, delta, grid, n_nearest):
    k = verifier.spec.retrieve
    # 1. embed the medoids with the index's embedder; the top K rows of each, in one search
    _, rows = verifier.index.search(verifier.embedder.embed(images), k)
    # 2. decode each retrieved image once (deduplicated over all candidates), at the
    #    candidates' resolution, by random access
    wanted = np.unique(rows[rows >= 0])
    n_retrieved = (rows >= 0).sum(axis=1)  # per candidate: K, or fewer (an IVF search's cells held fewer)
    stats.retrieved = int(n_retrieved.sum())
    stats.fewer_than_k = int((n_retrieved < min(k, len(verifier.index))).sum())
    before = verifier.reader.bytes_read
    kept, decoded, skipped = verifier.reader.read(wanted, size=images.shape[1:3], channels=images.shape[3])
    stats.decoded, stats.bytes_read, stats.skipped = len(kept), verifier.reader.bytes_read - before, skipped
    kept = np.asarray(kept, np.int64)
    if len(kept) > 1 and not (kept[1:] > kept[:-1]).all():  # readers return ascending rows: no copy
        order = np.argsort(kept, kind="stable")
        kept, decoded = kept[order], decoded[order]
    # 3. exact tiled ℓ2 to the readable retrieved images, in training order: one call over the
    #    union when the candidates' retrievals overlap (Q·U pairs ≤ 2·Q·K; with K ≥ N it is the
    #    --train path's very call, so the very same distances), else one call per group of
    #    RERANK_GROUP candidates over the union of their retrievals
    readable = np.where(rows >= 0, np.isin(rows, kept), False)
    per_candidate: list = [None] * len(rows)
    if len(kept) <= 2 * k:  # the union: nearest_tiled_l2, the --train path's very call
        members = np.arange(len(rows))
        union = np.unique(rows[readable])
        if len(union):
            refs = decoded if len(union) == len(kept) else decoded[np.searchsorted(kept, union)]
            dist, idx, _ = nearest_tiled_l2(images, refs, k=len(union), grid=grid, exact_near=refine_near(delta))
            ranked = union[idx]  # each candidate's union rows, nearest first (ties: training order)
            # which of the union each candidate retrieved, in its nearest-first order
            mask = np.zeros((len(members), len(union)), bool)
            at = np.searchsorted(union, np.where(readable, rows, union[0]))
            mask[np.nonzero(readable)[0], at[readable]] = True
            mine = np.take_along_axis(mask, idx, 1)
            for c in members:
                per_candidate[c] = (dist[c][mine[c]], ranked[c][mine[c]])
        groups = []
    else:
        groups = np.array_split(np.arange(len(rows)), -(-len(rows) // RERANK_GROUP))
    for members in groups:
        # one cross_tiled_l2 call per group (its fixed cost shared), then each candidate keeps
        # the columns of its own retrieved images, sorted stably in training order (ties: the
        # lower training row, as nearest_tiled_l2 resolves them)
        union = np.unique(rows[members][readable[members]])
        if not len(union):
            continue
        refs = decoded if len(union) == len(kept) else decoded[np.searchsorted(kept, union)]
        dist = cross_tiled_l2(images[members], refs, grid=grid, exact_near=refine_near(delta))
        for m, c in enumerate(members):
            own = np.unique(rows[c][readable[c]])
            d_own = dist[m, np.searchsorted(union, own)]
            order = np.argsort(d_own, kind="stable")
            per_candidate[c] = (d_own[order], own[order])
    # 4. the prompt's own training image first among the retrieved images tied at the nearest
    #    distance (its exact copies tie with it; sorted in training order, a copy at a lower row
    #    came first and the row read "does not match")
    if "train_id" in candidates.columns:
        for c, expected in enumerate(candidates["train_id"].tolist()):
            if per_candidate[c] is None or not len(per_candidate[c][1]) or not isinstance(expected, str):
                continue
            d_c, r_c = per_candidate[c]
            own = [t for t in np.flatnonzero(d_c == d_c[0]) if verifier.index.ids[int(r_c[t])] == expected]
            if own and own[0] > 0:
                order = np.r_[own[0], np.delete(np.arange(len(r_c)), own[0])]
                per_candidate[c] = (d_c[order], r_c[order])
    # 5. the k-eidetic count of each extracted training image x (the nearest, within δ): the
    #    candidate's retrieved images within δ of x itself
    counts = _eidetic_counts(per_candidate, rows, readable, kept, decoded, delta, grid)
    out = []
    # the candidates' fields as plain values (a namedtuple class per call costs ~1 ms)
    fields = {c: candidates[c].tolist() for c in ("prompt_id", "train_id", "clique_size", "mean_clique_distance")
              if c in candidates.columns}  # fmt: skip
    for c in range(len(candidates)):
        cand = SimpleNamespace(**{name: values[c] for name, values in fields.items()})
        if per_candidate[c] is None or not len(per_candidate[c][1]):
            stats.unverified.append(str(cand.prompt_id))  # nothing readable retrieved (or nothing retrieved)
            continue
        d_c, r_c = per_candidate[c]
        # 6. this candidate's retrieved images, nearest first
        within = int(counts[c])
        top = r_c[: min(n_nearest, len(r_c))]
        rows_c = extraction_rows(
            cand,
            d_c[: len(top)],
            [verifier.index.ids[int(r)] for r in top],
            [verifier.index.captions[int(r)] for r in top],
            within,
            delta,
        )
        for row in rows_c:
            row["retrieved"] = int(n_retrieved[c])
        out.extend(rows_c)
    return pd.DataFrame(out, columns=INDEXED_EXTRACTION_COLUMNS) if out else empty_indexed_extractions()
