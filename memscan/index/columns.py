"""Per-row columns of an index kept as Arrow arrays, not Python objects.

A loaded index holds one id, caption and location per training image. As Python lists (and a
pandas table of Python strings) that cost ~0.5–1 KB a row — 80–160 GB per process at LAION's 160M
images. :class:`StringColumn` keeps a column as an Arrow array instead: memory-mapped from the
index's ``rows.arrow`` (shared by every process of a node through the page cache, like the
embeddings), or read from Parquet (its bytes and offsets only, ~len + 4 bytes a row). It reads
like a list of ``str``: ``len``, ``column[i]``, ``column[a:b]`` (a list), ``column[[i, j]]`` (a
list), iteration, ``==`` with a list; :meth:`StringColumn.find` looks up a value by binary search
over a sort order built on first use (4 bytes a row below 2³² rows).

Examples
--------
>>> import pyarrow as pa
>>> c = StringColumn(pa.array(["t2", "t0", "t1"]))
>>> len(c), c[0], c[1:], c[[2, 0]], c == ["t2", "t0", "t1"], c.find("t1"), c.find("nope")
(3, 't2', ['t0', 't1'], ['t1', 't2'], True, 2, None)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: Values converted to Python at once while iterating a column.
ITER_BLOCK = 1 << 16


class StringColumn(Sequence):
    """A read-only column of strings backed by an Arrow (chunked) array (module docstring).
    Nulls read as ``""``."""

    def __init__(self, array):
        if isinstance(array, StringColumn):
            array = array.array
        if not isinstance(array, pa.ChunkedArray):
            array = pa.chunked_array([array])
        if array.null_count:
            array = pc.fill_null(array, "")
        self.array = array
        self._order: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.array[i].to_pylist()
        if isinstance(i, (int, np.integer)) and not isinstance(i, bool):
            n = len(self.array)
            j = int(i) + n if i < 0 else int(i)
            if not 0 <= j < n:
                raise IndexError(f"row {i} of a column of {n}")
            return self.array[j].as_py()
        rows = np.asarray(i, np.int64)
        if rows.size and (rows.min() < -len(self) or rows.max() >= len(self)):
            raise IndexError(f"rows out of range for a column of {len(self)}")
        return self.array.take(pa.array(np.where(rows < 0, rows + len(self), rows))).to_pylist()

    def __iter__(self) -> Iterator[str]:
        for chunk in self.array.chunks:
            for s in range(0, len(chunk), ITER_BLOCK):
                yield from chunk[s : s + ITER_BLOCK].to_pylist()

    def __eq__(self, other) -> bool:
        if isinstance(other, StringColumn):
            return len(self) == len(other) and self.array.equals(other.array)
        if isinstance(other, (list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable-looking, like a list

    def __repr__(self) -> str:
        head = self[: min(3, len(self))]
        return f"StringColumn({len(self)} rows: {head}{' …' if len(self) > 3 else ''})"

    def tolist(self) -> list[str]:
        return self.array.to_pylist()

    def find(self, value: str) -> int | None:
        """The row holding ``value`` (the first in sort order when repeated), or None: a binary
        search over the column's sort order, built on first use."""
        if self._order is None:
            order = pc.sort_indices(self.array).to_numpy()
            self._order = order.astype(np.uint32 if len(order) < 2**32 else np.int64)
        lo, hi = 0, len(self._order)
        while lo < hi:  # the first position whose value is ≥ ``value`` (UTF-8 order = code points)
            mid = (lo + hi) // 2
            if self.array[int(self._order[mid])].as_py() < value:
                lo = mid + 1
            else:
                hi = mid
        if lo < len(self._order) and self.array[int(self._order[lo])].as_py() == value:
            return int(self._order[lo])
        return None


def column_of(values) -> Sequence:
    """``values`` as a read-only sequence without copying an Arrow-backed one: a
    :class:`StringColumn` for Arrow data (an Arrow array, a pandas Series of an Arrow dtype), a
    list otherwise."""
    if isinstance(values, (StringColumn, list)):
        return values
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return StringColumn(values)
    arrow = getattr(getattr(values, "array", None), "__arrow_array__", None)
    if arrow is not None and hasattr(values, "dtype") and type(values.dtype).__name__ == "ArrowDtype":
        return StringColumn(arrow())
    return list(values)


def int_column(values) -> np.ndarray:
    """``values`` (a pandas Series, Arrow data) as an int64 numpy array — zero-copy for a
    memory-mapped Arrow column of one chunk without nulls."""
    arrow = getattr(getattr(values, "array", None), "__arrow_array__", None)
    if arrow is not None and type(getattr(values, "dtype", None)).__name__ == "ArrowDtype":
        values = arrow()
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    if isinstance(values, pa.Array):
        if values.null_count:
            values = pc.fill_null(values, -1)
        return values.cast(pa.int64()).to_numpy(zero_copy_only=False)
    return np.asarray(values, np.int64)
