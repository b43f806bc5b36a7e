"""Training text sources and reproducible (document, offset) sampling (memscan.lm.text_data)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memscan.errors import InputError
from memscan.lm.text_data import check_tokenizer, iter_documents, open_text_source, sample_sequences
from memscan.testing.lookup_lm import LookupLM

LM = LookupLM.from_texts(["x"], order=1)
SHA = LM.describe()["tokenizer"]["vocab_sha256"]
DOCS = [f"document number {i}: " + "abcdefghij" * (i + 1) for i in range(6)]


def _jsonl(path, docs, ids=True):
    with open(path, "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": f"d{i}", "text": d} if ids else {"text": d}) + "\n" + "\n" * (i == 2))
    return path


def test_every_source_kind_yields_the_same_documents(tmp_path):
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, d in enumerate(DOCS):
        (folder / f"f{i}.txt").write_text(d)
    jsonl = _jsonl(tmp_path / "d.jsonl", DOCS)
    no_ids = _jsonl(tmp_path / "n.jsonl", DOCS, ids=False)
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(6)], "body": DOCS}), tmp_path / "t.parquet")
    texts = {}
    for name, path, col in (
        ("txt", folder, "text"),
        ("jsonl", jsonl, "text"),
        ("parquet", tmp_path / "t.parquet", "body"),
    ):
        docs = list(iter_documents(open_text_source(path, text_column=col), LM.encode))
        texts[name] = [LM.decode(ids) for _, _, ids in docs]
        assert [d[0] for d in docs] == list(range(6))
    assert texts["txt"] == texts["jsonl"] == texts["parquet"] == DOCS
    ids = [t for _, t, _ in iter_documents(open_text_source(jsonl), LM.encode)]
    assert ids == [f"d{i}" for i in range(6)]
    # without an id field: the 1-based line number (blank lines count as lines)
    assert [t for _, t, _ in iter_documents(open_text_source(no_ids), LM.encode)] == ["1", "2", "3", "5", "6", "7"]
    assert [t for _, t, _ in iter_documents(open_text_source(folder), LM.encode)] == [f"f{i}.txt" for i in range(6)]


def test_pretokenized_ids_checked_against_the_model_tokenizer(tmp_path):
    arr = np.stack([LM.encode(d[:20]) for d in DOCS])
    np.save(tmp_path / "ids.npy", arr)
    src = open_text_source(tmp_path / "ids.npy")
    assert src.pretokenized
    with pytest.raises(InputError, match="no tokenizer record"):
        check_tokenizer(src, SHA, LM.vocab_size)
    (tmp_path / "ids.npy.tokenizer.json").write_text(json.dumps({"vocab_sha256": "0" * 64}))
    with pytest.raises(InputError, match="another tokenizer"):
        check_tokenizer(src, SHA, LM.vocab_size)
    (tmp_path / "ids.npy.tokenizer.json").write_text(json.dumps({"vocab_sha256": SHA}))
    check_tokenizer(src, SHA, LM.vocab_size)
    docs = list(iter_documents(src, LM.encode))
    assert len(docs) == 6 and np.array_equal(docs[1][2], arr[1])
    # Parquet ids with the hash in the schema metadata
    table = pa.table({"input_ids": [a.tolist() for a in arr]}).replace_schema_metadata({"vocab_sha256": SHA})
    pq.write_table(table, tmp_path / "ids.parquet")
    src = open_text_source(tmp_path / "ids.parquet")
    check_tokenizer(src, SHA, LM.vocab_size)
    with pytest.raises(InputError, match="another tokenizer"):
        check_tokenizer(src, "f" * 64, LM.vocab_size)


def test_missing_text_column_and_bad_lines(tmp_path):
    pq.write_table(pa.table({"content": DOCS}), tmp_path / "t.parquet")
    with pytest.raises(InputError, match="no text column 'text'.*content"):
        open_text_source(tmp_path / "t.parquet")
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(InputError, match="no 'text' field"):
        open_text_source(tmp_path / "d.jsonl")
    (tmp_path / "e.jsonl").write_text(json.dumps({"text": "x"}) + "\nnot json\n")
    with pytest.raises(InputError, match="line 2 is not JSON"):
        list(iter_documents(open_text_source(tmp_path / "e.jsonl"), LM.encode))
    with pytest.raises(InputError, match="does not exist"):
        open_text_source(tmp_path / "nowhere")


def test_sampling_is_reproducible_counts_skips_and_cuts_true_windows(tmp_path):
    docs = DOCS + ["short", "tiny too"]
    src = open_text_source(_jsonl(tmp_path / "d.jsonl", docs))
    a = sample_sequences(src, LM.encode, left=10, right=15, n=9, seed=3)
    b = sample_sequences(src, LM.encode, left=10, right=15, n=9, seed=3)
    c = sample_sequences(src, LM.encode, left=10, right=15, n=9, seed=4)
    assert np.array_equal(a.tokens, b.tokens) and a.train_id == b.train_id
    assert not np.array_equal(a.offset, c.offset) or not np.array_equal(a.doc_index, c.doc_index)
    assert a.skipped == 2 and a.skipped_names == ["d6", "d7"] and a.eligible == 6 and a.documents == 8
    # 9 sequences from 6 documents: every document once, then 3 again
    assert sorted(set(a.doc_index.tolist())) == list(range(6)) and len(a.offset) == 9
    for row in range(9):
        ids = LM.encode(docs[a.doc_index[row]])
        start = a.offset[row] - 10
        assert np.array_equal(a.tokens[row], ids[start : start + 25])
        assert a.train_id[row] == f"d{a.doc_index[row]}"
    starts = sample_sequences(src, LM.encode, left=10, right=15, n=3, seed=0, offsets="start")
    assert (starts.offset == 10).all()
    rec = a.record()
    assert rec["skipped_short_documents"] == 2 and rec["skipped_names"] == ["d6", "d7"]


def test_sequences_longer_than_any_document(tmp_path):
    src = open_text_source(_jsonl(tmp_path / "d.jsonl", ["short one", "short two"]))
    with pytest.raises(InputError, match="no document .* has the 100 tokens"):
        sample_sequences(src, LM.encode, left=50, right=50, n=3)


def test_second_pass_tokenizes_only_the_chosen_documents(tmp_path):
    src = open_text_source(_jsonl(tmp_path / "d.jsonl", DOCS * 5))
    calls = []

    def encode(text):
        calls.append(text)
        return LM.encode(text)

    sample_sequences(src, encode, left=5, right=5, n=4, seed=0)
    assert len(calls) == 30 + 4  # pass 1: every document's length; pass 2: the 4 chosen


def test_parquet_text_streams_in_batches(tmp_path):
    docs = [f"row {i} " * 5 for i in range(2500)]
    pq.write_table(pa.table({"text": docs}), tmp_path / "big.parquet", row_group_size=700)
    out = list(iter_documents(open_text_source(tmp_path / "big.parquet"), LM.encode))
    assert len(out) == 2500 and out[-1][1] == "2499" and LM.decode(out[1234][2]) == docs[1234]
    assert pd.Series([t for _, t, _ in out]).is_unique


def test_start_offsets_take_each_document_once(tmp_path):
    src = open_text_source(_jsonl(tmp_path / "d.jsonl", DOCS))
    s = sample_sequences(src, LM.encode, left=5, right=5, n=50, seed=0, offsets="start")
    assert len(s.offset) == 6 and sorted(s.doc_index.tolist()) == list(range(6))


def test_further_rounds_never_repeat_a_window(tmp_path):
    """More sequences than documents: each document is drawn again, each time at a window not
    drawn yet — two documents of 2 possible windows each give the 4 distinct windows, and asking
    for 6 is capped at those 4 (a repeated window would count twice in every rate)."""
    docs = ["abcdefghijk", "ABCDEFGHIJK"]  # 11 tokens each, windows of 10: starts 0 and 1
    src = open_text_source(_jsonl(tmp_path / "d.jsonl", docs))
    for n in (4, 6):
        s = sample_sequences(src, LM.encode, left=4, right=6, n=n, seed=0)
        pairs = sorted(zip(s.doc_index.tolist(), (s.offset - 4).tolist()))
        assert pairs == [(0, 0), (0, 1), (1, 0), (1, 1)]
    one_round = sample_sequences(src, LM.encode, left=4, right=6, n=2, seed=0)
    assert sorted(one_round.doc_index.tolist()) == [0, 1]


def test_exhausted_documents_are_made_up_from_the_others(tmp_path, caplog):
    """Documents of very different window counts: draws that land on a document with every
    window taken are made up from documents with windows left, so n = min(asked, distinct
    windows) — brute force over random corpora; the cap's warning names the true total."""
    import logging
    import random

    rng = random.Random(3)
    for case in range(60):
        docs = [
            "".join(rng.choice("abcdef") for _ in range(rng.choice([10, 11, 12, 40]))) for _ in range(rng.randint(1, 6))
        ]
        left, right = 4, 6
        windows = {(d, s) for d, t in enumerate(docs) for s in range(len(LM.encode(t)) - left - right + 1)}
        n = rng.randint(1, len(windows) + 5)
        src = open_text_source(_jsonl(tmp_path / f"d{case}.jsonl", docs))
        s = sample_sequences(src, LM.encode, left=left, right=right, n=n, seed=case)
        got = list(zip(s.doc_index.tolist(), (s.offset - left).tolist()))
        assert len(got) == min(n, len(windows)) and len(set(got)) == len(got) and set(got) <= windows
        for (d, st), row in zip(got, s.tokens):
            assert row.tolist() == LM.encode(docs[d])[st : st + left + right].tolist()
    # one document of 1 window and one of 31: 6 asked, 6 given (4 before: the short one's repeats dropped)
    src = open_text_source(_jsonl(tmp_path / "two.jsonl", ["abcdefghij", "x" * 40]))
    for seed in range(5):
        assert len(sample_sequences(src, LM.encode, left=4, right=6, n=6, seed=seed).offset) == 6
    with caplog.at_level(logging.WARNING):
        s = sample_sequences(src, LM.encode, left=4, right=6, n=40, seed=0)
    assert len(s.offset) == 32 and "hold 32 distinct windows" in caplog.text
