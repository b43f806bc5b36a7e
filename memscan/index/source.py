"""Streaming a training set in batches, whatever its layout, without holding it in memory.

Layouts are told apart in one place, :func:`memscan.data.training.list_source` (a folder of
images, a CSV/Parquet manifest, webdataset ``.tar`` shards, img2dataset's parquet+files layout);
this module decodes such a listing.
Each image is decoded once and resized to every size asked for (e.g. the embedder's input and
the pixel-check resolution). Unreadable images are reported in ``skipped``, never fatal.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from memscan.data.images import to_array
from memscan.data.webdataset import open_sample
from memscan.errors import InputError


def _decode(entry, sizes: Sequence[tuple[int, int]], channels: int):
    try:
        with open_sample(entry) as im:
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
