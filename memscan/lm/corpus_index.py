"""An exact-substring index over a training corpus: a suffix array of token ids (or bytes),
memory-mapped, answering ``count``, ``locate`` and ``longest_match`` by binary search.

The attacks that start from nothing (sample, rank, confirm; Carlini et al. 2021, Nasr et al.
2023) and the duplication → memorization curve (Carlini et al. 2022, Kandpal et al. 2022) need to
know, fast, whether and how often a token sequence occurs in the training corpus. The index is
the one of infini-gram (Liu et al. 2024) and of Nasr et al.: the corpus's documents concatenated,
and the sorted list of all its suffixes.

Layout of an index folder (a run directory of kind ``lm-index``: ``memscan lm index``)::

    IDX/
      index.json          format version, mode (tokens | bytes), tokenizer (name, vocab sha256,
                          vocab size) or null, n_docs, n_tokens, dtypes, separator, the shards
      documents.parquet   doc (global document number), train_id, n_tokens, shard
      sa/00000/           one shard: tokens.npy, sa.npy, doc_starts.npy
      manifest.json, shards/, run.log   the run (``--resume`` after a kill)

- ``tokens.npy``: the shard's documents, each followed by the **separator** (the largest value of
  the dtype), in the smallest unsigned dtype that holds every token id and the separator —
  ``uint8`` for a vocabulary ≤ 255, ``>u2`` for ≤ 65,535 (byte mode: 256 values + separator),
  else ``>u4`` — stored **big-endian**, so that comparing the raw bytes of two token strings
  compares them lexicographically as token sequences.
- ``sa.npy``: the suffix array of the shard (``<u4`` when the shard has < 2^32 positions, else
  ``<u8``): position ``sa[i]`` starts the i-th smallest suffix. Built by libdivsufsort
  (``pydivsufsort``) over the big-endian bytes; the suffixes that start inside a token are
  dropped, leaving the token suffixes in token-lexicographic order.
- ``doc_starts.npy``: int64, the position where each document starts, and the shard length last.

So a ``>u2`` corpus takes 2 + 4 = 6 bytes a token on disk (infini-gram: about 7).

**Document boundaries.** A query never holds the separator (a query token outside the
vocabulary matches nothing), so no match can run across the end of a document: a match never
spans two documents. A location is (document, offset), the document numbered from 0 across the
whole corpus in build order and the offset counted in tokens (bytes) from its start.

**Shards.** A build with ``shard_tokens`` starts a new shard before the document that would take
the current one past that many tokens (a document longer than ``shard_tokens`` is a shard of its
own; documents are never split). Queries run on every shard: counts add up, locations are
concatenated with global document numbers, the longest match is the longest over shards.

**Queries** (each shard, in Python, on the memory-mapped arrays): the suffixes beginning with a
query q of m tokens form one contiguous range of the suffix array, found by two binary searches
(O(m log n) byte comparisons); ``count`` is its size, ``locate`` its positions mapped to
documents. ``longest_match(q)``: the longest **prefix** of q that occurs (its length ℓ and one
occurrence) — the suffix sharing the longest prefix with q is next to q's insertion point in the
sorted suffixes, so one binary search and two comparisons find it. ``longest_substring_match(q)``:
the longest run of consecutive tokens of q, anywhere in q, that occurs in the corpus — the
longest prefix match from every start of q (Nasr et al. 2023 and Carlini et al. 2021 confirm a
generated sample when it shares ≥ 50 consecutive tokens with the corpus: that run, not a prefix).

An empty query is refused by ``count`` and ``locate`` (the empty sequence occurs everywhere, which
is never what a caller means); its longest match is ``(0, -1, -1)``.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from memscan.errors import InputError, MemscanError
from memscan.store import atomic_write_json, fsync_dir, open_run

KIND = "lm-index"
FORMAT_VERSION = 1
#: Tokens per shard by default: the build's peak memory is about 16 bytes a token for ``>u2``
#: ids (≈ 2 GiB; measured: bench/lm_index.py), about 26 for ``>u4``.
DEFAULT_SHARD_TOKENS = 1 << 27
SHARD_DIR = "sa"
_TOKEN_DTYPES = (np.dtype("u1"), np.dtype(">u2"), np.dtype(">u4"))


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest big-endian unsigned dtype holding ids ``0 … vocab_size − 1`` and a separator.

    >>> [str(token_dtype(v)) for v in (255, 256, 65535, 65536)]
    ['uint8', '>u2', '>u2', '>u4']
    """
    for dt in _TOKEN_DTYPES:
        if vocab_size <= np.iinfo(dt).max:
            return dt
    raise InputError(f"vocabulary size {vocab_size} exceeds 2^32 − 1", "token ids must fit in 32 bits")


def suffix_array(text: np.ndarray) -> np.ndarray:
    """The suffix array of a 1-D array of big-endian unsigned token ids (libdivsufsort).

    libdivsufsort sorts the suffixes of a byte string. Over the big-endian bytes of ``text``,
    byte order equals token order, so the byte suffixes that start on a token boundary (positions
    divisible by the item size) are the token suffixes in token-lexicographic order.

    Returns ``<u4`` positions when ``len(text) < 2^32``, else ``<u8``.

    >>> suffix_array(np.array([2, 1, 2, 1, 0], dtype=">u2")).tolist()  # 0 < 1,0 < 1,2,1,0 < 2,1,0 < 2,1,2,1,0
    [4, 3, 1, 2, 0]
    """
    from pydivsufsort import divsufsort

    w = text.dtype.itemsize
    if w > 1 and text.dtype.byteorder not in (">",) and not (text.dtype.byteorder == "=" and sys.byteorder == "big"):
        raise ValueError(f"suffix_array needs big-endian ids, got {text.dtype}")
    raw = np.ascontiguousarray(text).view(np.uint8)
    out = divsufsort(raw)  # int32 (or int64 past 2^31 bytes): every byte suffix
    dtype = np.dtype("<u4") if len(text) < (1 << 32) else np.dtype("<u8")
    if w == 1:
        return out.view(dtype) if out.itemsize == dtype.itemsize else out.astype(dtype)
    # 1. keep the byte suffixes on a token boundary (position divisible by w), chunk by chunk so
    #    that the selection needs no full-size temporary beside libdivsufsort's output
    sa = np.empty(len(text), dtype=dtype)
    shift, filled = w.bit_length() - 1, 0
    for start in range(0, len(out), _CHUNK):
        chunk = out[start : start + _CHUNK]
        kept = chunk[(chunk & (w - 1)) == 0]
        # 2. byte position → token position
        sa[filled : filled + len(kept)] = kept >> shift
        filled += len(kept)
    if filled != len(text):  # pragma: no cover - libdivsufsort returned something else
        raise RuntimeError(f"suffix array has {filled} token suffixes, expected {len(text)}")
    return sa


#: Byte suffixes filtered at a time by :func:`suffix_array`.
_CHUNK = 1 << 22


# ---- the index -----------------------------------------------------------------------------------


@dataclass
class _Shard:
    """One memory-mapped shard and the raw bytes of its tokens."""

    directory: Path
    tokens: np.ndarray
    sa: np.ndarray
    doc_starts: np.ndarray
    doc_offset: int
    raw: _OffsetBytes = field(repr=False)
    sa_view: memoryview = field(repr=False)

    @property
    def n(self) -> int:
        return len(self.sa)


@dataclass
class Match:
    """The longest run of a query's tokens found in the corpus (``longest_substring_match``)."""

    length: int
    document: int
    offset: int
    query_start: int

    def __iter__(self):
        return iter((self.length, self.document, self.offset, self.query_start))


class CorpusIndex:
    """An exact-substring index over a corpus (see the module docstring).

    Build with :meth:`build` (or ``memscan lm index``), open with :meth:`open`. Queries are a
    1-D integer array / list of token ids, ``bytes`` in byte mode, or ``str`` (UTF-8 in byte
    mode; in token mode tokenized with the ``tokenizer`` given to :meth:`open`, whose vocabulary
    must be the recorded one).

    Examples
    --------
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> idx = CorpusIndex.build([b"to be or not to be", b"be quick"], f"{d}/idx")
    >>> idx.count(b"be"), idx.locate(b"be").tolist()
    (3, [[0, 3], [0, 16], [1, 0]])
    >>> idx.count(b"be to"), idx.longest_match(b"not to bee")
    (0, (9, 0, 9))
    """

    def __init__(self, root: Path, meta: dict, shards: list[_Shard], documents: pd.DataFrame | None):
        self.root = root
        self.meta = meta
        self.shards = shards
        self._documents = documents
        self.mode: str = meta["mode"]
        self.tokenizer_record: dict | None = meta.get("tokenizer")
        self.dtype = np.dtype(meta["dtypes"]["tokens"])
        self.separator = int(meta["separator"])
        self.n_docs = int(meta["n_docs"])
        self.n_tokens = int(meta["n_tokens"])
        self._encode = None

    def __repr__(self) -> str:
        return (
            f"CorpusIndex({str(self.root)!r}, mode={self.mode}, docs={self.n_docs}, tokens={self.n_tokens}, "
            f"shards={len(self.shards)})"
        )

    def __len__(self) -> int:
        return self.n_tokens

    def __reduce__(self):
        # memory maps do not pickle: a copy (e.g. sent to a Ray worker) reopens the folder
        return (CorpusIndex.open, (str(self.root),))

    # ---- build / open ------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        docs: Iterable,
        out: str | Path,
        *,
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
        vocab_size: int | None = None,
        tokenizer: dict | None = None,
        resume: bool = False,
        stop_after_shards: int | None = None,
    ) -> CorpusIndex:
        """Index ``docs`` (each a 1-D integer array / list, or ``bytes``) into the folder ``out``.

        Parameters
        ----------
        docs : the documents, in order (a list, or any iterable: the build streams it once)
        out : the index folder, a run directory of kind ``lm-index``
        shard_tokens : tokens per shard at most (a longer document is a shard of its own)
        vocab_size : token ids are in ``0 … vocab_size − 1`` (token mode); ``None``: from the
            largest id when ``docs`` is a list, else 2^32 − 1 (``>u4`` on disk)
        tokenizer : the tokenizer record (``name``, ``vocab_sha256``, ``vocab_size``) to keep
        resume : finish a killed build in ``out`` (give the same documents again)
        stop_after_shards : stop after this many new shards (tests of resume)
        """
        if isinstance(docs, (list, tuple)) and docs and not isinstance(docs[0], (bytes, bytearray, memoryview)):
            if vocab_size is None and tokenizer is None:
                vocab_size = 1 + max((int(np.max(d)) for d in docs if len(d)), default=0)
        named = ((str(i), d) for i, d in enumerate(docs))
        return build_corpus_index(
            named,
            out,
            shard_tokens=shard_tokens,
            vocab_size=vocab_size,
            tokenizer=tokenizer,
            resume=resume,
            stop_after_shards=stop_after_shards,
        )

    @classmethod
    def open(cls, path: str | Path, *, tokenizer=None) -> CorpusIndex:
        """Open the index folder ``path`` (memory-mapped; nothing is read until queried).

        ``tokenizer``: an object with ``encode(text) -> ids`` (a causal LM of
        :mod:`memscan.generators.causal_lm`) used for ``str`` queries in token mode; its vocabulary
        hash must equal the recorded one (:func:`check_tokenizer`).
        """
        root = Path(path)
        meta_path = root / "index.json"
        if not meta_path.is_file():
            hint = (
                "the build did not finish: rerun `memscan lm index ... --resume`"
                if (root / "manifest.json").is_file()
                else "build one with `memscan lm index CORPUS --out IDX`"
            )
            raise MemscanError(f"{root} is not a corpus index (no index.json)", hint)
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("format") != "memscan-corpus-index":
                raise ValueError("not a memscan corpus index")
            if int(meta.get("format_version", 0)) > FORMAT_VERSION:
                raise ValueError(f"format version {meta['format_version']} is newer than this memscan's")
            np.dtype(meta["dtypes"]["tokens"])
        except (ValueError, KeyError, TypeError) as exc:
            raise MemscanError(f"{meta_path} is damaged ({exc})", "rebuild the index") from None
        shards = []
        for s in meta["shards"]:
            shards.append(_open_shard(root / s["directory"], s, meta))
        documents = None
        index = cls(root, meta, shards, documents)
        if tokenizer is not None:
            check_tokenizer(index, tokenizer)
            index._encode = tokenizer.encode
        return index

    @property
    def documents(self) -> pd.DataFrame:
        """doc, train_id, n_tokens, shard: one row per document (read on first use)."""
        if self._documents is None:
            path = self.root / "documents.parquet"
            try:
                self._documents = pd.read_parquet(path)
            except Exception as exc:  # noqa: BLE001 - any read failure is a damaged index
                raise MemscanError(f"cannot read {path} ({exc})", "rebuild the index") from None
        return self._documents

    # ---- queries -----------------------------------------------------------------------------
    def ids(self, query) -> np.ndarray:
        """A query as int64 token ids (see the class docstring for what a query may be)."""
        if isinstance(query, str):
            if self.mode == "bytes":
                return np.frombuffer(query.encode("utf-8"), dtype=np.uint8).astype(np.int64)
            if self._encode is None:
                raise InputError(
                    "a text query on a token index needs its tokenizer",
                    "open it with CorpusIndex.open(path, tokenizer=model), or give token ids",
                )
            return np.asarray(self._encode(query), dtype=np.int64).ravel()
        if isinstance(query, (bytes, bytearray, memoryview)):
            if self.mode != "bytes":
                raise InputError("a bytes query on a token index", "give token ids (or text with a tokenizer)")
            return np.frombuffer(bytes(query), dtype=np.uint8).astype(np.int64)
        arr = np.asarray(query)
        if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
            raise InputError(f"a query must be a 1-D sequence of token ids, got {arr.dtype} {arr.shape}")
        return arr.astype(np.int64, copy=False)

    def _key(self, q: np.ndarray) -> tuple[bytes, int]:
        """(the big-endian bytes of the longest valid prefix of ``q``, its length in tokens):
        a token outside ``0 … separator − 1`` occurs nowhere in the corpus."""
        bad = np.flatnonzero((q < 0) | (q >= self.separator))
        valid = int(bad[0]) if bad.size else len(q)
        return q[:valid].astype(self.dtype).tobytes(), valid

    def _range(self, shard: _Shard, key: bytes) -> tuple[int, int]:
        """[lo, hi): the suffixes of ``shard`` that begin with ``key``."""
        raw, sa, w, m = shard.raw, shard.sa_view, self.dtype.itemsize, len(key)
        # 1. lower bound: the first suffix whose first m bytes are ≥ key
        lo, hi = 0, shard.n
        while lo < hi:
            mid = (lo + hi) >> 1
            p = sa[mid] * w
            if raw[p : p + m] < key:
                lo = mid + 1
            else:
                hi = mid
        first = lo
        # 2. upper bound: the first suffix whose first m bytes are > key
        hi = shard.n
        while lo < hi:
            mid = (lo + hi) >> 1
            p = sa[mid] * w
            if raw[p : p + m] <= key:
                lo = mid + 1
            else:
                hi = mid
        return first, lo

    def _nonempty(self, query) -> np.ndarray:
        q = self.ids(query)
        if len(q) == 0:
            raise InputError("an empty query occurs everywhere", "give at least one token (byte)")
        return q

    def count(self, query) -> int:
        """How many times ``query`` occurs in the corpus (overlapping occurrences count)."""
        q = self._nonempty(query)
        key, valid = self._key(q)
        if valid < len(q):  # a token outside the vocabulary occurs nowhere
            return 0
        return self._count_key(key)

    def _count_key(self, key: bytes) -> int:
        total = 0
        for shard in self.shards:
            lo, hi = self._range(shard, key)
            total += hi - lo
        return total

    def counts(self, queries) -> np.ndarray:
        """``count`` of each query (int64)."""
        return np.asarray([self.count(q) for q in queries], dtype=np.int64)

    def locate(self, query, *, limit: int | None = None) -> np.ndarray:
        """Every occurrence of ``query``: int64 rows (document, offset), sorted.

        ``limit`` caps the rows read per shard (``None``: all)."""
        q = self._nonempty(query)
        key, valid = self._key(q)
        if valid < len(q):
            return np.zeros((0, 2), dtype=np.int64)
        parts = []
        for shard in self.shards:
            lo, hi = self._range(shard, key)
            if limit is not None:
                hi = min(hi, lo + limit)
            if hi > lo:
                parts.append(_to_locations(shard, np.asarray(shard.sa[lo:hi], dtype=np.int64)))
        if not parts:
            return np.zeros((0, 2), dtype=np.int64)
        rows = np.concatenate(parts)
        return rows[np.lexsort((rows[:, 1], rows[:, 0]))]

    def longest_match(self, query) -> tuple[int, int, int]:
        """The longest prefix of ``query`` that occurs in the corpus: ``(length, document, offset)``
        of one of its occurrences; ``(0, -1, -1)`` when not even the first token occurs."""
        key, valid = self._key(self.ids(query))
        best = (0, -1, -1)
        if valid == 0:
            return best
        w = self.dtype.itemsize
        for shard in self.shards:
            raw, sa, m = shard.raw, shard.sa_view, len(key)
            # 1. q's insertion point among the sorted suffixes
            lo, hi = 0, shard.n
            while lo < hi:
                mid = (lo + hi) >> 1
                p = sa[mid] * w
                if raw[p : p + m] < key:
                    lo = mid + 1
                else:
                    hi = mid
            # 2. the longest common prefix is with one of its two neighbours
            for i in (lo - 1, lo):
                if 0 <= i < shard.n:
                    p = sa[i]
                    length = _common_tokens(raw[p * w : p * w + m], key, w)
                    if length > best[0]:
                        doc, off = _to_locations(shard, np.asarray([p], dtype=np.int64))[0]
                        best = (length, int(doc), int(off))
        return best

    def longest_substring_match(self, query, *, min_length: int = 0) -> Match:
        """The longest run of consecutive tokens of ``query`` (starting anywhere in it) that occurs
        in the corpus, and one occurrence: ``Match(length, document, offset, query_start)``.

        Computed as the longest prefix match from every start of ``query`` (skipping starts that
        cannot beat the best so far); ``(0, -1, -1, -1)`` when no token occurs. ``min_length``:
        stop as soon as a run this long is found (confirmation needs only ≥ 50 tokens).
        """
        q = self.ids(query)
        best = Match(0, -1, -1, -1)
        for start in range(len(q)):
            if len(q) - start <= best.length:
                break
            length, doc, off = self.longest_match(q[start:])
            if length > best.length:
                best = Match(length, doc, off, start)
                if min_length and length >= min_length:
                    break
        return best

    def close(self) -> None:
        for shard in self.shards:
            shard.sa_view.release()
            shard.raw.close()


def _common_tokens(a: bytes, b: bytes, w: int) -> int:
    """Number of leading whole tokens (``w`` bytes each) that ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n // w
    x = np.frombuffer(a[:n], dtype=np.uint8)
    y = np.frombuffer(b[:n], dtype=np.uint8)
    return int(np.flatnonzero(x != y)[0]) // w


def _to_locations(shard: _Shard, pos: np.ndarray) -> np.ndarray:
    """Shard positions → (global document, offset) rows."""
    doc = np.searchsorted(shard.doc_starts, pos, side="right") - 1
    return np.stack([doc + shard.doc_offset, pos - shard.doc_starts[doc]], axis=1).astype(np.int64)


def _open_shard(directory: Path, record: dict, meta: dict) -> _Shard:
    """Memory-map one shard, checking its files against ``index.json``; one clear error if not."""
    want_tok = np.dtype(meta["dtypes"]["tokens"])
    arrays = {}
    for name in ("tokens", "sa", "doc_starts"):
        path = directory / f"{name}.npy"
        try:
            arrays[name] = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise MemscanError(f"corpus index file {path} is missing or damaged ({exc})", "rebuild the index") from None
    tokens, sa, starts = arrays["tokens"], arrays["sa"], arrays["doc_starts"]
    length = int(record["n_tokens"]) + int(record["n_docs"])
    problems = []
    if tokens.dtype != want_tok or tokens.shape != (length,):
        problems.append(f"tokens.npy is {tokens.dtype} {tokens.shape}, index.json says {want_tok} ({length},)")
    if sa.dtype not in (np.dtype("<u4"), np.dtype("<u8")) or sa.shape != (length,):
        problems.append(f"sa.npy is {sa.dtype} {sa.shape}, expected ({length},) positions")
    if (
        starts.dtype != np.int64
        or starts.shape != (int(record["n_docs"]) + 1,)
        or (len(starts) and starts[-1] != length)
    ):
        problems.append(f"doc_starts.npy is {starts.dtype} {starts.shape}, inconsistent with index.json")
    if problems:
        raise MemscanError(f"corpus index shard {directory} is damaged: {'; '.join(problems)}", "rebuild the index")
    fh = open(directory / "tokens.npy", "rb")
    try:
        raw = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    finally:
        fh.close()
    # the token bytes start at the .npy data offset: a view that slices to ``bytes``
    raw_view = _OffsetBytes(raw, int(tokens.offset))
    sa_plain = np.asarray(sa)
    return _Shard(directory, tokens, sa, np.asarray(starts), int(record["doc_offset"]), raw_view, memoryview(sa_plain))


class _OffsetBytes:
    """``mmap`` slices shifted by the .npy header: ``obj[a:b]`` is data bytes a … b − 1."""

    __slots__ = ("_mm", "_off")

    def __init__(self, mm: mmap.mmap, offset: int):
        self._mm, self._off = mm, offset

    def __getitem__(self, s: slice) -> bytes:
        off = self._off
        return self._mm[s.start + off : s.stop + off]

    def close(self) -> None:
        self._mm.close()


# ---- tokenizer records -----------------------------------------------------------------------------


def tokenizer_record(tokenizer) -> dict | None:
    """The ``{name, vocab_sha256, vocab_size}`` record of ``tokenizer``: a dict record, or a causal
    LM (its ``describe()["tokenizer"]``)."""
    if tokenizer is None or isinstance(tokenizer, dict):
        return tokenizer
    from memscan.generators.causal_lm import describe_lm

    rec = describe_lm(tokenizer).get("tokenizer")
    return dict(rec) if isinstance(rec, dict) else None


def check_tokenizer(index: CorpusIndex, tokenizer) -> None:
    """Refuse a model (or tokenizer record) whose vocabulary is not the one the index was built
    with; a byte-mode index accepts any byte-level use but no tokenizer."""
    rec = tokenizer_record(tokenizer)
    sha = (rec or {}).get("vocab_sha256")
    if index.mode == "bytes":
        return
    recorded = (index.tokenizer_record or {}).get("vocab_sha256")
    if recorded is None:
        raise InputError(
            f"the corpus index {index.root} records no tokenizer, so its token ids cannot be checked",
            "rebuild it with `memscan lm index CORPUS --tokenizer MODEL`",
        )
    if sha != recorded:
        theirs = f"{sha[:12]}…" if sha else "none recorded"
        raise InputError(
            f"the model's tokenizer (vocab sha256 {theirs}) is not the corpus index's "
            f"({(index.tokenizer_record or {}).get('name')}, vocab sha256 {recorded[:12]}…)",
            "use the model the index was built for, or rebuild the index with --tokenizer MODEL",
        )


# ---- build -----------------------------------------------------------------------------------------


def _as_document(doc, mode: str | None) -> tuple[np.ndarray, str]:
    if isinstance(doc, (bytes, bytearray, memoryview)):
        arr, kind = np.frombuffer(bytes(doc), dtype=np.uint8), "bytes"
    else:
        arr, kind = np.asarray(doc), "tokens"
        if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
            raise InputError(f"a document must be a 1-D integer array or bytes, got {arr.dtype} {arr.shape}")
    if mode is not None and kind != mode:
        raise InputError("the documents mix bytes and token ids", "give every document in one form")
    return arr, kind


def _shard_digest(tokens: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(tokens).view(np.uint8))).hexdigest()


def _cut_shards(
    named_docs: Iterator[tuple[str, object]], shard_tokens: int, mode: str, dtype: np.dtype, vocab: int
) -> Iterator[list[tuple[str, np.ndarray]]]:
    """Group ``(train_id, doc)`` into shards at document boundaries; yields lists of
    ``(train_id, ids)``, the ids checked against the vocabulary and already in ``dtype`` (so a
    shard held in memory takes its on-disk size, not 8 bytes a token)."""
    buf, size = [], 0
    for train_id, doc in named_docs:
        arr, _ = _as_document(doc, mode)
        # 1. every id in the vocabulary (the separator and beyond can never be stored)
        if len(arr) and mode == "tokens" and (int(arr.min()) < 0 or int(arr.max()) >= vocab):
            bad = int(arr.max()) if int(arr.max()) >= vocab else int(arr.min())
            raise InputError(
                f"document {train_id} holds token id {bad}, outside the vocabulary of {vocab}",
                "give the right --tokenizer (or vocab_size)",
            )
        arr = arr.astype(dtype)
        # 2. a new shard before the document that would take this one past shard_tokens
        if buf and size + len(arr) > shard_tokens:
            yield buf
            buf, size = [], 0
        buf.append((train_id, arr))
        size += len(arr)
    if buf:
        yield buf


def _concatenate(docs: list[tuple[str, np.ndarray]], dtype: np.dtype, separator: int) -> tuple[np.ndarray, np.ndarray]:
    """The shard's text (each document then the separator) and its document starts."""
    lengths = np.asarray([len(a) for _, a in docs], dtype=np.int64)
    starts = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths + 1, out=starts[1:])
    text = np.full(int(starts[-1]), separator, dtype=dtype)
    for (_, arr), s in zip(docs, starts[:-1]):
        text[s : s + len(arr)] = arr
    return text, starts


def build_corpus_index(
    named_docs: Iterable[tuple[str, object]],
    out: str | Path,
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    vocab_size: int | None = None,
    tokenizer: dict | None = None,
    source: dict | None = None,
    resume: bool = False,
    stop_after_shards: int | None = None,
    log=None,
) -> CorpusIndex:
    """Build the index of ``(train_id, document)`` pairs in the run directory ``out``
    (:meth:`CorpusIndex.build` documents the options; ``source`` is recorded in the manifest).

    Each shard is written to a temporary folder, renamed into ``sa/NNNNN`` and then committed
    (its documents table and the sha256 of its tokens); a resumed build re-reads the documents,
    checks each committed shard's digest and rebuilds only the others. ``index.json`` is written
    last: a folder without it is an unfinished build.
    """
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise InputError(f"shard_tokens={shard_tokens!r} must be a positive integer", "e.g. --shard-tokens 100000000")
    started, t_start = time.time(), time.perf_counter()
    root = Path(out)
    if tokenizer is not None and vocab_size is None:
        vocab_size = int(tokenizer.get("vocab_size") or 0) or None
    # 1. the first document says the mode (bytes or token ids), hence the dtype
    it = iter(named_docs)
    head = next(it, None)
    if head is None:
        raise InputError(f"the corpus for {root} holds no document", "give at least one non-empty document")
    _, mode = _as_document(head[1], None)
    if mode == "bytes":
        dtype, vocab, tokenizer = np.dtype(">u2"), 256, None
    else:
        vocab = int(vocab_size) if vocab_size is not None else int(np.iinfo(np.uint32).max)
        dtype = token_dtype(vocab)
    separator = int(np.iinfo(dtype).max)
    shards = _cut_shards(_chain([head], it), shard_tokens, mode, dtype, vocab)
    # 2. the first shard is read before the run starts: bad input there is refused with nothing written
    pending = [next(shards)]
    if not any(len(a) for _, a in pending[0]):  # an all-empty corpus
        second = next(shards, None)
        if second is None:
            raise InputError(f"the corpus for {root} holds no token (every document is empty)", "give some text")
        pending.append(second)
    config = {
        "mode": mode,
        "shard_tokens": shard_tokens,
        "vocab_size": vocab,
        "dtype": dtype.str,
        "tokenizer_sha256": (tokenizer or {}).get("vocab_sha256"),
    }
    with open_run(root, KIND, resume=resume) as run:
        run.start(
            {"config": config, "data": source or {}, "tokenizer": tokenizer}, identity=("config",), started=started
        )
        say = log or run.store.log
        records, n_docs, n_tokens, built = [], 0, 0, 0
        timings = {"read_s": 0.0, "digest_s": 0.0, "suffix_sort_s": 0.0, "write_s": 0.0}
        t_read = t_start  # the first shard was read before the run started
        for s, docs in enumerate(_chain(pending, shards)):
            text, starts = _concatenate(docs, dtype, separator)
            train_ids = [t for t, _ in docs]
            docs.clear()  # the ids live on in ``text``: free the per-document copies before the sort
            t0 = time.perf_counter()
            timings["read_s"] += t0 - t_read  # reading, tokenizing and concatenating the documents
            digest = _shard_digest(text)
            timings["digest_s"] += time.perf_counter() - t0
            rec = {
                "directory": f"{SHARD_DIR}/{s:05d}",
                "n_docs": len(train_ids),
                "n_tokens": int(len(text) - len(train_ids)),
                "doc_offset": n_docs,
                "tokens_sha256": digest,
            }
            if run.store.shard_done(s):
                done = run.store.shard_record(s)
                if done.get("tokens_sha256") != digest or not (root / rec["directory"] / "sa.npy").is_file():
                    raise MemscanError(
                        f"cannot resume {root}: shard {s} of the corpus differs from the killed build's",
                        "resume with the same corpus and options, or start a new build with another --out",
                    )
            else:
                if stop_after_shards is not None and built >= stop_after_shards:
                    return None  # type: ignore[return-value]  # tests of resume: stop here
                t0 = time.perf_counter()
                sort_s, write_s = _write_shard(root, rec["directory"], text, starts)
                timings["suffix_sort_s"] += sort_s
                timings["write_s"] += write_s
                table = pd.DataFrame(
                    {
                        "doc": np.arange(n_docs, n_docs + len(train_ids), dtype=np.int64),
                        "train_id": train_ids,
                        "n_tokens": np.diff(starts) - 1,
                        "shard": np.full(len(train_ids), s, dtype=np.int64),
                    }
                )
                run.store.commit_shard(s, {"documents": table}, rec)
                built += 1
                say(f"{KIND}: shard {s}: {len(train_ids)} documents, {rec['n_tokens']} tokens")
            records.append(rec)
            n_docs += len(train_ids)
            n_tokens += rec["n_tokens"]
            del text, starts
            t_read = time.perf_counter()
        n_shards = len(records)
        documents = run.store.merge(n_shards, tables=("documents",))["documents"]
        sa_dtype = "<u8" if any(r["n_tokens"] + r["n_docs"] >= (1 << 32) for r in records) else "<u4"
        disk = sum(
            (root / r["directory"] / f).stat().st_size
            for r in records
            for f in ("tokens.npy", "sa.npy", "doc_starts.npy")
        )
        meta = {
            "format": "memscan-corpus-index",
            "format_version": FORMAT_VERSION,
            "mode": mode,
            "tokenizer": tokenizer,
            "vocab_size": vocab,
            "n_docs": n_docs,
            "n_tokens": n_tokens,
            "separator": separator,
            "dtypes": {"tokens": dtype.str, "sa": sa_dtype, "doc_starts": "<i8"},
            "shards": [{k: r[k] for k in ("directory", "n_docs", "n_tokens", "doc_offset")} for r in records],
            "disk_bytes": disk,
        }
        atomic_write_json(root / "index.json", meta)
        seconds = time.time() - started
        run.finish(
            n_shards=n_shards,
            counts={
                "documents": n_docs,
                "tokens": n_tokens,
                "shards": n_shards,
                "empty_documents": int((documents["n_tokens"] == 0).sum()),
            },
            index={"disk_bytes": disk, "bytes_per_token": round(disk / n_tokens, 4), "dtypes": meta["dtypes"]},
            throughput={
                "seconds": round(seconds, 3),
                "this_process": {k: round(v, 3) for k, v in timings.items()},
                "tokens_per_s": round(n_tokens / seconds, 1) if seconds else None,
            },
        )
    return CorpusIndex.open(root)


def _chain(pending, rest):
    yield from pending
    yield from rest


def _write_shard(root: Path, directory: str, text: np.ndarray, starts: np.ndarray) -> tuple[float, float]:
    """Sort and write one shard into a temporary folder, then rename it into place; returns the
    seconds of the suffix sort and of the writes."""
    final = root / directory
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    sa = suffix_array(text)
    t1 = time.perf_counter()
    for name, arr in (("tokens", text), ("sa", sa), ("doc_starts", starts)):
        with open(tmp / f"{name}.npy", "wb") as fh:
            np.save(fh, arr, allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
    del sa
    fsync_dir(tmp)  # the folder's entries, then its rename, survive a power failure
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return t1 - t0, time.perf_counter() - t1
