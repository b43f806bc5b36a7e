"""The stage of ``memscan index``: embed one shard of a training-set listing.

``memscan index`` cuts the listing (:func:`memscan.data.training.list_source`) into shards of
``shard_size`` entries; :func:`embed_stage` decodes and embeds one shard and returns its rows
(``row`` in the listing, ``id``, ``caption``, ``embedding``); the run store commits each shard
once (:func:`memscan.runners.shards.run_shards`), so a killed build resumes with ``--resume``.
:func:`gather_shards` reads the committed shards back in order into ``embeddings.npy``.

Examples
--------
>>> import tempfile
>>> from memscan.data.training import list_source
>>> from memscan.index.embedders import load_embedder
>>> from memscan.synthetic import write_training_set
>>> d = tempfile.mkdtemp()
>>> _ = write_training_set(f"{d}/train", 5, size=16)
>>> worker = EmbedWorker(load_embedder("pixel:4"), batch_size=2, workers=1)
>>> tables, meta = embed_stage(worker, list_source(f"{d}/train").entries[1:4], 1)
>>> tables["embeddings"]["row"].tolist(), len(tables["embeddings"]["embedding"][0]), meta["skipped"]
([1, 2, 3], 48, [])
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from memscan.index.locations import LOCATION_COLUMNS, locations_table
from memscan.index.source import iter_batches
from memscan.store import RunStore, replacing

#: Columns of a shard's ``embeddings`` table (then where each image lives, ``LOCATION_COLUMNS``).
EMBEDDING_COLUMNS = ["row", "id", "caption", "embedding"]


@dataclass
class EmbedWorker:
    """A worker's context: the embedder and how to feed it."""

    embedder: Any
    batch_size: int = 256
    workers: int = 2


def embed_stage(worker: EmbedWorker, entries, first_row: int, progress=None) -> tuple[dict[str, pd.DataFrame], dict]:
    """Decode and embed ``entries`` (rows ``first_row…`` of the listing); unreadable images are
    listed in the meta's ``skipped``, never fatal."""
    emb_model = worker.embedder
    skipped: list[dict] = []
    rows, ids, captions, vectors, kept = [], [], [], [], []
    embed_s = 0.0
    for pos, (images,) in iter_batches(
        entries, [emb_model.input_size], emb_model.channels, worker.batch_size, skipped=skipped, workers=worker.workers
    ):
        t0 = time.perf_counter()
        vecs = np.asarray(emb_model.embed(images), dtype=np.float32)
        embed_s += time.perf_counter() - t0
        for k, p in enumerate(pos):
            rows.append(first_row + int(p))
            ids.append(entries[int(p)].id)
            captions.append(entries[int(p)].caption)
            vectors.append(vecs[k])
            kept.append(entries[int(p)])
        if progress is not None:
            progress(len(pos))
    if progress is not None and skipped:
        progress(len(skipped))
    table = pd.DataFrame({"row": np.asarray(rows, np.int64), "id": ids, "caption": captions, "embedding": vectors})
    table = pd.concat([table[EMBEDDING_COLUMNS], locations_table(kept)], axis=1)
    return {"embeddings": table}, {
        "entries": len(entries),
        "embed_s": round(embed_s, 3),
        "skipped": skipped,
    }


def gather_shards(store: RunStore, n_shards: int, dim: int, path: Path):
    """Write every committed shard's embeddings, in order, to ``path`` (``.npy``, written to a
    temporary name and renamed); returns ``(embeddings memory map, ids, captions, skipped,
    embed seconds, locations)`` — ``locations`` the ``LOCATION_COLUMNS`` table, or None when a
    shard was committed before locations were recorded."""
    ids, captions, skipped, embed_s, n = [], [], [], 0.0, 0
    locations: list | None = []
    for s in range(n_shards):
        rec = store.shard_record(s)
        skipped.extend(rec.get("skipped", []))
        embed_s += rec.get("embed_s", 0.0)
        n += rec["rows"]["embeddings"]
    with replacing(path) as tmp:  # fsynced, renamed, the rename made durable
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim))
        at = 0
        for s in range(n_shards):
            t = store.read_shard(s, "embeddings")
            if len(t):
                out[at : at + len(t)] = np.stack(t["embedding"].to_numpy()).astype(np.float32)
            at += len(t)
            ids.extend(t["id"].tolist())
            captions.extend(t["caption"].tolist())
            if locations is not None and set(LOCATION_COLUMNS) <= set(t.columns):
                locations.append(t[LOCATION_COLUMNS])
            else:
                locations = None
        out.flush()
        del out
    loc = pd.concat(locations, ignore_index=True) if locations else None
    return np.load(path, mmap_mode="r", allow_pickle=False), ids, captions, skipped, embed_s, loc
