"""Where each indexed training image lives, and reading retrieved images by random access.

``memscan index`` records, row by row beside the embeddings, where every image it indexed lives
(``locations.parquet``): the image file's ``path`` (folder, manifest, img2dataset layouts), or the
webdataset shard's ``path`` with the image ``member``'s name, the ``offset`` of its data in the
tar and its ``size`` in bytes. Verification through the index (:mod:`memscan.extraction.verify_index`)
then decodes just the images the index retrieved: a tar member is one ``seek`` + one ``read`` of
``size`` bytes, never a scan of its shard. Images are decoded exactly as
:func:`memscan.data.training.load_training_set` decodes them (same reader, same resize), so the
pixels compared are the same.

Examples
--------
>>> import tempfile
>>> from memscan.data.training import list_source
>>> from memscan.synthetic import write_training_set
>>> d = tempfile.mkdtemp()
>>> _ = write_training_set(d, 3, size=8)
>>> reader = SourceReader.from_listing(list_source(d))
>>> kept, images, skipped = reader.read([2, 0], size=(8, 8))
>>> kept.tolist(), images.shape, skipped, reader.images_read
([2, 0], (2, 8, 8, 3), [], 2)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from memscan.data.training import Entry, list_source
from memscan.data.webdataset import TarSample, read_sample
from memscan.errors import InputError
from memscan.index.columns import StringColumn, column_of, int_column

#: Columns of ``locations.parquet`` (row i ↔ embedding i): ``offset``/``size`` are -1 for image files.
LOCATION_COLUMNS = ["path", "member", "offset", "size"]


def entry_location(entry) -> dict:
    """The location record of one listed training image (a tar member, or a file)."""
    if isinstance(entry, TarSample):
        return {"path": str(Path(entry.path).resolve()), "member": entry.member, "offset": int(entry.offset),
                "size": int(entry.size)}  # fmt: skip
    return {"path": str(Path(entry.path).resolve()), "member": "", "offset": -1, "size": -1}


def locations_table(entries: Sequence) -> pd.DataFrame:
    """``LOCATION_COLUMNS`` for ``entries``, in order."""
    rows = [entry_location(e) for e in entries]
    df = pd.DataFrame(rows, columns=LOCATION_COLUMNS)
    return df.astype({"path": str, "member": str, "offset": "int64", "size": "int64"})


class SourceReader:
    """Random access to the images of an indexed training set, by index row.

    Parameters
    ----------
    ids, captions : per row
    locations : a ``LOCATION_COLUMNS`` table, row-aligned (``None`` for rows not found are
        given as ``path == ""``: reading them is a named skip)
    workers : decoding threads

    Attributes
    ----------
    bytes_read : bytes read from the source so far (tar members: their ``size``; files: their size)
    images_read : images decoded so far
    """

    def __init__(self, ids: Sequence[str], captions: Sequence[str], locations: pd.DataFrame, workers: int = 2):
        if len(locations) != len(ids):
            raise ValueError(f"{len(locations)} locations for {len(ids)} ids")
        # Arrow-backed columns (a loaded index's, memory-mapped) are kept as they are: no copy
        self.ids = column_of(ids)
        self.captions = column_of(captions)
        self.paths = _strings(locations["path"])
        self.members = _strings(locations["member"])
        self.offsets = int_column(locations["offset"])
        self.sizes = int_column(locations["size"])
        self.workers = workers
        self.bytes_read = 0
        self.images_read = 0

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_listing(cls, listing, ids: Sequence[str] | None = None, captions=None, workers: int = 2) -> SourceReader:
        """A reader over a listed source (:func:`memscan.data.training.list_source`); with ``ids``
        (an index's rows), row i is the listed image of ``ids[i]`` (absent: a named skip when read)."""
        if ids is None:
            return cls(listing.ids, listing.captions, locations_table(listing.entries), workers)
        by_id = {e.id: e for e in listing.entries}
        rows = [entry_location(by_id[i]) if i in by_id else {"path": "", "member": "", "offset": -1, "size": -1}
                for i in ids]  # fmt: skip
        caps = captions if captions is not None else [by_id[i].caption if i in by_id else "" for i in ids]
        return cls(ids, caps, pd.DataFrame(rows, columns=LOCATION_COLUMNS), workers)

    def item(self, row: int):
        """The reader's record of ``row``: a :class:`TarSample` or an :class:`Entry`."""
        path = Path(self.paths[row])
        if self.offsets[row] >= 0:
            return TarSample(self.ids[row], path, self.captions[row], self.members[row], int(self.offsets[row]),
                             int(self.sizes[row]))  # fmt: skip
        return Entry(self.ids[row], path, self.captions[row])

    def _read_one(self, row: int, size, channels: int):
        where = f"{self.paths[row]}:{self.members[row]}" if self.members[row] else self.paths[row]
        if not self.paths[row]:
            return {"id": self.ids[row], "path": "", "reason": "not in the training source (listed by the index only)"}
        item = self.item(row)
        try:
            arr = read_sample(item, size, channels)
            nbytes = int(self.sizes[row]) if self.offsets[row] >= 0 else os.path.getsize(self.paths[row])
        except Exception as exc:  # PIL raises many types on corrupt data; all are a skip
            return {"id": self.ids[row], "path": where, "reason": f"{type(exc).__name__}: {exc}"[:200]}
        return arr, nbytes

    def read(self, rows: Sequence[int], size: tuple[int, int] | None, channels: int = 3):
        """Decode ``rows`` at ``size`` (H, W) and ``channels``.

        Returns ``(kept rows, uint8 K×H×W×C, skipped)``: ``kept`` are the rows that decoded, in
        the order asked; ``skipped`` names the others (``id``, ``path``, ``reason``).
        """
        rows = [int(r) for r in rows]
        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            decoded = list(pool.map(lambda r: self._read_one(r, size, channels), rows))
        kept, images, skipped = [], [], []
        for r, d in zip(rows, decoded):
            if isinstance(d, dict):
                skipped.append(d)
                continue
            kept.append(r)
            images.append(d[0])
            self.bytes_read += d[1]
            self.images_read += 1
        h, w = size if size is not None else (0, 0)
        stack = np.stack(images) if images else np.zeros((0, h, w, channels), np.uint8)
        return np.asarray(kept, np.int64), stack, skipped


def _strings(series) -> Sequence[str]:
    """A location column as strings: Arrow-backed as it is (nulls read as ""), else a list."""
    col = column_of(series)
    return col if isinstance(col, StringColumn) else series.fillna("").astype(str).tolist()


def training_reader(index, train: str | None = None) -> SourceReader:
    """Random access to the images of ``index`` (a :class:`~memscan.index.faiss_index.TrainingIndex`):
    through its recorded locations, or by listing ``train`` (or the source the index recorded)
    when it has none or ``train`` is given."""
    if train is None and index.locations is not None:
        paths = index.locations["path"]
        if len(paths) and not Path(str(paths.iloc[0])).exists():
            raise InputError(
                f"the training images the index {index.meta.get('source')!r} was built from are not where it "
                f"recorded them ({paths.iloc[0]} is missing)",
                "pass the training set's current location (--train; TRAIN for `memscan candidates`)",
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
