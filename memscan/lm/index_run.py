"""``memscan lm index``: the exact-substring index of a training corpus (run kind ``lm-index``).

The corpus is read in the forms :mod:`memscan.lm.text_data` reads (a folder of ``.txt``, JSONL /
Parquet with a text column, pre-tokenized ``.npy`` / Parquet ids), streamed once, document by
document, and indexed by :func:`memscan.lm.corpus_index.build_corpus_index` (layout, shards and
resume there).

- ``--tokenizer MODEL``: text is tokenized with the model's tokenizer (``encode``, no special
  tokens); its record (name, vocabulary sha256, size) is kept in ``index.json``, and pre-tokenized
  ids must carry the same vocabulary hash. Text must be valid UTF-8 (a ``.txt`` file that is not is
  refused, naming the file and the byte) and is read as the other ``memscan lm`` runs read it
  (:mod:`memscan.lm.text_data`: a leading byte-order mark is dropped), so that token offsets agree.
- ``--bytes``: the raw bytes of each document (a ``.txt`` file byte for byte, whatever its
  encoding; JSONL / Parquet text as UTF-8). Pre-tokenized ids are refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from memscan.data.prompts import read_utf8
from memscan.errors import InputError, user_code
from memscan.lm.corpus_index import DEFAULT_SHARD_TOKENS, CorpusIndex, build_corpus_index
from memscan.lm.text_data import TextSource, _iter_file, check_tokenizer, open_text_source
from memscan.progress import progress_bar

KIND = "lm-index"


def load_tokenizer(spec):
    """The model whose tokenizer indexes text: a spec (loaded with
    :func:`memscan.generators.causal_lm.load_causal_lm`) or an object with ``encode``; returns
    ``(model, tokenizer record)``."""
    from memscan.generators.causal_lm import describe_lm, load_causal_lm

    if isinstance(spec, (str, Path)):
        with user_code(f"loading the tokenizer's model {spec} failed", "fix the model and rerun"):
            lm = load_causal_lm(str(spec))
    else:
        lm = spec
    rec = describe_lm(lm).get("tokenizer")
    if not isinstance(rec, dict) or not rec.get("vocab_sha256"):
        raise InputError(
            f"the model {spec} records no tokenizer vocabulary (describe()['tokenizer']['vocab_sha256'])",
            "give a transformers model directory, or index bytes with --bytes",
        )
    vocab = max(int(rec.get("vocab_size") or 0), int(getattr(lm, "vocab_size", 0) or 0))
    return lm, {**rec, "vocab_size": vocab}


def _train_id(f, local_id) -> str:
    return str(f"{f.label}:{local_id}" if f.label and f.kind != "txt" else (f.label or local_id))


def iter_corpus(source: TextSource, encode=None) -> Iterator[tuple[str, object]]:
    """``(train_id, document)`` in source order: ``bytes`` when ``encode`` is None (byte mode),
    else int64 token ids."""
    for f in source.files:
        if f.kind == "txt":
            if encode is None:
                yield _train_id(f, f.path.name), f.path.read_bytes()
                continue
            try:
                # the reader of every run that reads this corpus (text_data): a leading byte-order
                # mark is dropped, so the index's tokens and offsets are those the runs tokenize
                text = read_utf8(f.path, "training text file")
            except InputError as exc:
                raise InputError(exc.message, "convert it to UTF-8, or index raw bytes with --bytes") from None
            yield _train_id(f, f.path.name), encode(text)
            continue
        try:
            for local_id, item in _iter_file(f):
                if isinstance(item, str):
                    yield _train_id(f, local_id), (item.encode("utf-8") if encode is None else encode(item))
                else:
                    yield _train_id(f, local_id), np.asarray(item, dtype=np.int64)
        except UnicodeDecodeError as exc:
            raise InputError(
                f"{f.path} is not UTF-8 text (byte {exc.start})", "convert it to UTF-8 (JSONL is UTF-8 by definition)"
            ) from None


def lm_index(
    corpus: str | Path,
    out: str | Path,
    *,
    tokenizer=None,
    byte_mode: bool = False,
    text_column: str = "text",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    resume: bool = False,
    stop_after_shards: int | None = None,
    progress: bool = True,
) -> CorpusIndex:
    """Index the training corpus ``corpus`` into the folder ``out`` (``memscan lm index``).

    Parameters
    ----------
    corpus : a folder of .txt, a JSONL / Parquet file with a text column, pre-tokenized ids
    out : the index folder (a run directory of kind ``lm-index``)
    tokenizer : a model spec or causal-LM object whose tokenizer tokenizes the text
    byte_mode : index raw bytes instead (exactly one of ``tokenizer`` / ``byte_mode``)
    text_column : the JSONL field / Parquet column holding the text
    shard_tokens : tokens per suffix-array shard at most (the unit of resume)
    resume : finish a killed build (same corpus and options)
    progress : a progress bar of the documents read (``--quiet``: none), against their number
        where the files say it without being read (:func:`document_count`)
    """
    if (tokenizer is None) == (not byte_mode):
        raise InputError(
            "give exactly one of --tokenizer MODEL and --bytes",
            "--tokenizer indexes the model's token ids; --bytes indexes raw bytes",
        )
    source = open_text_source(corpus, text_column=text_column, option="CORPUS")
    if byte_mode:
        if source.pretokenized:
            raise InputError(
                f"{corpus} holds pre-tokenized ids, and --bytes indexes text",
                "give the text, or index the ids with --tokenizer MODEL",
            )
        docs, record, vocab = iter_corpus(source), None, None
    else:
        lm, record = load_tokenizer(tokenizer)
        vocab = int(record["vocab_size"])
        check_tokenizer(source, record["vocab_sha256"], vocab)
        docs = iter_corpus(source, lm.encode)
    with progress_bar(progress, unit="documents") as bar:
        task = bar.add_task("index", total=document_count(source))
        return build_corpus_index(
            _counted(docs, lambda: bar.advance(task)),
            out,
            shard_tokens=shard_tokens,
            vocab_size=vocab,
            tokenizer=record,
            source=source.record(),
            resume=resume,
            stop_after_shards=stop_after_shards,
        )


def document_count(source: TextSource) -> int | None:
    """The documents :func:`iter_corpus` yields, when the files say it without being read: one a
    ``.txt``, a Parquet file's rows, a ``.npy`` file's rows; ``None`` with a JSONL file (its blank
    lines are skipped, and counting them is a pass over the file)."""
    n = 0
    for f in source.files:
        try:
            if f.kind == "txt":
                n += 1
            elif f.kind in ("parquet-text", "parquet-ids"):
                import pyarrow.parquet as pq

                n += pq.ParquetFile(f.path).metadata.num_rows
            elif f.kind == "npy":
                shape = np.load(f.path, mmap_mode="r", allow_pickle=False).shape
                n += 1 if len(shape) == 1 else int(shape[0])
            else:
                return None
        except Exception:  # noqa: BLE001 - a damaged file: its reader says what is wrong with it
            return None
    return n


def _counted(docs: Iterator, tick) -> Iterator:
    """``docs``, calling ``tick()`` after each one is read (and tokenized)."""
    for doc in docs:
        tick()
        yield doc
