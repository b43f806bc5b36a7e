"""A FAISS index over training-set embeddings: build, save, load, query.

The index answers "which training images are nearest to this image" for duplicate counting
(:mod:`memscan.data.duplicates`) and verification (:mod:`memscan.extraction.unconditional`), where
the candidates it returns are re-ranked by exact distances on pixels.

Embeddings are L2-normalised, so the index ranks by inner product = cosine similarity.

- ``flat`` (``IndexFlatIP``): exact; the default up to :data:`FLAT_MAX` vectors. Its float32
  search proposes candidates, re-scored in float64 from the stored embeddings
  (:meth:`TrainingIndex.search`): identical vectors tie exactly, ties go to the lower row, and
  every layout (in memory, memory-mapped, sharded) gives the same answer.
- ``ivf`` (``IndexIVFFlat``): ``nlist`` k-means cells (default ``4·sqrt(N)``), search visits
  ``nprobe`` of them; the default above :data:`FLAT_MAX` (build is a k-means on a sample plus one
  assignment pass; memory ≈ flat + 8 bytes per vector).
- ``ivfpq`` (``IndexIVFPQ``): IVF cells holding product-quantized residuals of ``pq_m`` bytes
  per vector (default 64; ``pq_bits`` = 8 bits per sub-quantizer): an index of 10^8 vectors fits
  in ~7 GB. Its similarities are approximate: callers re-rank what it retrieves by exact pixel
  distance (:mod:`memscan.extraction.verify_index`).
- ``hnsw`` (``IndexHNSWFlat``): graph search; fast queries, slow build, ≈ ``8·M`` extra bytes
  per vector.

Any of them can be built in ``shards`` parts over consecutive rows (one coarse quantizer and
one product quantizer trained once, then copied into every part): each part is its own file,
searchable alone (by another process or Ray worker), and :func:`merge_searches` merges their
answers — for a flat index, the unsharded index's answer once :meth:`TrainingIndex.search` has
re-scored the candidates; for an IVF / IVF-PQ index, the candidates of the same visited cells
(an HNSW index built in parts is several graphs: its answer may differ).

On disk an index is a folder (nothing pickled), a run directory of kind ``index``
(:func:`memscan.store.open_run`: a killed build resumes with ``--resume``)::

    INDEX/
      manifest.json     kind ``index``: embedder, parameters, counts, skipped images, timings
      shards/           the embeddings of each shard of training images, committed one by one
                        (only needed to resume; delete it once the build is complete)
      run.log
      index.json        format version, count, dim, index type and parameters, the embedder's
                        spec (with the model file's sha256), the training source, skipped files
      embeddings.npy    float32 N×D (np.load(allow_pickle=False), memory-mappable)
      ids.parquet       id, caption — row i is embedding i
      locations.parquet where image i lives: path, member, offset, size (tar member data
                        offset and length for webdataset shards; -1 for image files), so
                        verification reads a retrieved image without scanning its shard
      rows.arrow        the same ids, captions and locations as one uncompressed Arrow IPC file:
                        what :meth:`TrainingIndex.load` memory-maps (shared by a node's
                        processes through the page cache); used while the Parquet files are
                        the ones it was written from (their size and mtime, recorded in it)
      index.faiss       faiss.write_index (ivf, ivfpq, hnsw); a flat index is its embeddings and
                        is rebuilt from embeddings.npy on load (memory-mapped: searched in place)
      index-NNN.faiss   the parts of an index built with ``shards`` > 1 (instead of index.faiss)

``index.json`` is written last: a folder without it is an unfinished build.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from memscan.data.training import empty_training_set, list_source, nothing_readable, training_set_sha256
from memscan.errors import InputError, MemscanError
from memscan.generators.model_record import model_record
from memscan.index.columns import StringColumn, column_of
from memscan.index.embed_shards import EmbedWorker, embed_stage, gather_shards
from memscan.index.embedders import load_embedder
from memscan.index.locations import LOCATION_COLUMNS, locations_table
from memscan.index.source import iter_batches
from memscan.progress import progress_bar
from memscan.runners import make_pool
from memscan.runners.shards import run_shards
from memscan.store import Run, atomic_write_json, open_run, replacing

#: Largest collection indexed exactly (flat) when ``index_type="auto"``.
FLAT_MAX = 1_000_000
INDEX_TYPES = ("auto", "flat", "ivf", "ivfpq", "hnsw")
#: Index types with IVF cells (``nlist``, ``nprobe``).
IVF_TYPES = ("ivf", "ivfpq")
FORMAT_VERSION = 1


def _faiss():
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss-cpu is a core dependency
        raise InputError("the training index needs faiss", "pip install faiss-cpu") from None
    return faiss


@dataclass(frozen=True)
class IndexParams:
    """How the FAISS index is built and searched (recorded in ``index.json``).

    Parameters
    ----------
    index_type : ``auto`` (flat up to :data:`FLAT_MAX` vectors, else ivf), ``flat``, ``ivf``,
        ``ivfpq``, ``hnsw``
    nlist : IVF cells (default ``4·sqrt(N)``, at most ``N/39`` so k-means has 39 points a cell)
    nprobe : IVF cells visited per query (default ``max(8, nlist/8)``)
    hnsw_m : HNSW neighbours per node
    ef_construction, ef_search : HNSW beam widths at build and query time
    train_size : vectors sampled to train IVF k-means (default ``min(N, 64·nlist)``)
    seed : sampling seed of the IVF training sample
    pq_m : ivfpq: sub-quantizers = bytes per vector code (must divide the embedding dimension)
    pq_bits : ivfpq: bits per sub-quantizer (8; lowered to ``log2(train_size / 39)`` for small sets)
    shards : parts the index is built in (consecutive rows each; searches merged)
    """

    index_type: str = "auto"
    nlist: int | None = None
    nprobe: int | None = None
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    train_size: int | None = None
    seed: int = 0
    pq_m: int = 64
    pq_bits: int = 8
    shards: int = 1

    def validate(self) -> IndexParams:
        """Check what does not depend on the number of vectors (before anything is embedded);
        ``resolve`` checks the rest. Returns ``self``."""

        def positive(name, v, none_ok=False):
            if v is None and none_ok:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                option = {"nlist": "--nlist", "nprobe": "--nprobe", "pq_m": "--pq-m", "shards": "--index-shards"}
                raise InputError(f"{name}={v!r} must be a positive integer", f"e.g. {option.get(name, name)} 8")

        if self.index_type not in INDEX_TYPES:
            raise InputError(f"index type {self.index_type!r} is not one of {', '.join(INDEX_TYPES)}")
        for name in ("nlist", "nprobe", "train_size"):
            positive(name, getattr(self, name), none_ok=True)
        for name in ("hnsw_m", "ef_construction", "ef_search", "pq_m", "shards"):
            positive(name, getattr(self, name))
        if not 1 <= self.pq_bits <= 16:
            raise InputError(f"pq_bits={self.pq_bits!r} must lie in 1..16", "8 is the usual choice")
        return self

    def resolve(self, n: int) -> IndexParams:
        """Fill in the automatic choices for ``n`` vectors."""
        if self.index_type not in INDEX_TYPES:
            raise InputError(f"index type {self.index_type!r} is not one of {', '.join(INDEX_TYPES)}")
        kind = self.index_type
        if kind == "auto":
            kind = "flat" if n <= FLAT_MAX else "ivf"
        nlist, nprobe, train, bits = self.nlist, self.nprobe, self.train_size, self.pq_bits
        if isinstance(self.shards, bool) or not isinstance(self.shards, int) or not 1 <= self.shards <= n:
            raise InputError(f"shards={self.shards!r} must lie in 1..{n} (the number of vectors)")
        if kind in IVF_TYPES:
            if nlist is None:
                nlist = int(max(1, min(round(4 * math.sqrt(n)), n // 39)))
            if nlist < 1 or nlist > n:
                raise InputError(f"nlist={nlist} must lie in 1..{n} (the number of vectors)")
            nprobe = min(nlist, nprobe if nprobe is not None else max(8, nlist // 8))
            floor = max(64 * nlist, 39 * nlist, 39 * 2**bits if kind == "ivfpq" else 0)
            train = min(n, train if train is not None else floor)
        if kind == "ivfpq":
            if self.pq_m < 1 or not 1 <= bits <= 16:
                raise InputError(f"pq_m={self.pq_m}, pq_bits={bits}: need pq_m ≥ 1 and 1 ≤ pq_bits ≤ 16")
            bits = int(min(bits, max(1, math.floor(math.log2(train / 39)))))  # k-means: ≥ 39 points a centroid
        return IndexParams(
            kind, nlist, nprobe, self.hnsw_m, self.ef_construction, self.ef_search, train, self.seed,
            self.pq_m, bits, self.shards,
        )  # fmt: skip


class TrainingIndex:
    """Embeddings of a training set with their ids and a FAISS index over them.

    Build one with :meth:`from_embeddings` (arrays you have) or
    :func:`memscan.index.build_index` (streams a training set through an embedder).

    Examples
    --------
    >>> import numpy as np
    >>> from memscan.index.embedders import l2_normalize
    >>> x = l2_normalize(np.random.default_rng(0).normal(size=(100, 8)))
    >>> index = TrainingIndex.from_embeddings(x, [f"t{i}" for i in range(100)])
    >>> sims, idx = index.search(x[[5, 9]], k=2)
    >>> idx[:, 0].tolist(), np.round(sims[:, 0], 5).tolist(), index.params.index_type
    ([5, 9], [1.0, 1.0], 'flat')
    """

    def __init__(
        self,
        index,
        embeddings: np.ndarray,
        ids: list[str],
        captions: list[str],
        params: IndexParams,
        meta: dict | None = None,
        locations=None,
    ):
        self.index = index
        self.embeddings = embeddings
        #: row i's id and caption: lists, or (a loaded index) Arrow-backed
        #: :class:`~memscan.index.columns.StringColumn` s that read like lists
        self.ids = column_of(ids)
        self.captions = column_of(captions)
        self.params = params
        self.meta = dict(meta or {})
        #: where each image lives (a table, row i ↔ embedding i: path, member, offset, size;
        #: :mod:`memscan.index.locations`; Arrow-backed columns when loaded), or None (an index
        #: built from arrays, or before it)
        self.locations = locations

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    # ---- build ------------------------------------------------------------------------------
    @classmethod
    def from_embeddings(
        cls,
        embeddings: np.ndarray,
        ids: list[str],
        captions: list[str] | None = None,
        params: IndexParams | str = "auto",
        meta: dict | None = None,
        locations=None,
    ) -> TrainingIndex:
        """Index L2-normalised float32 ``N×D`` embeddings (row i belongs to ``ids[i]``;
        ``locations``: optional table of where each image lives, row-aligned)."""
        emb = np.asanyarray(embeddings)  # keeps a memory map a memory map
        emb = emb if emb.dtype == np.float32 else emb.astype(np.float32)
        if emb.ndim != 2 or emb.shape[0] == 0:
            raise InputError(f"embeddings must be a non-empty N×D array, got shape {emb.shape}")
        if len(ids) != emb.shape[0]:
            raise InputError(f"{len(ids)} ids for {emb.shape[0]} embeddings", "pass one id per row")
        if len(set(ids)) != len(ids):
            raise InputError("index ids must be unique", "deduplicate the training ids")
        params = IndexParams(params) if isinstance(params, str) else params
        params = params.resolve(emb.shape[0])
        if locations is not None and len(locations) != emb.shape[0]:
            raise InputError(f"{len(locations)} locations for {emb.shape[0]} embeddings", "pass one location per row")
        index = _build(emb, params)
        caps = list(captions) if captions is not None else [""] * len(ids)
        return cls(index, emb, list(ids), caps, params, meta, locations)

    # ---- query ------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most similar indexed vectors of each (L2-normalised) query.

        A flat index answers exactly, and the same in every layout (in memory, memory-mapped,
        built in shards, parts served by Ray): the index's float32 search only proposes
        candidates (``k`` plus a margin; a query for which a bound on float32 rounding does not
        show that no other row can enter the ``k`` best — ties wider than the margin, clusters of
        identical rows — is scanned exactly over every row, in blocks: :func:`_exact_top_k`),
        which are re-scored in float64 from the stored embeddings, the same arithmetic for every row, so identical
        vectors tie exactly wherever they are stored. Order: similarity descending, equal
        similarities by the lower row — a stable brute-force sort of all rows.

        An approximate index (ivf, ivfpq, hnsw) returns what its search found, ordered by the
        similarities it computed, equal ones by the lower row; nothing more is promised: a
        neighbour in an IVF cell not visited, or off the HNSW beam, is missed; which of several
        equal candidates at the k-th place is kept is the index's choice; ivfpq similarities are
        product-quantized approximations; a sharded IVF / IVF-PQ index visits the same cells as
        the unsharded one (one quantizer) but a sharded HNSW index is several graphs, so its
        answer may differ from an unsharded one's.

        Returns
        -------
        similarities : Q×k float32, descending (cosine; flat: the float64 inner product of the
            float32 query and stored embedding, rounded to float32); ``-inf`` where fewer than k
            were found
        indices : Q×k int64 rows of the index; ``-1`` where fewer than k were found
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise InputError(
                f"queries must be Q×{self.dim}, got shape {q.shape}", "embed them with the index's embedder"
            )
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InputError(f"k must be a positive integer, got {k!r}")
        k_eff = min(int(k), len(self))
        if self.params.index_type == "flat":
            sims, idx = _exact_top_k(self.index, self.embeddings, q, k_eff)
        else:
            sims, idx = self.index.search(q, k_eff)
        if k_eff < k:
            pad = k - k_eff
            sims = np.pad(sims, ((0, 0), (0, pad)), constant_values=-np.inf)
            idx = np.pad(idx, ((0, 0), (0, pad)), constant_values=-1)
        # equal similarities by the lower row, however the index listed them
        return merge_searches([(sims, idx)], int(k))

    def range_search(self, queries: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The indexed vectors with cosine ≥ ``threshold`` to each query (not HNSW).

        Returns ``lims`` (Q+1), ``similarities``, ``indices`` in FAISS's layout: the results of
        query i are ``[lims[i]:lims[i+1]]``. The index proposes the rows whose float32 similarity
        reaches ``threshold`` less the float32 error bound (:func:`_float32_dot_error`); each is
        re-scored exactly against the stored embeddings (:func:`_exact_dots`) and kept when that
        reaches ``threshold``; ``similarities`` are the exact values rounded to float32. So a flat
        index answers exactly (a pair within an ulp of ``threshold`` is no longer lost to float32
        rounding); an ivf index exactly within the cells it probes; an ivfpq index proposes on its
        compressed (approximate) similarities, so a pair whose approximate similarity falls below
        the threshold is not proposed, while every similarity returned and every decision on a
        proposed pair is exact.

        Examples
        --------
        >>> x = np.eye(4, dtype=np.float32)
        >>> x[1] = [0.6, 0.8, 0, 0]  # cosine 0.6 with row 0
        >>> lims, sims, rows = TrainingIndex.from_embeddings(x, list("abcd")).range_search(x[:1], 0.6)
        >>> rows.tolist(), [round(float(v), 6) for v in sims]
        ([0, 1], [1.0, 0.6])
        """
        if self.params.index_type == "hnsw":
            raise InputError("HNSW indexes cannot answer range queries", "use search() with a k")
        first = self.index.parts[0] if isinstance(self.index, IndexParts) else self.index
        if isinstance(first, MmapFlat):
            raise InputError("a memory-mapped flat index answers search() only", "load it with mmap=False")
        q = np.ascontiguousarray(queries, dtype=np.float32)
        # 1. proposed: float32 similarity > threshold − the float32 error (FAISS keeps > radius)
        norm = float(np.linalg.norm(q.astype(np.float64), axis=1).max(initial=0.0))
        radius = np.nextafter(np.float32(float(threshold) - _float32_dot_error(q.shape[1]) * norm), np.float32(-np.inf))
        lims, _, idx = self.index.range_search(q, float(radius))
        idx = np.asarray(idx, np.int64)
        # 2. re-scored exactly and kept when the exact cosine reaches the threshold
        src = np.repeat(np.arange(q.shape[0]), np.diff(np.asarray(lims, np.int64)))
        exact = _exact_dots(q, src, self.embeddings, idx) if idx.size else np.zeros(0)
        keep = exact >= float(threshold)
        counts = np.bincount(src[keep], minlength=q.shape[0])
        lims = np.concatenate([[0], np.cumsum(counts)]).astype(np.asarray(lims).dtype)
        return lims, exact[keep].astype(np.float32), idx[keep]

    def embed_and_search(self, images: np.ndarray, k: int, embedder=None):
        """Embed images with the index's embedder (or ``embedder``) and :meth:`search`."""
        emb = load_embedder(embedder or self.meta.get("embedder", "pixel"))
        return self.search(emb.embed(images), k)

    def memory_bytes(self) -> int:
        """Bytes of the FAISS index's serialized form (≈ its memory; all parts together)."""
        return sum(_part_bytes(p) for p in (self.index.parts if isinstance(self.index, IndexParts) else [self.index]))

    # ---- disk -------------------------------------------------------------------------------
    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the index folder (see module docstring); ``index.json`` last."""
        root = Path(path)
        if (root / "index.json").exists() and not overwrite:
            raise MemscanError(f"{root} already holds an index", "choose another --out, or pass --overwrite")
        root.mkdir(parents=True, exist_ok=True)
        (root / "index.json").unlink(missing_ok=True)
        emb_path = root / "embeddings.npy"
        if not (
            isinstance(self.embeddings, np.memmap) and Path(self.embeddings.filename).resolve() == emb_path.resolve()
        ):
            with replacing(emb_path) as tmp, open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(self.embeddings, dtype=np.float32), allow_pickle=False)
        (root / ROWS_FILE).unlink(missing_ok=True)
        _write_rows(root, self.ids, self.captions, self.locations)
        # A part loaded memory-mapped (IVF / IVF-PQ) reads its inverted lists from its file:
        # faiss.write_index of it writes a stub naming that mapping, not the lists, so its file is
        # copied instead (and kept as it is when it is the destination).
        sources = getattr(self, "_part_sources", None) or {}
        n_parts = len(self.index.parts) if isinstance(self.index, IndexParts) else 1
        keep = {
            root / _part_file(p, n_parts)
            for p, src in sources.items()
            if _same_file(src, root / _part_file(p, n_parts))
        }
        for old in [root / "index.faiss", *root.glob("index-[0-9][0-9][0-9].faiss")]:
            if self.params.index_type == "flat" or old not in keep:
                old.unlink(missing_ok=True)
        if self.params.index_type != "flat":
            parts = self.index.parts if isinstance(self.index, IndexParts) else [self.index]
            for p, part in enumerate(parts):
                name = _part_file(p, len(parts))
                if root / name in keep:
                    continue
                with replacing(root / name) as tmp:
                    if p in sources:
                        shutil.copyfile(sources[p], tmp)
                    else:
                        _faiss().write_index(part, str(tmp))
        meta = {
            **self.meta,
            "memscan_index": FORMAT_VERSION,
            "count": len(self),
            "dim": self.dim,
            "params": asdict(self.params),
        }
        atomic_write_json(root / "index.json", meta)
        self.meta = meta
        return root

    @classmethod
    def load(cls, path: str | Path, *, mmap: bool = False, open_parts: bool = True) -> TrainingIndex:
        """Read an index folder written by :meth:`save`.

        ``mmap``: memory-map the embeddings and the FAISS files (``faiss.IO_FLAG_MMAP``): a flat
        index is then searched in place, chunk by chunk, and an IVF / IVF-PQ index reads its
        inverted lists from the page cache — several processes on one node share one copy.
        ``open_parts=False``: ids, captions, locations and parameters only; ``index`` is None
        until the caller sets it — e.g. to parts served elsewhere
        (:class:`memscan.runners.ray_runner.RayIndexParts`).
        """
        import pandas as pd

        root = Path(path)
        meta_path = root / "index.json"
        if not meta_path.exists():
            raise InputError(
                f"{root} is not a memscan index (no index.json)", "build one with `memscan index TRAIN --out INDEX`"
            )
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"{meta_path} is not valid JSON ({exc})", "rebuild the index") from None
        if meta.get("memscan_index") != FORMAT_VERSION:
            raise InputError(
                f"{root}: index format {meta.get('memscan_index')!r} is not {FORMAT_VERSION}", "rebuild the index"
            )
        try:
            emb = np.load(root / "embeddings.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
            rows = _read_rows(root, mmap)
        except (OSError, ValueError) as exc:  # missing, truncated or not-an-array files
            raise InputError(f"{root}: the index files cannot be read ({exc})"[:300], "rebuild the index") from None
        locations = None
        if set(LOCATION_COLUMNS) <= set(rows.column_names):  # Arrow-backed: nothing copied
            locations = rows.select(LOCATION_COLUMNS).to_pandas(types_mapper=pd.ArrowDtype)
        if rows.num_rows != emb.shape[0] or emb.shape[0] != meta["count"] or emb.shape[1] != meta["dim"]:
            raise InputError(
                f"{root}: embeddings, ids and index.json disagree on the size", "the index is damaged; rebuild it"
            )
        params = IndexParams(**meta["params"])
        if locations is not None and len(locations) != emb.shape[0]:
            raise InputError(f"{root}: locations.parquet and the embeddings disagree on the size", "rebuild the index")
        bounds = part_bounds(emb.shape[0], params.shards)
        if not open_parts:
            index = None
        elif params.index_type == "flat" and mmap:
            parts = [MmapFlat(emb[a:b]) for a, b in bounds]
            index = parts[0] if len(parts) == 1 else IndexParts(parts, [a for a, _ in bounds])
        elif params.index_type == "flat":
            index = _build(np.asarray(emb, dtype=np.float32), params)
        else:
            faiss = _faiss()
            flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
            parts = []
            for p, (a, b) in enumerate(bounds):
                name = _part_file(p, len(bounds))
                try:
                    part = faiss.read_index(str(root / name), flags)
                except RuntimeError as exc:
                    raise InputError(f"{root}: {name} cannot be read ({str(exc).splitlines()[0][:200]})",
                                     "the index is damaged; rebuild it") from None  # fmt: skip
                _set_search_params(part, params)
                if mmap:
                    _set_mmap_prefetch(part)
                if part.ntotal != b - a:
                    raise InputError(f"{root}: {name} holds {part.ntotal} vectors, not {b - a}", "rebuild the index")
                parts.append(part)
            index = parts[0] if len(parts) == 1 else IndexParts(parts, [a for a, _ in bounds])
        out = cls(index, emb, StringColumn(rows.column("id")), StringColumn(rows.column("caption")), params, meta,
                  locations)  # fmt: skip
        if mmap and open_parts and params.index_type != "flat":
            # the files the mapped parts read from (save copies them: see save)
            out._part_sources = {p: (root / _part_file(p, len(bounds))).resolve() for p in range(len(bounds))}
        return out


def _same_file(a: Path, b: Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve() or os.path.samefile(a, b)
    except OSError:
        return False


#: The Arrow IPC file of an index's rows (ids, captions, locations) that a load memory-maps.
ROWS_FILE = "rows.arrow"


def _parquet_identity(root: Path) -> dict:
    """The identity (size, mtime) of the Parquet files ``rows.arrow`` is made from."""
    out = {}
    for name in ("ids.parquet", "locations.parquet"):
        try:
            st = (root / name).stat()
            out[name] = f"{st.st_size}:{st.st_mtime_ns}"
        except FileNotFoundError:
            out[name] = "absent"
    return out


def _as_strings(col, n: int):
    """A Parquet column as Arrow strings (an all-null column, e.g. no captions, as nulls)."""
    return pa.chunked_array([pa.nulls(n, pa.string())]) if col.type == pa.null() else col.cast(pa.string())


def _rows_from_parquet(root: Path):
    """The rows (id, caption, and the location columns if recorded) read from the Parquet files
    into Arrow arrays (the tar ``path`` dictionary-encoded: 4 bytes a row)."""
    import pyarrow.parquet as pq

    ids = pq.read_table(root / "ids.parquet", columns=["id", "caption"])
    n = ids.num_rows
    rows = pa.table({"id": _as_strings(ids.column("id"), n), "caption": _as_strings(ids.column("caption"), n)})
    if not (root / "locations.parquet").exists():
        return rows
    loc = pq.read_table(root / "locations.parquet", columns=LOCATION_COLUMNS, read_dictionary=["path"])
    if loc.num_rows != n:
        raise ValueError(f"locations.parquet has {loc.num_rows} rows, ids.parquet {n}")
    for name in LOCATION_COLUMNS:
        rows = rows.append_column(name, loc.column(name))
    pa.default_memory_pool().release_unused()  # the decoding's scratch buffers
    return rows


#: Rows of each row group of ``ids.parquet`` and ``locations.parquet``: pyarrow's default (so the
#: files are those ``pq.write_table`` writes), and the rows :meth:`TrainingIndex.save` converts to
#: the Parquet types at a time.
PARQUET_ROW_GROUP = 1024 * 1024


def _write_parquet(table: pa.Table, schema: pa.Schema, path: Path) -> None:
    """``table`` cast to ``schema`` as the Parquet file ``path``, one row group at a time (the file
    ``pq.write_table`` writes of the cast table, without the cast table in memory)."""
    import pyarrow.parquet as pq

    with replacing(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for a in range(0, max(table.num_rows, 1), PARQUET_ROW_GROUP):
            writer.write_table(table.slice(a, PARQUET_ROW_GROUP).cast(schema))


def _pandas_schema(df) -> pa.Schema:
    """The Arrow schema, pandas metadata included, that ``pa.Table.from_pandas`` gives ``df``."""
    return pa.Table.from_pandas(df, preserve_index=False).schema


def _ids_table(ids, captions) -> tuple[pa.Table, pa.Schema]:
    """ids and captions as Arrow, and the schema of ``ids.parquet``: what pandas makes of them as
    Python lists (as every save wrote them). Arrow-backed columns (a loaded index) are taken as
    they are, no Python string made per row; they hold strings only, so a row of strings gives
    that schema."""
    import pandas as pd

    if isinstance(ids, StringColumn) and isinstance(captions, StringColumn):
        schema = _pandas_schema(pd.DataFrame({"id": [""], "caption": [""]}))
        return pa.table({"id": ids.array, "caption": captions.array}), schema
    table = pa.Table.from_pandas(pd.DataFrame({"id": list(ids), "caption": list(captions)}), preserve_index=False)
    return table, table.schema


def _locations_table(locations) -> tuple[pa.Table, pa.Schema]:
    """The locations as Arrow (Arrow-backed columns as they are), and the schema of
    ``locations.parquet``, as every save wrote it: ``path`` and ``member`` Python strings (object
    columns), the other columns as their dtypes make them. The schema is taken from one row with
    strings put in ``path`` and ``member`` (``astype(object)`` of a row of a dictionary-encoded
    column would turn its whole dictionary into Python strings: a string a row for image files)."""
    import pandas as pd

    df = locations.reset_index(drop=True)
    head = df.head(1).assign(**{c: pd.Series([""], dtype=object) for c in ("path", "member")})
    return pa.Table.from_pandas(df, preserve_index=False), _pandas_schema(head)


def _write_rows(root: Path, ids, captions, locations) -> None:
    """Write ``ids.parquet``, ``locations.parquet`` (removed when ``locations`` is None) and then
    ``rows.arrow`` (recording the Parquet files' identity) from one Arrow table of the rows: the
    rows :func:`_rows_from_parquet` would read back, without reading anything back, and without a
    Python object per row of an Arrow-backed (loaded, memory-mapped) index. Each file is written
    under a temporary name, fsync'd and renamed."""
    import pyarrow.compute as pc
    import pyarrow.ipc as ipc

    table, schema = _ids_table(ids, captions)
    n = table.num_rows
    # as a load reads ids.parquet: strings (the Arrow-backed columns are already)
    columns = {name: _as_strings(table.column(name), n) for name in ("id", "caption")}
    _write_parquet(table, schema, root / "ids.parquet")
    if locations is None:
        (root / "locations.parquet").unlink(missing_ok=True)
    else:
        table, schema = _locations_table(locations)
        if table.num_rows != n:
            raise ValueError(f"{table.num_rows} locations for {n} ids")
        _write_parquet(table, schema, root / "locations.parquet")
        for name in LOCATION_COLUMNS:  # as a load reads them: the Parquet types, ``path`` dictionary-encoded
            col, kind = table.column(name), schema.field(name).type
            if name != "path":
                columns[name] = col.cast(kind)
            elif col.type != pa.dictionary(pa.int32(), kind):
                columns[name] = pc.dictionary_encode(col.cast(kind))
            else:  # a loaded index's, as it was read
                columns[name] = col
    rows = pa.table(columns).combine_chunks()
    rows = rows.replace_schema_metadata({f"memscan:{k}": v for k, v in _parquet_identity(root).items()})
    with replacing(root / ROWS_FILE) as tmp, pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, rows.schema) as w:
        w.write_table(rows)


def _read_rows(root: Path, mmap: bool):
    """The index's rows as an Arrow table: ``rows.arrow`` (memory-mapped with ``mmap``) while it
    matches the Parquet files it was made from; else (an index written before it, or Parquet
    files changed since) the Parquet files, read into Arrow arrays."""
    import pyarrow.ipc as ipc

    path = root / ROWS_FILE
    if path.exists():
        try:
            source = pa.memory_map(str(path)) if mmap else pa.OSFile(str(path))
            table = ipc.open_file(source).read_all()
            recorded = {k.decode()[len("memscan:") :]: v.decode() for k, v in (table.schema.metadata or {}).items()
                        if k.startswith(b"memscan:")}  # fmt: skip
            if recorded == _parquet_identity(root):
                return table
            why = "its Parquet files' sizes or modification times differ from those it was made from"
        except (OSError, ValueError) as exc:  # a damaged rows.arrow: the Parquet files hold the same rows
            why = f"it cannot be read ({exc})"
        # said, not silent: each process now holds the rows in private memory (≈ 300 B a row)
        warnings.warn(
            f"index {root}: {ROWS_FILE} is not used, {why} (a copy that did not keep modification "
            "times, or edited files); the rows are read from Parquet into each process's memory. "
            f"Rewrite it with TrainingIndex.load({str(root)!r}).save({str(root)!r}, overwrite=True)",
            stacklevel=3,
        )
    return _rows_from_parquet(root)


def open_index_part(path: str | Path, part: int):
    """Part ``part`` of an index folder, memory-mapped, and the row its rows start at.

    What one server of a sharded index opens (:class:`memscan.runners.ray_runner.IndexPartServer`):
    nothing of the other parts is read.
    """
    root = Path(path)
    try:
        meta = json.loads((root / "index.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{root} is not a readable memscan index ({exc})"[:300], "rebuild the index") from None
    params = IndexParams(**meta["params"])
    bounds = part_bounds(int(meta["count"]), params.shards)
    if not 0 <= part < len(bounds):
        raise InputError(f"{root} has {len(bounds)} part(s), not a part {part}")
    a, b = bounds[part]
    if params.index_type == "flat":
        emb = np.load(root / "embeddings.npy", mmap_mode="r", allow_pickle=False)
        return MmapFlat(emb[a:b]), a
    faiss = _faiss()
    name = _part_file(part, len(bounds))
    try:
        index = faiss.read_index(str(root / name), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as exc:
        raise InputError(f"{root}: {name} cannot be read ({str(exc).splitlines()[0][:200]})",
                         "the index is damaged; rebuild it") from None  # fmt: skip
    _set_search_params(index, params)
    _set_mmap_prefetch(index)
    if index.ntotal != b - a:
        raise InputError(f"{root}: {name} holds {index.ntotal} vectors, not {b - a}", "rebuild the index")
    return index, a


def serve_index_on_ray(path: str | Path, *, cpus_per_part: float = 1, address: str | None = None) -> TrainingIndex:
    """Open the index folder ``path`` with each of its parts searched by its own Ray actor.

    The driver reads ids, captions and locations (and memory-maps the embeddings, which it does
    not search: of a flat index it reads the rows proposed, to re-score them, and scans every row
    for the rare query the proposals do not certify — ties wider than the margin); each actor
    opens one part (:func:`open_index_part`) and the answers are merged (:func:`merge_searches`)
    — through :meth:`TrainingIndex.search`, a flat index's answer is the unsharded one's (for
    the approximate kinds, see there). ``index.index.close()`` stops the actors. See
    :class:`memscan.runners.ray_runner.RayIndexParts`.
    """
    from memscan.runners.ray_runner import RayIndexParts

    index = TrainingIndex.load(path, mmap=True, open_parts=False)
    root = str(Path(path).resolve())
    args = [(root, p) for p in range(index.params.shards)]
    index.index = RayIndexParts(open_index_part, args, merge_searches, cpus_per_part=cpus_per_part, address=address)
    return index


def _part_file(p: int, n_parts: int) -> str:
    return "index.faiss" if n_parts == 1 else f"index-{p:03d}.faiss"


def _part_bytes(part) -> int:
    if isinstance(part, MmapFlat):
        return int(part.embeddings.nbytes)
    return int(_faiss().serialize_index(part).nbytes)


def part_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """The row ranges ``[a, b)`` of an index built in ``shards`` parts (as equal as possible).

    >>> part_bounds(10, 3)
    [(0, 3), (3, 6), (6, 10)]
    """
    cuts = [p * n // shards for p in range(shards + 1)]
    return [(cuts[p], cuts[p + 1]) for p in range(shards)]


def merge_searches(results: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge the searches of several index parts into the ``k`` best of their union.

    ``results``: per part, ``(similarities Q×k_p, global row ids Q×k_p)`` (``-1`` = none). The
    merge orders by the similarities given (as float32), descending, ties by the lower row. A
    part searched on another process (or Ray worker) is merged the same way.

    The merge is only as consistent as the parts' similarities: float32 search gives identical
    vectors slightly different values depending on where they are stored, and a part's heap may
    have dropped the lower of two rows tied at its k-th place, so merged float32 answers can
    differ from an unsharded search's among (near-)ties. :meth:`TrainingIndex.search` makes a
    flat index's answer layout-independent by re-scoring (:func:`_exact_top_k`).
    """
    # 1. all parts' answers side by side; missing answers (-1) sort last
    sims = np.concatenate([np.asarray(s, np.float32) for s, _ in results], axis=1)
    rows = np.concatenate([np.asarray(i, np.int64) for _, i in results], axis=1)
    sims = np.where(rows < 0, -np.inf, sims)
    # 2. per query: by similarity descending, then row ascending; keep k
    order = np.lexsort((np.where(rows < 0, np.iinfo(np.int64).max, rows), -sims), axis=1)[:, :k]
    return np.take_along_axis(sims, order, 1), np.take_along_axis(rows, order, 1)


#: Candidates an exact (flat) search fetches beyond ``k`` (at least; ``k/4`` for a large ``k``)
#: before re-scoring them in float64 (:func:`_exact_top_k`); a query whose candidates do not
#: certify its ``k`` best (tied with more identical rows, say) is answered by an exact scan of
#: every row instead (:func:`_exact_scan`).
EXACT_MARGIN = 16

#: Float64 products :func:`_exact_dots` holds at once (2 MB).
_EXACT_PRODUCTS = 1 << 18
#: Queries × candidates :func:`_exact_top_k` re-scores at once, and queries × rows per block of
#: :func:`_exact_scan`: what bounds their working memory (tens of MB).
_EXACT_CANDIDATES = 1 << 20


def _float32_dot_error(d: int) -> float:
    """A bound on ``|float32 inner product − exact|`` of two ``d``-dimensional vectors of norm ≤ 1,
    in any summation order (BLAS, FAISS): ``γ_d = d·u / (1 − d·u)``, ``u = 2⁻²⁴`` — doubled, for
    the float64 re-scoring's own rounding and embeddings a little off unit norm."""
    du = d * 2.0**-24
    return 2.0 * du / max(1.0 - du, 1e-3)


def _exact_dots(q: np.ndarray, qi: np.ndarray, vectors, rows: np.ndarray) -> np.ndarray:
    """The float64 inner products of the queries ``q[qi]`` (``q``: Q×D float32) with the rows
    ``vectors[rows]``, pair by pair (1-D).

    Every pair is computed by the same sequence of operations: the exact float64 products of
    the float32 values (24 + 24 bits < 53), summed by a fixed binary tree over the dimensions
    (padded with zeros to a power of two), elementwise — no BLAS, whose summation order depends
    on where a row sits in its block. Identical vectors get identical values wherever they are
    stored, in whichever layout, batch or position they are re-scored.
    """
    d = q.shape[1]
    width = 1 << max(0, (d - 1).bit_length())
    per = max(1, _EXACT_PRODUCTS // width)  # pairs per block
    out = np.empty(len(rows))
    buf = np.zeros((min(per, len(rows)), width))  # columns d… stay 0: the tree writes below width/2 < d
    for a in range(0, len(rows), per):
        r = rows[a : a + per]
        prod = buf[: len(r)]
        np.multiply(np.asarray(vectors[r], np.float32), q[qi[a : a + per]], out=prod[:, :d], dtype=np.float64)
        h = width
        while h > 1:
            h //= 2
            np.add(prod[:, :h], prod[:, h : 2 * h], out=prod[:, :h])
        out[a : a + per] = prod[:, 0]
    return out


def _exact_top_k(index, embeddings: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact ``k`` best rows of a flat ``index`` over ``embeddings`` for each query (Q×D float32),
    by float64 similarity (:func:`_exact_dots`) rounded to float32, descending, ties by the lower
    row (Q×k float32, int64).

    ``index`` (FAISS, :class:`MmapFlat`, :class:`IndexParts`, parts served elsewhere) proposes its
    float32 best ``m = k + margin``; those that could place are re-scored and sorted. A row ``r``
    it did not propose has a float32 similarity ≤ ``s_m`` (its m-th), so an exact one ≤
    ``s_m + ε`` (:func:`_float32_dot_error` · ‖q‖, embeddings of unit norm): when that, rounded
    to float32, is below the k-th re-scored value, no such row can reach or tie the k best —
    else the query is answered by :func:`_exact_scan`, one pass over every row (searching again
    with more candidates would cost as much, and fail again while more identical rows than
    candidates tie). The answer is thus the same whatever the index's float32 arithmetic, ties
    or layout. Memory: the index's answer (Q×m), and a block of queries × candidates
    (:data:`_EXACT_CANDIDATES`) at a time.
    """
    n, n_q = int(embeddings.shape[0]), q.shape[0]
    q = np.ascontiguousarray(q, np.float32)
    eps = _float32_dot_error(q.shape[1]) * np.linalg.norm(q.astype(np.float64), axis=1)
    m = min(n, k + max(EXACT_MARGIN, k // 4))
    f, r = index.search(q, m)  # one search: FAISS is slower on a few queries at a time
    f, r = np.asarray(f, np.float32), np.asarray(r, np.int64)
    sims_out = np.empty((n_q, k), np.float32)
    rows_out = np.empty((n_q, k), np.int64)
    done = np.empty(n_q, bool)
    per = max(1, _EXACT_CANDIDATES // m)  # queries re-scored at once
    for a in range(0, n_q, per):
        b = slice(a, a + per)
        sims_out[b], rows_out[b], done[b] = _certified_top_k(embeddings, q[b], f[b], r[b], k, eps[b], every=m >= n)
    todo = np.flatnonzero(~done)
    if todo.size:  # the k-th of k candidates re-scored: the exact k-th reaches it
        sims_out[todo], rows_out[todo] = _exact_scan(embeddings, q[todo], k, sims_out[todo, -1], eps[todo])
    return sims_out, rows_out


def _certified_top_k(embeddings, q: np.ndarray, f: np.ndarray, r: np.ndarray, k: int, eps: np.ndarray, every: bool):
    """The candidates ``r`` (Q×m rows, ``-1``: none; ``f``: their float32 similarities) of the
    queries ``q`` that could place, re-scored: their k best (Q×k float32, int64), and for which
    queries those are certified (``every``: for all, the candidates being every row)."""
    valid = r >= 0
    f = np.where(valid, f, np.float32(-np.inf))
    # 1. the k best float32 candidates have exact similarities ≥ f_k − ε, so the k-th exact one
    #    is ≥ ⌊f_k − ε⌉ (float32): a candidate whose ⌊f + ε⌉ is below cannot reach or tie it, and
    #    is not re-scored (f_k = −inf: fewer than k candidates, all re-scored)
    f_k = -np.partition(-f, k - 1, axis=1)[:, k - 1]
    floor = (f_k.astype(np.float64) - eps).astype(np.float32)
    need = valid & ((f + eps[:, None]).astype(np.float32) >= floor[:, None])  # f + ε: float64
    qi, ci = np.nonzero(need)
    key = np.full(f.shape, -np.inf, np.float32)
    key[qi, ci] = _exact_dots(q, qi, embeddings, r[qi, ci])
    # 2. by similarity descending, then row ascending (missing answers last); keep k
    order = np.lexsort((np.where(valid, r, np.iinfo(np.int64).max), -key), axis=1)[:, :k]
    top, rows = np.take_along_axis(key, order, 1), np.take_along_axis(r, order, 1)
    if every:
        return top, rows, np.ones(len(q), bool)
    # 3. certified: every candidate present, and ⌊s_m + ε⌉ below the k-th
    s_m = f.min(axis=1).astype(np.float64)
    return top, rows, valid.all(axis=1) & ((s_m + eps).astype(np.float32) < top[:, -1])


def _exact_scan(embeddings, q: np.ndarray, k: int, lower: np.ndarray, eps: np.ndarray):
    """The ``k`` best of every row of ``embeddings`` for each query ``q`` (Q×D float32), exactly as
    :func:`_exact_top_k` orders them, by one pass over the rows in blocks.

    ``lower`` (Q float32): a value each query's k-th similarity is known to reach (``-inf``:
    none). Per block of rows and of queries: float32 similarities (BLAS); the rows whose float32
    similarity, even with the error bound ``eps`` (Q), cannot reach the larger of ``lower`` and
    the k-th of the rows before them are skipped; the others are re-scored (:func:`_exact_dots`)
    and merged into the running k best — identical vectors once per query, and only a vector's k
    lowest copies in the block (ties go to the lower row: the others cannot place). Memory: one
    block of queries × rows (:data:`_EXACT_CANDIDATES`), and the Q×k answer.
    """
    n, d = int(embeddings.shape[0]), q.shape[1]
    best_s = np.full((q.shape[0], k), -np.inf, np.float32)
    best_r = np.full((q.shape[0], k), -1, np.int64)
    step = min(n, max(1, _EXACT_CANDIDATES // 128))  # rows per block (8192)
    per = max(1, _EXACT_CANDIDATES // step)  # queries per block
    void = np.dtype((np.void, 4 * d))
    for s in range(0, n, step):
        e = np.ascontiguousarray(embeddings[s : s + step], np.float32)
        for a in range(0, q.shape[0], per):
            qb = q[a : a + per]
            # 1. a row can place only if its exact similarity, rounded to float32, reaches thr: it
            #    is then ≥ thr − ulp, its float32 one ≥ thr − ulp − ε (t: rounded down, with room)
            thr = np.maximum(lower[a : a + per], best_s[a : a + per, -1])
            with np.errstate(invalid="ignore"):
                t = (thr.astype(np.float64) - eps[a : a + per] - 2 * np.abs(np.spacing(thr))).astype(np.float32)
            t = np.where(np.isfinite(thr), np.nextafter(t, np.float32(-np.inf)), np.float32(-np.inf))
            need = qb @ e.T >= t[:, None]
            cols = np.flatnonzero(need.any(axis=0))
            if not cols.size:
                continue
            # 2. identical rows (same bytes) score identically: one group per vector, re-scored
            #    once per query; copies past a vector's k lowest cannot place (ties: lower row)
            cand = e[cols]
            _, group = np.unique(cand.view(void).ravel(), return_inverse=True)
            group = group.ravel()
            by = np.argsort(group, kind="stable")  # by group, rows ascending within
            start = np.flatnonzero(np.r_[True, np.diff(group[by]) != 0])
            rep = by[start]  # each group's lowest row (index into cand)
            keep = np.empty(cols.size, bool)
            keep[by] = np.arange(cols.size) - np.repeat(start, np.diff(np.r_[start, cols.size])) < k
            qi, j = np.nonzero(need[:, cols[keep]])
            j = np.flatnonzero(keep)[j]  # index into cols / cand
            ci, g = cols[j], group[j]
            if rep.size < cols.size:  # copies: each (query, vector) once
                pairs, inv = np.unique(qi * rep.size + g, return_inverse=True)
                vals = _exact_dots(qb, pairs // rep.size, cand, rep[pairs % rep.size])[inv.ravel()]
            else:
                vals = _exact_dots(qb, qi, cand, rep[g])
            # 3. merge into the running k best: similarity descending, then row ascending
            best_s[a : a + per], best_r[a : a + per] = _merge_pairs(
                best_s[a : a + per], best_r[a : a + per], qi, vals.astype(np.float32), s + ci
            )
    return best_s, best_r


def _merge_pairs(best_s: np.ndarray, best_r: np.ndarray, qi: np.ndarray, sims: np.ndarray, rows: np.ndarray):
    """The running k best ``best_s``, ``best_r`` (Q×k; ``-1``: none) with the pairs (query ``qi``,
    similarity ``sims``, row ``rows``) merged in: similarity descending, then row ascending."""
    n_q, k = best_s.shape
    have = best_r >= 0
    qi = np.concatenate([qi, np.nonzero(have)[0]])
    sims = np.concatenate([sims, best_s[have]])
    rows = np.concatenate([rows, best_r[have]])
    order = np.lexsort((rows, -sims, qi))
    qi, sims, rows = qi[order], sims[order], rows[order]
    rank = np.arange(qi.size) - np.searchsorted(qi, np.arange(n_q))[qi]
    keep = rank < k
    out_s = np.full((n_q, k), -np.inf, np.float32)
    out_r = np.full((n_q, k), -1, np.int64)
    out_s[qi[keep], rank[keep]] = sims[keep]
    out_r[qi[keep], rank[keep]] = rows[keep]
    return out_s, out_r


class IndexParts:
    """An index built in parts over consecutive rows; :meth:`search` merges the parts' answers.

    Each part is a FAISS index (or :class:`MmapFlat`) over rows ``offsets[p]…``; it can be
    searched alone anywhere, and :func:`merge_searches` merges the answers (float32, as the
    parts computed them: among ties they may differ from an unsharded search's;
    :meth:`TrainingIndex.search` re-scores a flat index's candidates so they do not).
    """

    def __init__(self, parts: list, offsets: list[int]):
        self.parts = list(parts)
        self.offsets = [int(o) for o in offsets]

    @property
    def ntotal(self) -> int:
        return sum(int(p.ntotal) for p in self.parts)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        results = []
        for part, off in zip(self.parts, self.offsets):
            sims, idx = part.search(q, min(int(k), int(part.ntotal)))
            results.append((sims, np.where(idx < 0, -1, idx + off)))
        return merge_searches(results, int(k))

    def range_search(self, q: np.ndarray, radius: float):
        per = [p.range_search(q, radius) for p in self.parts]
        lims, sims, rows = [0], [], []
        for i in range(q.shape[0]):
            for (lim, s, ix), off in zip(per, self.offsets):
                sims.append(s[lim[i] : lim[i + 1]])
                rows.append(ix[lim[i] : lim[i + 1]] + off)
            lims.append(lims[-1] + sum(len(ix[lim[i] : lim[i + 1]]) for lim, _, ix in per))
        cat = np.concatenate
        return (
            np.asarray(lims, np.int64),
            cat(sims) if sims else np.zeros(0, np.float32),
            cat(rows) if rows else np.zeros(0, np.int64),
        )


def _at_least_kth(sims: np.ndarray, k: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``sims`` (Q×n), its k best as (similarities, ``offset`` + column), Q×k: every
    column above the row's k-th largest value, then the lowest columns equal to it (ties by the
    lower row, as one stable search; argpartition would keep an arbitrary few of them)."""
    n = sims.shape[1]
    kth = np.partition(sims, n - k, axis=1)[:, n - k : n - k + 1]
    above = sims > kth
    tied = sims == kth
    need = k - above.sum(axis=1, keepdims=True)  # ≥ 1: the k-th value itself is tied
    keep = above | (tied & (np.cumsum(tied, axis=1) <= need))  # exactly k per row
    qi, ci = np.nonzero(keep)  # row-major: columns ascending within a row
    cols = ci.reshape(sims.shape[0], k)
    return np.take_along_axis(sims, cols, 1), cols + offset


class MmapFlat:
    """Inner-product search over memory-mapped embeddings, in place, chunk by chunk (float32 BLAS).

    What a flat index is when opened with ``mmap=True``: nothing is copied into memory beyond
    one chunk of rows (the operating system pages the embeddings in and shares them between
    processes). Its similarities are float32 BLAS sums, which differ from FAISS's (and between
    identical rows at different positions) in the last bits: ties in its own values go to the
    lower row; :meth:`TrainingIndex.search` re-scores its candidates in float64 so that the
    answer equals the in-memory index's.
    """

    def __init__(self, embeddings: np.ndarray, chunk: int = 65536):
        self.embeddings = embeddings
        self.chunk = int(chunk)

    @property
    def ntotal(self) -> int:
        return int(self.embeddings.shape[0])

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(q, dtype=np.float32)
        k = min(int(k), self.ntotal)
        per = max(1, (1 << 22) // self.chunk)  # queries per block: ≤ 4M similarities (16 MB) at once
        sims_out = np.empty((q.shape[0], k), np.float32)
        rows_out = np.empty((q.shape[0], k), np.int64)
        for a in range(0, q.shape[0], per):
            qb = q[a : a + per]
            best = (np.full((len(qb), 0), -np.inf, np.float32), np.zeros((len(qb), 0), np.int64))
            for s in range(0, self.ntotal, self.chunk):
                # 1. similarities to one chunk of rows (float32 BLAS)
                sims = qb @ np.asarray(self.embeddings[s : s + self.chunk], dtype=np.float32).T
                # 2. its k best per query, and every row tied with the k-th (argpartition would
                #    keep an arbitrary few of them: the merge keeps the lowest rows, as one search)
                best = merge_searches([best, _at_least_kth(sims, min(k, sims.shape[1]), s)], k)
            sims_out[a : a + per], rows_out[a : a + per] = best
        return sims_out, rows_out


#: Threads FAISS starts before each search of a memory-mapped IVF / IVF-PQ index to pre-touch
#: the inverted lists it will scan (``OnDiskInvertedLists.prefetch_nthread``; FAISS's default is
#: 32). memscan sets none: with the lists in the page cache (the index is shared by the processes
#: of a node) the threads only cost — a search of 8 queries at nprobe 4 in 10^6 vectors took 0.49 ms
#: CPU (0.37 wall) per query with them, 0.15 (0.15) without (issue 18's benchmark). Pages not yet
#: in memory are read when the search touches them.
MMAP_PREFETCH_THREADS = 0


def _set_mmap_prefetch(index) -> None:
    """:data:`MMAP_PREFETCH_THREADS` on a memory-mapped IVF index's inverted lists (others: no-op)."""
    faiss = _faiss()
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # flat, HNSW: no inverted lists
        return
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    if hasattr(lists, "prefetch_nthread"):
        lists.prefetch_nthread = MMAP_PREFETCH_THREADS


def _set_search_params(index, params: IndexParams) -> None:
    faiss = _faiss()
    if params.index_type in IVF_TYPES:
        faiss.extract_index_ivf(index).nprobe = int(params.nprobe)
    elif params.index_type == "hnsw":
        index.hnsw.efSearch = int(params.ef_search)


def _build(emb: np.ndarray, params: IndexParams, chunk: int = 65536):
    """A FAISS inner-product index of kind ``params.index_type`` over ``emb`` (added in chunks);
    with ``params.shards`` > 1, an :class:`IndexParts` of indexes trained once, filled part by part."""
    faiss = _faiss()
    n, d = emb.shape
    template = _trained_empty(emb, params)
    bounds = part_bounds(n, params.shards)
    parts = []
    for a, b in bounds:
        # 3. add every vector of the part, a chunk at a time (no second full copy of a memory map)
        index = template if len(bounds) == 1 else faiss.clone_index(template)
        for s in range(a, b, chunk):
            index.add(np.ascontiguousarray(emb[s : min(b, s + chunk)], dtype=np.float32))
        _set_search_params(index, params)
        parts.append(index)
    return parts[0] if len(parts) == 1 else IndexParts(parts, [a for a, _ in bounds])


def _trained_empty(emb: np.ndarray, params: IndexParams):
    """The empty index of kind ``params.index_type``, trained (IVF k-means, PQ codebooks) on a
    seeded sample of ``emb``: every part of a sharded index is a copy of it."""
    faiss = _faiss()
    n, d = emb.shape
    # 1. the empty index of the chosen kind
    if params.index_type == "flat":
        index = faiss.IndexFlatIP(d)
    elif params.index_type in IVF_TYPES:
        quantizer = faiss.IndexFlatIP(d)
        if params.index_type == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, int(params.nlist), faiss.METRIC_INNER_PRODUCT)
        else:
            if d % params.pq_m:
                raise InputError(
                    f"ivfpq: pq_m={params.pq_m} does not divide the embedding dimension {d}",
                    "choose --pq-m among the divisors of the dimension (e.g. 64 for 768 or 192)",
                )
            index = faiss.IndexIVFPQ(
                quantizer, d, int(params.nlist), int(params.pq_m), int(params.pq_bits), faiss.METRIC_INNER_PRODUCT
            )
        index.cp.seed = int(params.seed)
        index.cp.spherical = True  # unit-norm centroids: cells of an inner-product (cosine) space
        # 2. k-means on a seeded sample (FAISS warns below 39 points a cell; resolve() avoids it)
        rng = np.random.default_rng(params.seed)
        sample = np.sort(rng.choice(n, size=int(params.train_size), replace=False))
        index.train(np.ascontiguousarray(emb[sample], dtype=np.float32))
    elif params.index_type == "hnsw":
        index = faiss.IndexHNSWFlat(d, int(params.hnsw_m), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(params.ef_construction)
    else:  # pragma: no cover - resolve() validates
        raise InputError(f"unknown index type {params.index_type!r}")
    return index


#: Training images per shard of ``memscan index`` (the unit of commit and resume).
INDEX_SHARD_SIZE = 8192
#: What a resumed ``memscan index`` must share with the killed build (else it is refused):
#: ``training_set_sha256`` is the listing's content hash
#: (:func:`memscan.data.training.training_set_sha256`: each image's id and byte size).
INDEX_IDENTITY = ("config", "training_set_sha256", "entries", "n_shards")


def build_index(
    train: str | Path,
    out: str | Path | None = None,
    *,
    embedder="pixel",
    index_type: str | IndexParams = "auto",
    batch_size: int = 256,
    device: str = "cpu",
    workers: int = 2,
    overwrite: bool = False,
    resume: bool = False,
    shard_size: int = INDEX_SHARD_SIZE,
    progress: bool = True,
    stop_after_shards: int | None = None,
) -> TrainingIndex:
    """Stream a training set through an embedder and index it (``memscan index``).

    Parameters
    ----------
    train : training set: folder, CSV/Parquet manifest, webdataset ``.tar`` (or folder of
        them), img2dataset layout
    out : index folder to write (None: keep in memory only). It is a run directory of kind
        ``index`` (:func:`memscan.store.open_run`): a manifest, the embedding shards committed one
        by one, then the index files (module docstring)
    embedder : spec (``pixel``, ``pixel:SIZE``, ``model.pt``, ``model.onnx``,
        ``open_clip:MODEL:WEIGHTS``) or an :class:`~memscan.index.embedders.Embedder`
    index_type : ``auto``, ``flat``, ``ivf``, ``hnsw`` or a full :class:`IndexParams`
    batch_size : images decoded and embedded per step
    device : where model embedders run
    workers : image-decoding threads
    overwrite : replace the index already in ``out`` (removed under the run's lock first)
    resume : finish a killed build in ``out`` (same embedder, parameters, shard size and
        training listing); committed shards are kept
    shard_size : training images per shard (the unit of commit and resume)
    stop_after_shards : stop after this many new shards (for tests of resume)

    Embeddings are committed shard by shard and gathered into ``out/embeddings.npy``
    (memory-mapped), so memory does not grow with the training set; unreadable images are
    counted in ``index.json`` and the manifest.

    Examples
    --------
    >>> import tempfile
    >>> from memscan.synthetic import write_training_set
    >>> d = tempfile.mkdtemp()
    >>> _ = write_training_set(f"{d}/train", 20, size=16)
    >>> index = build_index(f"{d}/train", f"{d}/index", progress=False)
    >>> len(index), index.dim, index.params.index_type, TrainingIndex.load(f"{d}/index").ids[:2]
    (20, 768, 'flat', ['t0000', 't0001'])
    """
    started = time.time()
    params = (IndexParams(index_type) if isinstance(index_type, str) else index_type).validate()
    if params.index_type not in INDEX_TYPES:
        raise InputError(f"index type {params.index_type!r} is not one of {', '.join(INDEX_TYPES)}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise InputError(f"shard_size={shard_size!r} must be a positive integer")
    if out is None:
        return _build_in_memory(train, embedder, params, batch_size, device, workers, progress, started)
    root = Path(out)
    if (root / "index.json").exists() and not (overwrite or resume):
        raise MemscanError(f"{root} already holds an index", "choose another --out, or pass --overwrite")
    emb_model = load_embedder(embedder, device=device, batch_size=batch_size)
    with open_run(root, "index", resume=resume or overwrite) as run:
        if overwrite:
            _remove_index(run)
        return _build_run(run, train, emb_model, params, batch_size, device, workers, shard_size, progress,
                          stop_after_shards, started)  # fmt: skip


def _remove_index(run: Run) -> None:
    """Empty an index folder for ``--overwrite`` (the lock is held): the old manifest, shards,
    index files and report go; the new build starts afresh. Only the files memscan names go, and
    only from a folder that holds an index run (a manifest or ``index.json``): a folder of the
    user's given to ``--overwrite`` keeps every file, and ``shards/`` keeps all but
    ``NNNNN.embeddings.parquet`` and ``NNNNN.done.json``."""
    root = run.root
    if not ((root / "manifest.json").exists() or (root / "index.json").exists()):
        return  # no index here: nothing to replace
    for name in ("manifest.json", "index.json", "embeddings.npy", "ids.parquet", "locations.parquet", ROWS_FILE,
                 "index.faiss", "report.html"):  # fmt: skip
        (root / name).unlink(missing_ok=True)
    for part in root.glob("index-[0-9][0-9][0-9].faiss"):
        part.unlink()
    for f in run.store.shard_dir.glob("*"):
        # NNNNN.embeddings.parquet and NNNNN.done.json (5 digits or more), nothing else of that folder
        if re.fullmatch(r"[0-9]{5,}\.(done\.json|embeddings\.parquet)", f.name) and f.is_file():
            f.unlink()
    run.previous = None


def _build_run(
    run, train, emb_model, params, batch_size, device, workers, shard_size, progress, stop_after_shards, started
):

    store, root = run.store, run.root
    # 1. list the training set once (nothing decoded yet): its content hash identifies the run,
    #    so a resume over other training data is refused before anything is embedded
    listing = list_source(train)
    n = len(listing.entries)
    if n == 0:
        raise empty_training_set(train)
    n_shards = math.ceil(n / shard_size)
    embedder_spec = emb_model.spec()
    fields = {
        "config": {"embedder": embedder_spec, "index": asdict(params), "shard_size": shard_size},
        "source": str(train),
        "training_set_sha256": training_set_sha256(listing),
        "entries": n,
        "n_shards": n_shards,
        "execution": {"batch_size": batch_size, "device": device, "workers": workers},
        "runner": {"name": "local", "workers": 1},
    }
    if embedder_spec.get("type") != "pixel":  # a model embeds: record it like an attacked model
        fields["model"] = model_record(embedder_spec.get("path") or str(embedder_spec), emb_model)
    run.start(fields, identity=INDEX_IDENTITY, started=started)
    store.log(f"index: {n} training images in {n_shards} shards, embedder {embedder_spec}")
    # 2. embed shard by shard; each shard is committed once (a killed build resumes)
    entries = listing.entries
    with make_pool("local", EmbedWorker, (emb_model, batch_size, workers), log=store.log) as pool:
        run.manifest["runner"] = pool.describe()
        run_shards(
            run,
            pool,
            embed_stage,
            {s: (entries[s * shard_size : (s + 1) * shard_size], s * shard_size) for s in range(n_shards)},
            weights={s: min(shard_size, n - s * shard_size) for s in range(n_shards)},
            label="embed",
            unit="images",
            progress=progress,
            stop_after_shards=stop_after_shards,
            describe=lambda s, t: f"{len(t['embeddings'])} images embedded",
        )
    # 3. gather the shards into embeddings.npy, then the FAISS index
    indexed = sum(store.shard_record(s)["rows"]["embeddings"] for s in range(n_shards))
    if indexed == 0:
        skipped = list(listing.skipped) + [x for s in range(n_shards) for x in store.shard_record(s).get("skipped", [])]
        # nothing to resume: leave no run behind, so the corrected rerun on the same --out starts
        _remove_index(run)
        run.manifest = {}
        raise nothing_readable(train, skipped)
    (root / "index.json").unlink(missing_ok=True)
    emb, ids, captions, shard_skipped, embed_s, locations = gather_shards(
        store, n_shards, emb_model.dim, root / "embeddings.npy"
    )
    skipped = list(listing.skipped) + shard_skipped
    t0 = time.perf_counter()
    meta = _index_meta(emb_model, train, skipped, listing.warnings, listing.layout)
    index = TrainingIndex.from_embeddings(emb, ids, captions, params, meta, locations)
    _record_timings(index, started, embed_s, time.perf_counter() - t0)
    index.save(root, overwrite=True)
    for s in skipped:
        store.log(f"skipped training image {s['id']} ({s['path']}): {s['reason']}")
    run.finish(
        counts={"entries": n, "indexed": len(index), "skipped": len(skipped)},
        index={"type": index.params.index_type, "dim": index.dim, "params": asdict(index.params)},
        embedder=embedder_spec,
        skipped_files=skipped[:100],
        warnings=listing.warnings[:100],
        timings_s=index.meta["timings_s"],
    )
    store.log(f"index: complete — {len(index)} images indexed, {len(skipped)} skipped")
    return index


def _index_meta(emb_model, train, skipped, warnings, layout=None) -> dict:
    return {
        "embedder": emb_model.spec(),
        "source": str(train),
        "source_resolved": str(Path(train).resolve()),
        "layout": layout,
        "skipped": len(skipped),
        "skipped_files": skipped[:100],
        "skipped_ids": [str(s.get("id")) for s in skipped],  # every one (the files: the first 100)
        "warnings": warnings[:100],
        "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _record_timings(index: TrainingIndex, started: float, embed_s: float, build_s: float) -> None:
    index.meta["timings_s"] = {
        "total": round(time.time() - started, 3),
        "embed": round(embed_s, 3),
        "index_build": round(build_s, 3),
        "images_per_s": round(len(index) / max(time.time() - started, 1e-9), 1),
    }


def _build_in_memory(train, embedder, params, batch_size, device, workers, progress, started) -> TrainingIndex:
    """``build_index(train, None)``: embed and index in memory, no folder written."""
    emb_model = load_embedder(embedder, device=device, batch_size=batch_size)
    listing = list_source(train)
    n = len(listing.entries)
    if n == 0:
        raise empty_training_set(train)
    emb = np.empty((n, emb_model.dim), np.float32)
    skipped = list(listing.skipped)
    kept = np.zeros(n, bool)
    embed_s = 0.0
    with progress_bar(progress) as bar:
        task = bar.add_task("embed", total=n)
        for pos, (images,) in iter_batches(
            listing.entries, [emb_model.input_size], emb_model.channels, batch_size, skipped=skipped, workers=workers
        ):
            t0 = time.perf_counter()
            emb[pos] = emb_model.embed(images)
            embed_s += time.perf_counter() - t0
            kept[pos] = True
            bar.update(task, completed=int(pos[-1]) + 1)
    if not kept.any():
        raise nothing_readable(train, skipped)
    ids = [e.id for e, k in zip(listing.entries, kept) if k]
    captions = [e.caption for e, k in zip(listing.entries, kept) if k]
    emb = emb if kept.all() else np.ascontiguousarray(emb[kept])
    t0 = time.perf_counter()
    locations = locations_table([e for e, k in zip(listing.entries, kept) if k])
    meta = _index_meta(emb_model, train, skipped, listing.warnings, listing.layout)
    index = TrainingIndex.from_embeddings(emb, ids, captions, params, meta, locations)
    _record_timings(index, started, embed_s, time.perf_counter() - t0)
    return index
