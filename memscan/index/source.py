"""Streaming a training set in batches, whatever its layout, without holding it in memory.

Layouts (see :mod:`memscan.data.training` and :mod:`memscan.data.webdataset`): a folder of
images, a CSV/Parquet manifest, webdataset ``.tar`` shards, img2dataset's parquet+files layout.
Each image is decoded once and resized to every size asked for (e.g. the embedder's input and
the pixel-check resolution). Unreadable images are reported in ``skipped``, never fatal.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from memscan.data.images import to_array
from memscan.errors import InputError


@dataclass
class SourceListing:
    """The entries of a training set (nothing decoded yet) and what could not be listed."""

    source: str
    entries: list
    skipped: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)

    @property
    def ids(self) -> list[str]:
        return [e.id for e in self.entries]

    @property
    def captions(self) -> list[str]:
        return [e.caption for e in self.entries]


def list_source(train: str | Path) -> SourceListing:
    """List a training set of any supported layout.

    Examples
    --------
    >>> import tempfile
    >>> from memscan.synthetic import write_training_set
    >>> d = tempfile.mkdtemp()
    >>> _ = write_training_set(d, 3, size=8)
    >>> list_source(d).ids
    ['t0000', 't0001', 't0002']
    """
    from memscan.data import webdataset
    from memscan.data.training import list_training_set

    p = Path(train)
    if p.exists() and webdataset.detect_layout(p) is not None:
        entries, problems = webdataset.list_samples(p)
        skipped = [q for q in problems if not q.get("kept")]
        warnings = [{k: v for k, v in q.items() if k != "kept"} for q in problems if q.get("kept")]
        return SourceListing(str(train), entries, skipped, warnings)
    return SourceListing(str(train), list_training_set(p))


def _open(entry) -> Image.Image:
    from memscan.data.webdataset import TarSample

    if isinstance(entry, TarSample):
        im = Image.open(io.BytesIO(entry.read_bytes()))
    else:
        im = Image.open(entry.path)
    im.load()
    return im


def _decode(entry, sizes: Sequence[tuple[int, int]], channels: int):
    try:
        with _open(entry) as im:
            return [to_array(im, size, channels) for size in sizes]
    except Exception as exc:  # PIL raises many types on corrupt data; all are a skip
        where = f"{entry.path}:{entry.member}" if hasattr(entry, "member") else str(entry.path)
        return {"id": entry.id, "path": where, "reason": f"{type(exc).__name__}: {exc}"[:200]}


def iter_batches(
    entries: Sequence,
    sizes: Sequence[tuple[int, int]],
    channels: int = 3,
    batch_size: int = 256,
    *,
    skipped: list[dict] | None = None,
    workers: int = 2,
) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
    """Yield ``(positions, [uint8 B×H×W×C per size])`` over ``entries`` in order.

    ``positions`` are indices into ``entries`` of the images that decoded; the others are
    appended to ``skipped``. Decoding runs on ``workers`` threads (PIL releases the GIL).
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be ≥ 1, got {batch_size}")
    sizes = [tuple(int(v) for v in s) for s in sizes]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(entries), batch_size):
            chunk = entries[start : start + batch_size]
            decoded = list(pool.map(lambda e: _decode(e, sizes, channels), chunk))
            pos, per_size = [], [[] for _ in sizes]
            for k, d in enumerate(decoded):
                if isinstance(d, dict):
                    if skipped is not None:
                        skipped.append(d)
                    continue
                pos.append(start + k)
                for s, arr in enumerate(d):
                    per_size[s].append(arr)
            if not pos:
                continue
            yield np.asarray(pos, np.int64), [np.stack(a) for a in per_size]
