"""Training text in the forms people have it, and reproducible (document, offset) samples of it.

Sources (``open_text_source(path, text_column="text")``):

- a **folder**: every ``.txt``, ``.jsonl``, ``.parquet`` and ``.npy`` file under it (recursively,
  in sorted path order); ids are prefixed with the file's relative path (``a/b.jsonl:7``);
- a **.txt file**: one document, the whole file (its ``train_id`` is the file name);
- a **JSONL file** (``.jsonl``/``.json``, one JSON object a line): the text in ``text_column``;
  ``train_id`` is the object's ``id`` field when it has one, else its 1-based line number;
- a **Parquet file** with a text column (``text_column``): ``train_id`` from an ``id`` column, else
  the 0-based row number; or with pre-tokenized ids (a list-of-integers column ``input_ids``,
  ``token_ids`` or ``ids``);
- a **.npy file** of pre-tokenized ids: 2-D (one document a row) or 1-D (one document).

Pre-tokenized ids are accepted only when their tokenizer is the model's: a sidecar
``<file>.tokenizer.json`` (``{"vocab_sha256": ..., "name": ...}``) or, for Parquet, the schema
metadata key ``vocab_sha256`` must carry the sha256 of the model's vocabulary
(:func:`memscan.generators.causal_lm.vocab_sha256`); anything else is refused with the hash to write.

Sampling (:func:`sample_sequences`) streams the source twice and never holds the corpus: pass 1
tokenizes every document and keeps only its length; documents shorter than the window
(``left + right`` tokens) are a counted, named skip; the eligible documents are drawn with
``numpy.random.default_rng(seed)`` (without replacement; in further rounds when more sequences
than documents are asked for) with an offset drawn uniformly (or the document start); pass 2
tokenizes only the chosen documents and cuts their windows.
"""

from __future__ import annotations

import json
import logging
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from memscan.data.prompts import read_utf8
from memscan.errors import InputError
from memscan.generators.seeds import numpy_seed

log = logging.getLogger(__name__)

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".npy")
TOKEN_COLUMNS = ("input_ids", "token_ids", "ids")
#: How many skipped document ids the manifest names (the count is always complete).
MAX_NAMED_SKIPS = 100


@dataclass
class TextFile:
    path: Path
    kind: str  # "txt" | "jsonl" | "parquet-text" | "parquet-ids" | "npy"
    label: str  # prefix of train ids ("" for a single-file source)
    column: str | None = None


@dataclass
class TextSource:
    """A training-text source: its files, and whether it holds text or token ids."""

    path: Path
    text_column: str
    files: list[TextFile]

    @property
    def pretokenized(self) -> bool:
        return any(f.kind in ("parquet-ids", "npy") for f in self.files)

    def record(self) -> dict:
        return {
            "path": str(self.path),
            "text_column": self.text_column,
            "files": len(self.files),
            "kinds": sorted({f.kind for f in self.files}),
            "pretokenized": self.pretokenized,
        }


def open_text_source(path: str | Path, *, text_column: str = "text", option: str = "--data") -> TextSource:
    """Check ``path`` and say what it holds (see the module docstring); errors name the fix, and
    ``option``: the command-line argument that gave the path (``--data``, ``CORPUS``)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise InputError(f"training text {path} does not exist", "pass a folder of .txt, a JSONL/Parquet or .npy file")
    if root.is_dir():
        paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        paths = [p for p in paths if not p.name.endswith(".tokenizer.json")]
        if not paths:
            raise InputError(
                f"folder {path} holds no {', '.join(SUFFIXES)} file", f"point {option} at the training text"
            )
        files = [_classify(p, p.relative_to(root).as_posix(), text_column, option) for p in paths]
    else:
        files = [_classify(root, "", text_column, option)]
    kinds = {f.kind in ("parquet-ids", "npy") for f in files}
    if len(kinds) > 1:
        raise InputError(f"{path} mixes text and pre-tokenized ids", f"point {option} at one kind")
    return TextSource(root, text_column, files)


def _classify(path: Path, label: str, text_column: str, option: str = "--data") -> TextFile:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return TextFile(path, "txt", label)
    if suffix in (".jsonl", ".json"):
        _check_jsonl_column(path, text_column)
        return TextFile(path, "jsonl", label, text_column)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(path)
        except Exception as exc:  # noqa: BLE001 - any pyarrow failure is a bad file
            raise InputError(f"cannot read Parquet file {path}: {exc}", "check the file") from None
        if text_column in schema.names:
            return TextFile(path, "parquet-text", label, text_column)
        ids = next((c for c in TOKEN_COLUMNS if c in schema.names), None)
        if ids is not None:
            return TextFile(path, "parquet-ids", label, ids)
        raise InputError(
            f"Parquet file {path} has no text column {text_column!r} (columns: {', '.join(schema.names)})",
            "name the text column with --text-column, or give token ids in an input_ids column",
        )
    if suffix == ".npy":
        return TextFile(path, "npy", label)
    raise InputError(
        f"{path} is not a .txt, .jsonl, .parquet or .npy file", f"convert it, or point {option} at a folder"
    )


def _utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a text file read strictly as UTF-8 (a leading byte-order mark
    dropped); a line that is not UTF-8 is one error naming the file, line and byte."""
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                yield n, raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(
                    f"{path} line {n} is not UTF-8 (byte {exc.start}: {raw[exc.start : exc.start + 1]!r})",
                    "re-encode it as UTF-8",
                ) from None


def _check_jsonl_column(path: Path, column: str) -> None:
    for n, line in _utf8_lines(path):
        if not line.strip():
            continue
        obj = _json_line(path, n, line)
        if column not in obj:
            raise InputError(
                f"{path} line {n} has no {column!r} field (fields: {', '.join(map(str, obj))})",
                "name the text field with --text-column",
            )
        return
    raise InputError(f"JSONL file {path} is empty", "give one JSON object with a text field per line")


def _json_line(path: Path, n: int, line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} line {n} is not JSON ({exc.msg})", "one JSON object per line") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path} line {n} is not a JSON object", 'one object per line, e.g. {"text": "..."}')
    return obj


# ---- documents


def check_tokenizer(source: TextSource, vocab_sha256: str | None, vocab_size: int) -> None:
    """Refuse pre-tokenized ids whose recorded tokenizer is not the model's."""
    if not source.pretokenized:
        return
    for f in source.files:
        recorded = _recorded_vocab(f)
        if recorded is None:
            raise InputError(
                f"pre-tokenized ids {f.path} carry no tokenizer record",
                f'write {f.path.name}.tokenizer.json beside it: {{"vocab_sha256": "{vocab_sha256}"}} '
                "if they were made with the model's tokenizer",
            )
        if vocab_sha256 is None:
            raise InputError(
                f"the model records no tokenizer, so the token ids of {f.path} cannot be checked",
                "give text instead, or a model whose describe() has tokenizer.vocab_sha256",
            )
        if recorded != vocab_sha256:
            raise InputError(
                f"token ids {f.path} were made with another tokenizer (vocab sha256 {recorded[:12]}…, "
                f"the model's is {vocab_sha256[:12]}…)",
                "re-tokenize with the model's tokenizer, or give the text",
            )


def _recorded_vocab(f: TextFile) -> str | None:
    sidecar = f.path.with_name(f.path.name + ".tokenizer.json")
    if sidecar.is_file():
        try:
            return str(json.loads(sidecar.read_text())["vocab_sha256"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"{sidecar} has no vocab_sha256", '{"vocab_sha256": "<hex>"}') from None
    if f.kind == "parquet-ids":
        import pyarrow.parquet as pq

        meta = pq.read_schema(f.path).metadata or {}
        value = meta.get(b"vocab_sha256")
        return value.decode() if value else None
    return None


def iter_documents(source: TextSource, encode: Callable[[str], np.ndarray], wanted=None) -> Iterator[tuple]:
    """Yield ``(doc_index, train_id, ids)`` in source order; with ``wanted`` (a set of doc
    indices) only those are tokenized and yielded."""
    index = 0
    for f in source.files:
        for local_id, item in _iter_file(f):
            if wanted is None or index in wanted:
                ids = np.asarray(item, dtype=np.int64) if not isinstance(item, str) else encode(item)
                train_id = f"{f.label}:{local_id}" if f.label and f.kind != "txt" else (f.label or local_id)
                yield index, str(train_id), np.asarray(ids, dtype=np.int64).ravel()
            index += 1


def _iter_file(f: TextFile) -> Iterator[tuple[str, object]]:
    if f.kind == "txt":
        yield f.path.name, read_utf8(f.path, "training text file")
    elif f.kind == "jsonl":
        for n, line in _utf8_lines(f.path):
            if not line.strip():
                continue
            obj = _json_line(f.path, n, line)
            text = obj.get(f.column)
            if not isinstance(text, str):
                raise InputError(
                    f"{f.path} line {n}: {f.column!r} is {'missing' if text is None else type(text).__name__}",
                    f"every line needs a string {f.column!r} field (--text-column)",
                )
            yield str(obj["id"]) if "id" in obj else str(n), text
    elif f.kind in ("parquet-text", "parquet-ids"):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(f.path)
        has_id = "id" in pf.schema_arrow.names
        row = 0
        for batch in pf.iter_batches(batch_size=1024, columns=[f.column, "id"] if has_id else [f.column]):
            values = batch.column(0).to_pylist()
            ids = batch.column(1).to_pylist() if has_id else range(row, row + len(values))
            for local, value in zip(ids, values):
                if value is None:
                    raise InputError(f"{f.path} row {row}: {f.column!r} is null", "drop or fill the empty rows")
                yield str(local), value
                row += 1
    elif f.kind == "npy":
        arr = np.load(f.path, mmap_mode="r", allow_pickle=False)
        if not np.issubdtype(arr.dtype, np.integer) or arr.ndim not in (1, 2):
            raise InputError(f"{f.path} holds {arr.dtype} {arr.shape}", "save token ids as a 1-D or 2-D integer array")
        rows = arr[None, :] if arr.ndim == 1 else arr
        for i in range(rows.shape[0]):
            yield str(i), np.asarray(rows[i], dtype=np.int64)


# ---- sampling


@dataclass
class SequenceSample:
    """Token windows cut from training documents: ``tokens[i]`` is ``left + right`` tokens, the
    suffix starting at ``left`` (document position ``offset[i]``)."""

    tokens: np.ndarray  # N × (left + right) int64
    doc_index: np.ndarray
    train_id: list[str]
    offset: np.ndarray  # document token index where the suffix starts
    left: int
    right: int
    documents: int
    eligible: int
    skipped: int
    skipped_names: list[str] = field(default_factory=list)
    longest: int = 0

    def record(self) -> dict:
        return {
            "documents": self.documents,
            "eligible_documents": self.eligible,
            "sequences": int(len(self.offset)),
            "window": {"left": self.left, "right": self.right},
            "skipped_short_documents": self.skipped,
            "skipped_names": self.skipped_names,
            "longest_document_tokens": self.longest,
        }


def _unseen_window(rng, span: int, seen: set) -> int:
    """A window start uniform in ``0..span-1`` and not in ``seen`` (by rejection)."""
    s = int(rng.integers(0, span))
    while s in seen:
        s = int(rng.integers(0, span))
    return s


def sample_sequences(
    source: TextSource,
    encode: Callable[[str], np.ndarray],
    *,
    left: int,
    right: int,
    n: int,
    seed: int = 0,
    offsets: str = "random",
    vocab_size: int | None = None,
) -> SequenceSample:
    """``n`` reproducible windows of ``left + right`` tokens (see the module docstring).

    ``offsets="random"`` draws the window start uniformly in each chosen document (a document
    drawn again in a further round gets a window not drawn yet: ``n`` is capped at the number of
    distinct windows); ``"start"`` takes the document's first ``left + right`` tokens (so at
    most one window per document: ``n`` is capped at the number of long-enough documents).
    """
    if offsets not in ("random", "start"):
        raise InputError(f"offsets {offsets!r} must be random or start", "--offsets random|start")
    if n < 1:
        raise InputError(f"--sequences {n} must be ≥ 1", "e.g. --sequences 1000")
    need = left + right
    lengths = array("q")  # one int64 per document: the only thing pass 1 keeps
    skipped, names, longest = 0, [], 0
    for _, train_id, ids in iter_documents(source, encode):
        lengths.append(len(ids))
        longest = max(longest, len(ids))
        if len(ids) < need:
            skipped += 1
            if len(names) < MAX_NAMED_SKIPS:
                names.append(train_id)
    lengths = np.asarray(lengths, dtype=np.int64)
    if skipped:
        log.warning("skipped %d document(s) shorter than %d tokens: %s", skipped, need, ", ".join(names[:10]))
    eligible = np.flatnonzero(lengths >= need)
    if eligible.size == 0:
        raise InputError(
            f"no document of {source.path} has the {need} tokens a window needs "
            f"({left} prefix + {right} suffix; the longest has {longest})",
            "lower --prefix-lengths / --suffix-length, or give longer documents",
        )
    rng = np.random.default_rng(numpy_seed(seed))
    if offsets == "start" and n > eligible.size:  # a document has one start: no repeated windows
        log.warning("%d sequences asked for, %d documents are long enough: taking %d", n, eligible.size, eligible.size)
        n = int(eligible.size)
    spans = lengths - need + 1  # windows per document (≤ 0: too short)
    if offsets == "random":
        total = int(spans[eligible].sum())
        if n > total:  # every distinct window, once
            log.warning("%d sequences asked for, the documents hold %d distinct windows: taking those", n, total)
            n = total
    chosen = []
    while len(chosen) < n:
        chosen.extend(rng.permutation(eligible)[: n - len(chosen)].tolist())
    chosen = np.asarray(chosen, dtype=np.int64)
    if offsets == "random":
        # a document drawn again (a further round) gets another window of it, never the same one
        # twice (a repeated window would count twice in every rate); the first draw of each
        # document is the only one in a single round
        used: dict[int, set] = {}
        keep, first = [], []
        for d in chosen.tolist():
            span, seen = int(spans[d]), used.setdefault(d, set())
            if len(seen) >= span:  # every window of this document is drawn already
                continue
            s = _unseen_window(rng, span, seen)
            seen.add(s)
            keep.append(d)
            first.append(s)
        # draws that fell on an exhausted document are made up from the documents with windows
        # left, a round at a time (each such document at most once per round), until n; each
        # window uniform over the document's windows not drawn yet
        open_docs = [d for d in eligible.tolist() if len(used.get(d, ())) < spans[d]] if len(keep) < n else []
        free: dict[int, list] = {}  # a document more than half drawn: its windows left (swap-removed)
        while len(keep) < n:
            for d in rng.permutation(open_docs)[: n - len(keep)].tolist():
                seen, span = used.setdefault(d, set()), int(spans[d])
                if d in free or 2 * len(seen) >= span:
                    left_ = free.setdefault(d, [w for w in range(span) if w not in seen])
                    j = int(rng.integers(0, len(left_)))
                    s = left_[j]
                    left_[j] = left_[-1]
                    left_.pop()
                else:  # rejection: under two draws expected
                    s = _unseen_window(rng, span, seen)
                seen.add(s)
                keep.append(d)
                first.append(s)
            open_docs = [d for d in open_docs if len(used[d]) < spans[d]] if len(keep) < n else []
        chosen, starts = np.asarray(keep, dtype=np.int64), np.asarray(first, dtype=np.int64)
    else:
        starts = np.zeros(len(chosen), dtype=np.int64)
    order = np.lexsort((starts, chosen))
    chosen, starts = chosen[order], starts[order]
    tokens = np.zeros((len(chosen), need), dtype=np.int64)
    train_ids = [""] * len(chosen)
    rows_of: dict[int, list[int]] = {}
    for row, d in enumerate(chosen.tolist()):
        rows_of.setdefault(d, []).append(row)
    for d, train_id, ids in iter_documents(source, encode, wanted=set(rows_of)):
        if len(ids) != lengths[d]:
            raise InputError(f"document {train_id} of {source.path} changed between passes", "do not edit it mid-run")
        for row in rows_of[d]:
            tokens[row] = ids[starts[row] : starts[row] + need]
            train_ids[row] = train_id
    if vocab_size is not None and tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise InputError(
            f"token ids of {source.path} reach {int(tokens.max())}, outside the model's vocabulary of {vocab_size}",
            "re-tokenize with the model's tokenizer",
        )
    return SequenceSample(
        tokens=tokens,
        doc_index=chosen,
        train_id=train_ids,
        offset=starts + left,
        left=left,
        right=right,
        documents=int(len(lengths)),
        eligible=int(eligible.size),
        skipped=skipped,
        skipped_names=names,
        longest=longest,
    )
