"""Near-duplicate counting in a training set, and the candidate prompts it selects.

Carlini et al. (2023, §4.2) did not attack random prompts: they embedded the 160M training images
of Stable Diffusion with CLIP, counted each image's near-duplicates, and attacked the captions of
the 350,000 most duplicated. This module does the same at any scale:

1. embed every training image (:mod:`memscan.index.embedders`; default: the pixel embedder);
2. find, for every image, the training images at embedding cosine ≥ ``tau`` (a FAISS index:
   range search on flat/IVF, k-nearest on HNSW), at most ``max_neighbors`` per image;
3. **confirm** each candidate pair with a pixel check — tiled ℓ2 (:mod:`memscan.distances`) at
   ``check_size × check_size`` ≤ ``pixel_delta`` — so an embedding that confuses two different
   pictures cannot inflate a count;
4. ``duplicate_count`` of an image = 1 + its confirmed near-duplicates (a unique image has 1);
   clusters are the connected components of the confirmed pairs (single linkage: a chain P–M–Q
   of near-duplicates is one cluster even where P and Q are not duplicates of each other;
   ``cluster_size`` counts the whole chain, while each image's ``duplicate_count`` is its own
   confirmed neighbours + 1);
5. the top K clusters by ``duplicate_count`` of their most-duplicated member become prompts
   (its caption), one per cluster: a prompts table ``memscan extract --prompts`` reads, with
   ``train_id`` and ``duplicate_count``.

Everything that decides a count (τ, the pixel threshold and resolution, the embedder, the cap)
is written next to the prompts in ``<prompts>.candidates.json``, and every image's count in
``<prompts>.duplicates.parquet`` (what a duplication plot is made from).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from memscan.data.training import empty_training_set, list_source, nothing_readable
from memscan.distances import tiled_l2
from memscan.errors import InputError
from memscan.index.embedders import load_embedder
from memscan.index.faiss_index import TrainingIndex
from memscan.index.source import iter_batches
from memscan.progress import progress_bar
from memscan.store import atomic_write_json, check_out_folder, replacing, write_table

#: Default cosine threshold on embeddings (pixel embedder: Pearson correlation of 16×16
#: thumbnails). Permissive on purpose: the pixel check confirms every pair.
DEFAULT_TAU = 0.9
#: Default pixel check: tiled ℓ2 (4×4 grid) at 32×32 below this confirms a pair. Resized and
#: JPEG-recompressed copies measure ≲ 0.05 there; distinct pictures ≳ 0.15 (see
#: docs/scale-data.md).
DEFAULT_PIXEL_DELTA = 0.1


@dataclass(frozen=True)
class DuplicateConfig:
    """How near-duplicates are counted (recorded with the counts).

    Parameters
    ----------
    tau : embedding cosine threshold (≥) for a candidate pair
    pixel_delta : tiled ℓ2 threshold (≤) that confirms a candidate pair; None: no pixel check
    check_size : side of the square images the pixel check compares
    grid : tiles per side of the pixel check's tiled ℓ2
    max_neighbors : candidates kept per image (most similar first); a count that reaches it is
        a lower bound and is flagged ``capped``
    query_chunk : images whose neighbours are searched per step
    """

    tau: float = DEFAULT_TAU
    pixel_delta: float | None = DEFAULT_PIXEL_DELTA
    check_size: int = 32
    grid: int = 4
    max_neighbors: int = 10_000
    query_chunk: int = 2048

    def validate(self) -> DuplicateConfig:
        if not (-1.0 <= self.tau <= 1.0):
            raise InputError(f"tau={self.tau} must lie in [-1, 1] (a cosine similarity)", "default 0.9")
        if self.pixel_delta is not None and not (0.0 <= self.pixel_delta <= 1.0):
            raise InputError(f"pixel_delta={self.pixel_delta} must lie in [0, 1]", f"default {DEFAULT_PIXEL_DELTA}")
        if self.check_size < self.grid or self.check_size % self.grid:
            raise InputError(
                f"check_size={self.check_size} must be a multiple of grid={self.grid}", "e.g. 32 with grid 4"
            )
        if self.max_neighbors < 1 or self.query_chunk < 1:
            raise InputError("max_neighbors and query_chunk must be ≥ 1")
        return self


@dataclass
class DuplicateCounts:
    """Near-duplicate counts of a training set.

    Attributes
    ----------
    table : one row per training image: ``train_id``, ``caption``, ``duplicate_count`` (itself
        included), ``cluster_id``, ``cluster_size``, ``capped``
    pairs : confirmed pairs: ``train_id_a``, ``train_id_b``, ``cosine``, ``tiled_l2``
    summary : thresholds, embedder, counts, timings
    """

    table: pd.DataFrame
    pairs: pd.DataFrame
    summary: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# the core, on arrays
# --------------------------------------------------------------------------------------------
def candidate_pairs(
    index, embeddings: np.ndarray, config: DuplicateConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (a < b) of indexed rows with cosine ≥ τ, their cosine, and per-row ``capped`` flags.

    ``index`` is a :class:`~memscan.index.faiss_index.TrainingIndex` over ``embeddings``.
    """
    n = embeddings.shape[0]
    cap = config.max_neighbors
    capped = np.zeros(n, bool)
    parts_a, parts_b, parts_s = [], [], []
    use_range = index.params.index_type != "hnsw"
    for s in range(0, n, config.query_chunk):
        q = np.ascontiguousarray(embeddings[s : s + config.query_chunk], dtype=np.float32)
        rows = np.arange(s, s + q.shape[0])
        if use_range:
            lims, sims, idx = index.range_search(q, config.tau)
            counts = np.diff(lims).astype(np.int64)
            src = np.repeat(rows, counts)
        else:
            sims, idx = index.search(q, min(cap + 1, n))
            src = np.repeat(rows, sims.shape[1])
            sims, idx = sims.ravel(), idx.ravel()
        keep = (idx >= 0) & (idx != src) & (sims >= np.float32(config.tau))
        src, dst, sim = src[keep], idx[keep], sims[keep]
        # at most `cap` neighbours per row, most similar first; flag rows whose count may be cut
        per_row = np.bincount(src - s, minlength=q.shape[0])
        capped[rows] = per_row > cap if use_range else (per_row >= cap) & (n > cap + 1)
        order = np.lexsort((-sim, src))
        src, dst, sim = src[order], dst[order], sim[order]
        rank = np.arange(src.size) - np.searchsorted(src, src, side="left")
        within = rank < cap
        src, dst, sim = src[within], dst[within], sim[within]
        a, b = np.minimum(src, dst), np.maximum(src, dst)
        parts_a.append(a)
        parts_b.append(b)
        parts_s.append(sim)
    if not parts_a:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32), capped
    a, b, s = np.concatenate(parts_a), np.concatenate(parts_b), np.concatenate(parts_s)
    key = a.astype(np.int64) * n + b
    uniq, first = np.unique(key, return_index=True)
    pairs = np.stack([uniq // n, uniq % n], axis=1).astype(np.int64)
    return pairs, s[first].astype(np.float32), capped


def confirm_pairs(images: np.ndarray, pairs: np.ndarray, config: DuplicateConfig, chunk: int = 8192) -> np.ndarray:
    """Tiled ℓ2 (``config.grid``) of every pair of ``images`` (rows of ``pairs``), float64."""
    out = np.empty(pairs.shape[0], np.float64)
    for s in range(0, pairs.shape[0], chunk):
        p = pairs[s : s + chunk]
        out[s : s + len(p)] = tiled_l2(images[p[:, 0]], images[p[:, 1]], grid=config.grid)
    return out


def clusters_of(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components of the graph on ``n`` nodes with edges ``pairs``: a label per node,
    the smallest node index of its component.

    This is single linkage: a chain of near-duplicates P–M–Q is one cluster (and so one prompt)
    even where P and Q are not duplicates of each other; the cluster's ``cluster_size`` counts
    the whole chain, and the prompt's ``duplicate_count`` is its representative's own confirmed
    neighbours + 1, not the cluster's size.

    Examples
    --------
    >>> clusters_of(5, np.array([[0, 3], [3, 4]])).tolist()
    [0, 1, 2, 0, 0]
    """
    parent = np.arange(n)

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for a, b in pairs:
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(i) for i in range(n)], np.int64)


def count_duplicates_arrays(
    embeddings: np.ndarray,
    check_images: np.ndarray | None,
    ids: list[str],
    captions: list[str] | None = None,
    config: DuplicateConfig = DuplicateConfig(),
    *,
    index=None,
) -> DuplicateCounts:
    """Duplicate counts from embeddings (and the pixel-check images, same order) in memory.

    Examples
    --------
    >>> import numpy as np
    >>> from memscan.index.embedders import PixelEmbedder
    >>> rng = np.random.default_rng(0)
    >>> x = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    >>> x = np.concatenate([x, x[:1], x[:1], x[2:3]])            # image 0 three times, 2 twice
    >>> r = count_duplicates_arrays(PixelEmbedder().embed(x), x, list("abcdefg"))
    >>> r.table["duplicate_count"].tolist(), r.table["cluster_size"].tolist()
    ([3, 1, 2, 1, 3, 3, 2], [3, 1, 2, 1, 3, 3, 2])
    """
    config = config.validate()
    emb = np.asanyarray(embeddings)
    n = emb.shape[0]
    if len(ids) != n:
        raise InputError(f"{len(ids)} ids for {n} embeddings")
    captions = list(captions) if captions is not None else [""] * n
    if index is None:
        index = TrainingIndex.from_embeddings(emb, ids, captions, "flat")
    # 1. candidate pairs from the embedding index
    pairs, cos, capped = candidate_pairs(index, emb, config)
    # 2. pixel confirmation
    if config.pixel_delta is None or pairs.shape[0] == 0:
        dist = np.full(pairs.shape[0], np.nan)
        ok = np.ones(pairs.shape[0], bool)
    else:
        if check_images is None:
            raise InputError("the pixel check needs the training images", "pass check_images, or pixel_delta=None")
        dist = confirm_pairs(check_images, pairs, config)
        # in float32, the distances' precision (exact, rounded once): a pair at exactly δ is
        # confirmed whatever δ's type, as verification's d ≤ δ
        ok = dist <= np.float32(config.pixel_delta)
    confirmed = pairs[ok]
    # 3. counts and clusters
    degree = np.bincount(confirmed.ravel(), minlength=n) if confirmed.size else np.zeros(n, np.int64)
    labels = clusters_of(n, confirmed)
    _, inverse, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    table = pd.DataFrame(
        {
            "train_id": list(ids),
            "caption": captions,
            "duplicate_count": (degree + 1).astype(np.int64),
            "cluster_id": [str(ids[int(c)]) for c in labels],
            "cluster_size": sizes[inverse].astype(np.int64),
            "capped": capped,
        }
    )
    pair_df = pd.DataFrame(
        {
            "train_id_a": [ids[int(i)] for i in confirmed[:, 0]],
            "train_id_b": [ids[int(i)] for i in confirmed[:, 1]],
            "cosine": cos[ok].astype(np.float64),
            "tiled_l2": dist[ok],
        }
    )
    hist = table["duplicate_count"].value_counts().sort_index()
    summary = {
        "config": asdict(config),
        "images": int(n),
        "candidate_pairs": int(pairs.shape[0]),
        "confirmed_pairs": int(confirmed.shape[0]),
        "rejected_by_pixel_check": int(pairs.shape[0] - confirmed.shape[0]),
        "images_with_duplicates": int((table["duplicate_count"] > 1).sum()),
        "clusters_with_duplicates": int(len(np.unique(labels[table["cluster_size"].to_numpy() > 1]))),
        "capped": int(capped.sum()),
        "duplicate_count_histogram": {int(k): int(v) for k, v in hist.items()},
        "index_type": index.params.index_type,
    }
    return DuplicateCounts(table, pair_df, summary)


# --------------------------------------------------------------------------------------------
# streaming over a training set
# --------------------------------------------------------------------------------------------
def count_duplicates(
    train: str | Path | None,
    config: DuplicateConfig = DuplicateConfig(),
    *,
    embedder="pixel",
    index=None,
    batch_size: int = 256,
    device: str = "cpu",
    workers: int = 2,
    max_check_bytes: int = 2 << 30,
    progress: bool = True,
) -> DuplicateCounts:
    """Count near-duplicates of every image of a training set (any supported layout).

    Parameters
    ----------
    train : the training set (folder, manifest, webdataset shards, img2dataset layout); None
        with ``index``: the images are the index's, and the pixel check reads just the images
        in candidate pairs through the locations the index recorded (tar member offsets, paths;
        :func:`memscan.index.locations.training_reader`) — nothing is listed or decoded whole
    config : thresholds (:class:`DuplicateConfig`)
    embedder : embedder spec or object (ignored when ``index`` is given: its own is used)
    index : a :class:`~memscan.index.faiss_index.TrainingIndex` or the path of one built from
        ``train`` (reuses its embeddings and FAISS index; its ids must be images of ``train``)
    max_check_bytes : keep pixel-check images from the embedding pass when they fit in this many
        bytes; otherwise the images in candidate pairs are decoded again in a second pass
    """
    config = config.validate()
    started = time.time()
    if train is None:
        if index is None:
            raise InputError("counting duplicates needs the training set", "pass TRAIN, or --index INDEX")
        return _count_via_index(index, config, started)
    listing = list_source(train)
    skipped = list(listing.skipped)
    size = (config.check_size, config.check_size)
    check = config.pixel_delta is not None
    # 1. embeddings: from the index, or one streaming pass (keeping pixel-check images if they fit)
    if index is not None:
        index = index if isinstance(index, TrainingIndex) else TrainingIndex.load(index)
        pos_of = {e.id: k for k, e in enumerate(listing.entries)}
        missing = [i for i in index.ids if i not in pos_of]
        if missing:
            raise InputError(
                f"the index holds {len(missing)} id(s) that are not in {train} (first: {missing[0]!r})",
                "pass the training set the index was built from, or rebuild the index",
            )
        entries = [listing.entries[pos_of[i]] for i in index.ids]
        # listed images the index lacks: those its build could not decode (skipped then, by id)
        # are skipped here too; the others were added after the index was built
        indexed = set(index.ids)
        files = index.meta.get("skipped_files", [])
        failed_at_build = set(index.meta.get("skipped_ids", [f.get("id") for f in files]))  # older: first 100
        absent = [e for e in listing.entries if e.id not in indexed]
        failed = [e for e in absent if e.id in failed_at_build]
        named = {f.get("id"): f for f in files}
        skipped += [named.get(e.id, {"id": e.id, "path": str(e.path), "reason": "not decodable when the index was built"})
                    for e in failed]  # fmt: skip
        not_in_index = len(absent) - len(failed)
        emb, ids, captions = index.embeddings, index.ids, [e.caption for e in entries]
        embedder_spec = index.meta.get("embedder")
        keep_pixels = None
    else:
        model = load_embedder(embedder, device=device, batch_size=batch_size)
        embedder_spec = model.spec()
        not_in_index = 0
        n_all = len(listing.entries)
        if n_all == 0:
            raise empty_training_set(train)
        emb = np.empty((n_all, model.dim), np.float32)
        fits = n_all * size[0] * size[1] * 3 <= max_check_bytes
        keep_pixels = np.empty((n_all, *size, 3), np.uint8) if check and fits and model.channels == 3 else None
        kept = np.zeros(n_all, bool)
        sizes = [model.input_size] + ([size] if keep_pixels is not None else [])
        with progress_bar(progress) as bar:
            task = bar.add_task("embed", total=n_all)
            for pos, arrays in iter_batches(
                listing.entries, sizes, model.channels, batch_size, skipped=skipped, workers=workers
            ):
                emb[pos] = model.embed(arrays[0])
                if keep_pixels is not None:
                    keep_pixels[pos] = arrays[1]
                kept[pos] = True
                bar.update(task, completed=int(pos[-1]) + 1)
        entries = [e for e, k in zip(listing.entries, kept) if k]
        emb = emb[kept]
        if keep_pixels is not None:
            keep_pixels = keep_pixels[kept]
        ids, captions = [e.id for e in entries], [e.caption for e in entries]
        if not ids:
            raise nothing_readable(train, skipped)
        index = TrainingIndex.from_embeddings(emb, ids, captions, "auto")
    embed_done = time.time()
    # 2. candidate pairs, then pixel-check images for the rows involved (second pass if needed)
    pairs, _, _ = candidate_pairs(index, np.asanyarray(emb), config)
    check_images = keep_pixels
    if check and keep_pixels is None and pairs.size:
        # only the images in candidate pairs are decoded again (a sparse store, remapped)
        involved = np.unique(pairs.ravel())
        remap = np.full(len(ids), -1, np.int64)
        remap[involved] = np.arange(involved.size)
        store = np.zeros((involved.size, *size, 3), np.uint8)
        failed: list[dict] = []
        sub = [entries[int(i)] for i in involved]
        for pos, (imgs,) in iter_batches(sub, [size], 3, batch_size, skipped=failed, workers=workers):
            store[pos] = imgs
        if failed:
            raise InputError(
                f"{len(failed)} image(s) could not be decoded again for the pixel check (first: {failed[0]['reason']})",
                "the training set changed while it was read; rerun",
            )
        check_images = _Remapped(store, remap)
    counts = count_duplicates_arrays(emb, check_images, ids, captions, config, index=index)
    counts.summary.update(
        {
            "source": str(train),
            "embedder": embedder_spec,
            "skipped": len(skipped),
            "skipped_files": skipped[:100],
            "not_in_index": not_in_index,
            "timings_s": {"embed": round(embed_done - started, 3), "total": round(time.time() - started, 3)},
        }
    )
    return counts


def _count_via_index(index, config: DuplicateConfig, started: float) -> DuplicateCounts:
    """:func:`count_duplicates` from an index alone: its embeddings and FAISS index find the
    candidate pairs; the pixel check reads only the images in them, by random access."""
    from memscan.index.locations import training_reader

    path = None if isinstance(index, TrainingIndex) else str(index)
    if path is not None and not Path(path).is_dir():
        raise InputError(f"training index {path} does not exist", "build it with `memscan index TRAIN --out INDEX`")
    index = index if isinstance(index, TrainingIndex) else TrainingIndex.load(index)
    reader = training_reader(index) if config.pixel_delta is not None else None
    emb = np.asanyarray(index.embeddings)
    # 1. candidate pairs from the index; 2. the images in them, each read once
    pairs, _, _ = candidate_pairs(index, emb, config)
    check_images, read = None, {"decoded": 0, "bytes_read": 0}
    if reader is not None and pairs.size:
        involved = np.unique(pairs.ravel())
        kept, imgs, failed = reader.read(involved, size=(config.check_size, config.check_size), channels=3)
        if failed:
            raise InputError(
                f"{len(failed)} image(s) in candidate pairs could not be read for the pixel check "
                f"(first: {failed[0]['id']} at {failed[0]['path']}: {failed[0]['reason']})",
                "restore the training images where the index recorded them, or rebuild the index",
            )
        remap = np.full(len(index), -1, np.int64)
        remap[kept] = np.arange(len(kept))
        check_images = _Remapped(imgs, remap)
        read = {"decoded": int(len(kept)), "bytes_read": int(reader.bytes_read)}
    embed_done = time.time()
    counts = count_duplicates_arrays(emb, check_images, index.ids, index.captions, config, index=index)
    m = index.meta
    counts.summary.update(
        {
            "source": m.get("source"),
            "embedder": m.get("embedder"),
            "skipped": int(m.get("skipped", 0)),
            "skipped_files": m.get("skipped_files", [])[:100],
            "not_in_index": 0,
            "via_index": {"index": path, "index_type": index.params.index_type, "training_decoded": False, **read},
            "timings_s": {"embed": round(embed_done - started, 3), "total": round(time.time() - started, 3)},
        }
    )
    return counts


class _Remapped:
    """Index ``images[remap[i]]`` as if it were a full ``N``-row array (sparse pixel-check store)."""

    def __init__(self, images: np.ndarray, remap: np.ndarray):
        self.images, self.remap = images, remap

    def __getitem__(self, rows):
        return self.images[self.remap[rows]]


# --------------------------------------------------------------------------------------------
# candidate prompts
# --------------------------------------------------------------------------------------------
@dataclass
class CandidateResult:
    """The candidate prompts and the counts they came from (also written to disk)."""

    prompts: pd.DataFrame
    counts: DuplicateCounts
    paths: dict


def top_candidates(counts: DuplicateCounts, top: int, min_count: int = 1) -> pd.DataFrame:
    """One prompt per duplicate cluster, most duplicated first (``prompt_id`` = its ``train_id``).

    The cluster's representative is its member with the highest ``duplicate_count`` (ties: the
    first in training-set order); its caption is the prompt (another member's caption when it
    has none). Ordering: ``duplicate_count``, then ``cluster_size``, descending; then order.
    """
    if top < 1:
        raise InputError(f"top={top} must be ≥ 1", "the number of prompts to write")
    t = counts.table.reset_index(drop=True).copy()
    t["order"] = np.arange(len(t))
    rep = t.sort_values(["cluster_id", "duplicate_count", "order"], ascending=[True, False, True]).drop_duplicates(
        "cluster_id"
    )
    captions = (
        t[t["caption"].astype(str).str.strip() != ""].drop_duplicates("cluster_id").set_index("cluster_id")["caption"]
    )
    rep = rep.assign(
        prompt=[c if str(c).strip() else captions.get(cid, "") for c, cid in zip(rep["caption"], rep["cluster_id"])]
    )
    rep = rep[rep["duplicate_count"] >= min_count]
    rep = rep.sort_values(["duplicate_count", "cluster_size", "order"], ascending=[False, False, True]).head(top)
    out = pd.DataFrame(
        {
            "prompt_id": rep["train_id"].astype(str).to_numpy(),
            "prompt": rep["prompt"].astype(str).to_numpy(),
            "train_id": rep["train_id"].astype(str).to_numpy(),
            "duplicate_count": rep["duplicate_count"].astype(np.int64).to_numpy(),
            "cluster_id": rep["cluster_id"].astype(str).to_numpy(),
            "cluster_size": rep["cluster_size"].astype(np.int64).to_numpy(),
        }
    )
    return out.reset_index(drop=True)


def select_candidates(
    train: str | Path | None,
    out: str | Path,
    top: int,
    config: DuplicateConfig = DuplicateConfig(),
    *,
    min_count: int = 1,
    embedder="pixel",
    index=None,
    batch_size: int = 256,
    device: str = "cpu",
    progress: bool = True,
    overwrite: bool = False,
) -> CandidateResult:
    """``memscan candidates``: count duplicates and write the top-K prompts file.

    Writes ``out`` (``.csv`` or ``.parquet``: ``prompt_id, prompt, train_id, duplicate_count,
    cluster_id, cluster_size`` — what ``memscan extract --prompts`` reads), and beside it
    ``<stem>.duplicates.parquet`` (every image's count and cluster), ``<stem>.pairs.parquet``
    (confirmed pairs) and ``<stem>.candidates.json`` (τ, pixel check, embedder, histogram).

    Examples
    --------
    >>> import tempfile
    >>> from memscan.data.prompts import load_prompts
    >>> from memscan.synthetic import write_training_set
    >>> d = tempfile.mkdtemp()
    >>> _ = write_training_set(f"{d}/train", 5, size=32)
    >>> res = select_candidates(f"{d}/train", f"{d}/prompts.csv", top=3, progress=False)
    >>> df, _ = load_prompts(f"{d}/prompts.csv")
    >>> df[["train_id", "duplicate_count"]].values.tolist()
    [['t0000', 1], ['t0001', 1], ['t0002', 1]]
    """
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise InputError(
            f"prompts file {out} must end in .csv or .parquet", "it carries train_id and duplicate_count columns"
        )
    if out.is_dir():  # checked before the counting, which could take hours
        raise InputError(f"--out {out} is a folder", "give the prompts file's path, e.g. OUT/prompts.csv")
    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists", "choose another --out, or pass --overwrite")
    check_out_folder(out.parent)  # a file anywhere above it: refused now, not after the counting
    counts = count_duplicates(
        train, config, embedder=embedder, index=index, batch_size=batch_size, device=device, progress=progress
    )
    prompts = top_candidates(counts, top, min_count)
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.with_suffix("")
    paths = {
        "prompts": str(out),
        "duplicates": str(stem) + ".duplicates.parquet",
        "pairs": str(stem) + ".pairs.parquet",
        "summary": str(stem) + ".candidates.json",
    }
    write_table(counts.table, Path(paths["duplicates"]))
    write_table(counts.pairs, Path(paths["pairs"]))
    if suffix == ".parquet":
        write_table(prompts, out)
    else:
        with replacing(out) as tmp:
            prompts.to_csv(tmp, index=False)
    summary = {
        **counts.summary,
        "top": int(top),
        "min_count": int(min_count),
        "prompts_written": int(len(prompts)),
        "prompts_without_caption": int((prompts["prompt"].str.strip() == "").sum()),
        "files": paths,
    }
    atomic_write_json(Path(paths["summary"]), summary)
    counts.summary = summary
    return CandidateResult(prompts, counts, paths)
