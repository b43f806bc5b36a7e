"""A FAISS index over training-set embeddings: build, save, load, query.

The index answers "which training images are nearest to this image" for duplicate counting
(:mod:`memscan.data.duplicates`) and verification (:mod:`memscan.extraction.unconditional`), where
the candidates it returns are re-ranked by exact distances on pixels.

Embeddings are L2-normalised, so the index ranks by inner product = cosine similarity.

- ``flat`` (``IndexFlatIP``): exact; the default up to :data:`FLAT_MAX` vectors.
- ``ivf`` (``IndexIVFFlat``): ``nlist`` k-means cells (default ``4·sqrt(N)``), search visits
  ``nprobe`` of them; the default above :data:`FLAT_MAX` (build is a k-means on a sample plus one
  assignment pass; memory ≈ flat + 8 bytes per vector).
- ``hnsw`` (``IndexHNSWFlat``): graph search; fast queries, slow build, ≈ ``8·M`` extra bytes
  per vector.

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
      index.faiss       faiss.write_index (ivf, hnsw); a flat index is its embeddings and is
                        rebuilt from embeddings.npy on load

``index.json`` is written last: a folder without it is an unfinished build.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from memscan.data.training import empty_training_set, list_source, nothing_readable
from memscan.errors import InputError, MemscanError
from memscan.generators.model_record import model_record
from memscan.index.embed_shards import EmbedWorker, embed_stage, gather_shards
from memscan.index.embedders import load_embedder
from memscan.index.source import iter_batches
from memscan.progress import progress_bar
from memscan.runners import make_pool
from memscan.runners.shards import run_shards
from memscan.store import Run, atomic_write_json, open_run, write_table

#: Largest collection indexed exactly (flat) when ``index_type="auto"``.
FLAT_MAX = 1_000_000
INDEX_TYPES = ("auto", "flat", "ivf", "hnsw")
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
    index_type : ``auto`` (flat up to :data:`FLAT_MAX` vectors, else ivf), ``flat``, ``ivf``, ``hnsw``
    nlist : IVF cells (default ``4·sqrt(N)``, at most ``N/39`` so k-means has 39 points a cell)
    nprobe : IVF cells visited per query (default ``max(8, nlist/8)``)
    hnsw_m : HNSW neighbours per node
    ef_construction, ef_search : HNSW beam widths at build and query time
    train_size : vectors sampled to train IVF k-means (default ``min(N, 64·nlist)``)
    seed : sampling seed of the IVF training sample
    """

    index_type: str = "auto"
    nlist: int | None = None
    nprobe: int | None = None
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    train_size: int | None = None
    seed: int = 0

    def resolve(self, n: int) -> IndexParams:
        """Fill in the automatic choices for ``n`` vectors."""
        if self.index_type not in INDEX_TYPES:
            raise InputError(f"index type {self.index_type!r} is not one of {', '.join(INDEX_TYPES)}")
        kind = self.index_type
        if kind == "auto":
            kind = "flat" if n <= FLAT_MAX else "ivf"
        nlist, nprobe, train = self.nlist, self.nprobe, self.train_size
        if kind == "ivf":
            if nlist is None:
                nlist = int(max(1, min(round(4 * math.sqrt(n)), n // 39)))
            if nlist < 1 or nlist > n:
                raise InputError(f"nlist={nlist} must lie in 1..{n} (the number of vectors)")
            nprobe = min(nlist, nprobe if nprobe is not None else max(8, nlist // 8))
            train = min(n, train if train is not None else max(64 * nlist, 39 * nlist))
        return IndexParams(kind, nlist, nprobe, self.hnsw_m, self.ef_construction, self.ef_search, train, self.seed)


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
    ):
        self.index = index
        self.embeddings = embeddings
        self.ids = list(ids)
        self.captions = list(captions)
        self.params = params
        self.meta = dict(meta or {})

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
    ) -> TrainingIndex:
        """Index L2-normalised float32 ``N×D`` embeddings (row i belongs to ``ids[i]``)."""
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
        index = _build(emb, params)
        return cls(index, emb, list(ids), list(captions) if captions is not None else [""] * len(ids), params, meta)

    # ---- query ------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most similar indexed vectors of each (L2-normalised) query.

        Returns
        -------
        similarities : Q×k float32, descending (cosine); ``-inf`` where fewer than k were found
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
        sims, idx = self.index.search(q, k_eff)
        if k_eff < k:
            pad = k - k_eff
            sims = np.pad(sims, ((0, 0), (0, pad)), constant_values=-np.inf)
            idx = np.pad(idx, ((0, 0), (0, pad)), constant_values=-1)
        sims = np.where(idx < 0, -np.inf, sims).astype(np.float32)
        return sims, idx.astype(np.int64)

    def range_search(self, queries: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every indexed vector with cosine ≥ ``threshold`` to each query (flat and ivf only).

        Returns ``lims`` (Q+1), ``similarities``, ``indices`` in FAISS's layout: the results of
        query i are ``[lims[i]:lims[i+1]]``.
        """
        if self.params.index_type == "hnsw":
            raise InputError("HNSW indexes cannot answer range queries", "use search() with a k")
        q = np.ascontiguousarray(queries, dtype=np.float32)
        # FAISS keeps results with similarity > radius for inner product; nudge to include ≥.
        lims, sims, idx = self.index.range_search(q, float(np.nextafter(np.float32(threshold), np.float32(-np.inf))))
        return lims, sims, idx.astype(np.int64)

    def embed_and_search(self, images: np.ndarray, k: int, embedder=None):
        """Embed images with the index's embedder (or ``embedder``) and :meth:`search`."""
        emb = load_embedder(embedder or self.meta.get("embedder", "pixel"))
        return self.search(emb.embed(images), k)

    def memory_bytes(self) -> int:
        """Bytes of the FAISS index's serialized form (≈ its memory)."""
        return int(_faiss().serialize_index(self.index).nbytes)

    # ---- disk -------------------------------------------------------------------------------
    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the index folder (see module docstring); ``index.json`` last."""
        import pandas as pd

        root = Path(path)
        if (root / "index.json").exists() and not overwrite:
            raise MemscanError(f"{root} already holds an index", "choose another --out, or pass --overwrite")
        root.mkdir(parents=True, exist_ok=True)
        (root / "index.json").unlink(missing_ok=True)
        emb_path = root / "embeddings.npy"
        if not (
            isinstance(self.embeddings, np.memmap) and Path(self.embeddings.filename).resolve() == emb_path.resolve()
        ):
            tmp = root / f".embeddings.npy.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(self.embeddings, dtype=np.float32), allow_pickle=False)
            os.replace(tmp, emb_path)
        write_table(pd.DataFrame({"id": self.ids, "caption": self.captions}), root / "ids.parquet")
        faiss_path = root / "index.faiss"
        if self.params.index_type == "flat":
            faiss_path.unlink(missing_ok=True)
        else:
            tmp = root / f".index.faiss.tmp-{os.getpid()}"
            _faiss().write_index(self.index, str(tmp))
            os.replace(tmp, faiss_path)
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
    def load(cls, path: str | Path, *, mmap: bool = False) -> TrainingIndex:
        """Read an index folder written by :meth:`save` (``mmap``: memory-map the embeddings)."""
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
        emb = np.load(root / "embeddings.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
        ids_df = pd.read_parquet(root / "ids.parquet")
        if len(ids_df) != emb.shape[0] or emb.shape[0] != meta["count"] or emb.shape[1] != meta["dim"]:
            raise InputError(
                f"{root}: embeddings, ids and index.json disagree on the size", "the index is damaged; rebuild it"
            )
        params = IndexParams(**meta["params"])
        if params.index_type == "flat":
            index = _build(np.asarray(emb, dtype=np.float32), params)
        else:
            index = _faiss().read_index(str(root / "index.faiss"))
            _set_search_params(index, params)
            if index.ntotal != emb.shape[0]:
                raise InputError(
                    f"{root}: index.faiss holds {index.ntotal} vectors, not {emb.shape[0]}", "rebuild the index"
                )
        return cls(
            index,
            emb,
            ids_df["id"].astype(str).tolist(),
            ids_df["caption"].fillna("").astype(str).tolist(),
            params,
            meta,
        )


def _set_search_params(index, params: IndexParams) -> None:
    faiss = _faiss()
    if params.index_type == "ivf":
        faiss.extract_index_ivf(index).nprobe = int(params.nprobe)
    elif params.index_type == "hnsw":
        index.hnsw.efSearch = int(params.ef_search)


def _build(emb: np.ndarray, params: IndexParams, chunk: int = 65536):
    """A FAISS inner-product index of kind ``params.index_type`` over ``emb`` (added in chunks)."""
    faiss = _faiss()
    n, d = emb.shape
    # 1. the empty index of the chosen kind
    if params.index_type == "flat":
        index = faiss.IndexFlatIP(d)
    elif params.index_type == "ivf":
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, int(params.nlist), faiss.METRIC_INNER_PRODUCT)
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
    # 3. add every vector, a chunk at a time (no second full copy of a memory-mapped array)
    for s in range(0, n, chunk):
        index.add(np.ascontiguousarray(emb[s : s + chunk], dtype=np.float32))
    _set_search_params(index, params)
    return index


#: Training images per shard of ``memscan index`` (the unit of commit and resume).
INDEX_SHARD_SIZE = 8192


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
    params = IndexParams(index_type) if isinstance(index_type, str) else index_type
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
    index files and report go; the new build starts afresh."""
    root = run.root
    for name in ("manifest.json", "index.json", "embeddings.npy", "ids.parquet", "index.faiss", "report.html"):
        (root / name).unlink(missing_ok=True)
    for f in run.store.shard_dir.glob("*"):
        f.unlink()
    run.previous = None


def _build_run(
    run, train, emb_model, params, batch_size, device, workers, shard_size, progress, stop_after_shards, started
):
    store, root = run.store, run.root
    # 1. list the training set (nothing decoded yet)
    listing = list_source(train)
    n = len(listing.entries)
    if n == 0:
        raise empty_training_set(train)
    n_shards = math.ceil(n / shard_size)
    embedder_spec = emb_model.spec()
    fields = {
        "config": {"embedder": embedder_spec, "index": asdict(params), "shard_size": shard_size},
        "source": str(train),
        "entries": n,
        "n_shards": n_shards,
        "execution": {"batch_size": batch_size, "device": device, "workers": workers},
        "runner": {"name": "local", "workers": 1},
    }
    if embedder_spec.get("type") != "pixel":  # a model embeds: record it like an attacked model
        fields["model"] = model_record(embedder_spec.get("path") or str(embedder_spec), emb_model)
    run.start(fields, identity=("config", "entries", "n_shards"), started=started)
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
    emb, ids, captions, shard_skipped, embed_s = gather_shards(store, n_shards, emb_model.dim, root / "embeddings.npy")
    skipped = list(listing.skipped) + shard_skipped
    t0 = time.perf_counter()
    meta = _index_meta(emb_model, train, skipped, listing.warnings)
    index = TrainingIndex.from_embeddings(emb, ids, captions, params, meta)
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


def _index_meta(emb_model, train, skipped, warnings) -> dict:
    return {
        "embedder": emb_model.spec(),
        "source": str(train),
        "skipped": len(skipped),
        "skipped_files": skipped[:100],
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
    index = TrainingIndex.from_embeddings(
        emb, ids, captions, params, _index_meta(emb_model, train, skipped, listing.warnings)
    )
    _record_timings(index, started, embed_s, time.perf_counter() - t0)
    return index
