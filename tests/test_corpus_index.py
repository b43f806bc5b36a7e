"""The exact-substring corpus index against a naive substring scan (memscan.lm.corpus_index)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from memscan import CorpusIndex
from memscan.errors import InputError, MemscanError
from memscan.lm.corpus_index import check_tokenizer, suffix_array


# ---- the independent reference: scan every position of every document -------------------------
def naive_locate(docs, q) -> np.ndarray:
    q = np.asarray(q, dtype=np.int64)
    rows = []
    for d, doc in enumerate(docs):
        doc = np.asarray(doc if not isinstance(doc, bytes) else np.frombuffer(doc, np.uint8), dtype=np.int64)
        for off in range(len(doc) - len(q) + 1):
            if np.array_equal(doc[off : off + len(q)], q):
                rows.append((d, off))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def naive_longest_prefix(docs, q) -> int:
    best = 0
    for length in range(1, len(q) + 1):
        if len(naive_locate(docs, q[:length])):
            best = length
        else:
            break
    return best


def naive_longest_substring(docs, q) -> int:
    return max((naive_longest_prefix(docs, q[s:]) for s in range(len(q))), default=0)


def _as_ids(doc):
    return np.frombuffer(doc, np.uint8).astype(np.int64) if isinstance(doc, bytes) else np.asarray(doc, np.int64)


def _queries(docs, rng, n=60, max_len=9, vocab=4):
    """Substrings of the corpus (some across a document boundary), random strings, long ones."""
    flat = np.concatenate([_as_ids(d) for d in docs])
    out = []
    for _ in range(n):
        m = int(rng.integers(1, max_len))
        s = int(rng.integers(0, max(1, len(flat) - m)))
        out.append(flat[s : s + m])  # may cross a boundary of the concatenation
        out.append(rng.integers(0, vocab, size=m))
    out.append(np.concatenate([_as_ids(docs[0]), _as_ids(docs[0])]))  # longer than any match
    return out


def _check_against_naive(index, docs, queries):
    for q in queries:
        want = naive_locate(docs, q)
        assert index.count(q) == len(want), q
        np.testing.assert_array_equal(index.locate(q), want, err_msg=str(q))
        length, doc, off = index.longest_match(q)
        assert length == naive_longest_prefix(docs, q), q
        if length:
            assert np.array_equal(_as_ids(docs[doc])[off : off + length], q[:length])
        else:
            assert (doc, off) == (-1, -1)


def _random_docs(rng, n=12, vocab=4):
    return [rng.integers(0, vocab, size=int(rng.integers(0, 40))) for _ in range(n)]


@pytest.mark.parametrize("shard_tokens", [10_000, 37, 1])
def test_random_token_streams_match_a_naive_scan(tmp_path, shard_tokens):
    rng = np.random.default_rng(shard_tokens)
    docs = _random_docs(rng)
    docs[3] = np.zeros(0, dtype=np.int64)  # an empty document keeps its number
    index = CorpusIndex.build(docs, tmp_path / "idx", shard_tokens=shard_tokens)
    assert index.n_docs == len(docs) and index.n_tokens == sum(len(d) for d in docs)
    if shard_tokens == 1:
        assert len(index.shards) == len(docs)  # one document a shard: every query merges shards
    _check_against_naive(index, docs, _queries(docs, rng))


def test_highly_repetitive_streams(tmp_path):
    # one token repeated, and periodic text: ranges of thousands of equal suffixes
    docs = [np.full(300, 7), np.full(5, 7), np.tile([1, 2, 3], 50), np.tile([1, 2], 40), np.asarray([7, 1, 2, 3, 7])]
    index = CorpusIndex.build(docs, tmp_path / "idx", shard_tokens=160)
    assert len(index.shards) > 1
    queries = [np.full(k, 7) for k in (1, 2, 5, 6, 299, 300, 301)]
    queries += [np.tile([1, 2, 3], k)[:m] for k in (1, 3, 50) for m in (1, 2, 3, 7)]
    queries += [np.tile([2, 1], 20), [3, 7], [7, 1], [2, 3, 7, 1]]
    _check_against_naive(index, docs, [np.asarray(q) for q in queries])
    assert index.count(np.full(300, 7)) == 1 and index.count([7]) == 300 + 5 + 2


def test_byte_mode_periodic_text_and_any_bytes(tmp_path):
    docs = [b"abc" * 40, b"abcab", bytes(range(256)) * 2, b"\xff\xfe\x00" * 9, b""]
    index = CorpusIndex.build(docs, tmp_path / "idx", shard_tokens=200)
    assert index.mode == "bytes" and index.dtype == np.dtype(">u2") and len(index.shards) > 1
    rng = np.random.default_rng(1)
    _check_against_naive(index, docs, _queries(docs, rng, vocab=256))
    assert index.count(b"abcabc") == naive_locate(docs, np.frombuffer(b"abcabc", np.uint8)).shape[0]
    assert index.count("abc") == index.count(b"abc")  # text queries are UTF-8 in byte mode
    assert index.count(b"\xff\xfe") == 9


def test_a_match_never_spans_two_documents(tmp_path):
    docs = [np.asarray([1, 2]), np.asarray([3, 4]), np.asarray([2, 3])]
    index = CorpusIndex.build(docs, tmp_path / "idx")
    assert index.count([2, 3]) == 1 and index.locate([2, 3]).tolist() == [[2, 0]]
    assert index.count([1, 2, 3]) == 0 and index.longest_match([1, 2, 3, 4]) == (2, 0, 0)
    # a token id outside the vocabulary (the separator's place) occurs nowhere
    assert index.count([index.separator]) == 0 and index.count([-1]) == 0
    assert index.count([3, index.separator]) == 0 and index.count([3, 4, -1]) == 0 and index.count([3, 4]) == 1
    assert len(index.locate([3, index.separator])) == 0
    length, doc, off = index.longest_match([3, index.separator, 4])
    assert length == 1 and (doc, off) in ((1, 0), (2, 1))


def test_longest_substring_match_against_brute_force(tmp_path):
    rng = np.random.default_rng(5)
    docs = _random_docs(rng, n=8, vocab=3)
    index = CorpusIndex.build(docs, tmp_path / "idx", shard_tokens=50)
    for _ in range(40):
        q = rng.integers(0, 3, size=int(rng.integers(1, 16)))
        m = index.longest_substring_match(q)
        assert m.length == naive_longest_substring(docs, q)
        if m.length:
            span = q[m.query_start : m.query_start + m.length]
            assert np.array_equal(docs[m.document][m.offset : m.offset + m.length], span)
    # a planted 50-token run inside noise is found whole, where the prefix match is short
    planted = np.arange(60) % 3
    index2 = CorpusIndex.build([planted], tmp_path / "idx2")
    q = np.concatenate([[2, 2, 2], planted[5:55], [0, 0, 0]])
    m = index2.longest_substring_match(q)
    assert (m.length, m.query_start) == (50, 3) == (naive_longest_substring([planted], q), 3)
    assert index2.longest_match(q)[0] == naive_longest_prefix([planted], q)


def test_empty_query(tmp_path):
    index = CorpusIndex.build([b"abc"], tmp_path / "idx")
    with pytest.raises(InputError, match="empty query"):
        index.count(b"")
    with pytest.raises(InputError, match="empty query"):
        index.locate([])
    assert index.longest_match(b"") == (0, -1, -1)
    assert tuple(index.longest_substring_match(b"")) == (0, -1, -1, -1)


def test_dtypes_and_bytes_per_token(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50_000, size=2_000) for _ in range(5)]
    index = CorpusIndex.build(docs, tmp_path / "idx", vocab_size=50_257)
    assert index.dtype == np.dtype(">u2") and index.shards[0].sa.dtype == np.dtype("<u4")
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["dtypes"] == {"tokens": ">u2", "sa": "<u4", "doc_starts": "<i8"}
    assert meta["disk_bytes"] / meta["n_tokens"] < 6.2  # 2 (ids) + 4 (suffix array) + headers/separators
    assert index.count([60_000]) == 0  # beyond the vocabulary
    # a reopened index answers the same
    again = CorpusIndex.open(tmp_path / "idx")
    q = docs[2][100:132]
    assert again.count(q) == index.count(q) == len(naive_locate(docs, q))


@pytest.mark.parametrize("chunk", [1 << 22, 7])
def test_suffix_array_is_sorted_for_every_width(monkeypatch, chunk):
    import memscan.lm.corpus_index as ci

    monkeypatch.setattr(ci, "_CHUNK", chunk)  # 7: the token-boundary selection runs in many chunks
    rng = np.random.default_rng(2)
    for dt, hi in (("u1", 5), (">u2", 3000), (">u4", 70_000)):
        text = rng.integers(0, hi, size=400).astype(dt)
        sa = suffix_array(text)
        want = sorted(range(len(text)), key=lambda i: text[i:].tolist())
        assert sa.dtype == np.dtype("<u4") and sa.tolist() == want, dt


def test_build_resumes_and_refuses_a_changed_corpus(tmp_path):
    rng = np.random.default_rng(3)
    docs = _random_docs(rng, n=10, vocab=5)
    full = CorpusIndex.build(docs, tmp_path / "full", shard_tokens=40)
    assert CorpusIndex.build(docs, tmp_path / "part", shard_tokens=40, stop_after_shards=2) is None
    with pytest.raises(MemscanError, match="resume"):
        CorpusIndex.open(tmp_path / "part")  # unfinished: no index.json
    changed = [d + 1 if i == 0 else d for i, d in enumerate(docs)]
    with pytest.raises(MemscanError, match="differs"):
        CorpusIndex.build(changed, tmp_path / "part", shard_tokens=40, resume=True)
    resumed = CorpusIndex.build(docs, tmp_path / "part", shard_tokens=40, resume=True)
    for a, b in zip(full.shards, resumed.shards):
        for name in ("tokens", "sa", "doc_starts"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert resumed.documents.equals(full.documents)


def test_damaged_index_gives_one_clear_error(tmp_path):
    CorpusIndex.build([b"hello world", b"hello"], tmp_path / "idx")
    sa = tmp_path / "idx" / "sa" / "00000" / "sa.npy"
    sa.write_bytes(sa.read_bytes()[:-8])
    with pytest.raises(MemscanError, match="sa.npy"):
        CorpusIndex.open(tmp_path / "idx")
    (tmp_path / "idx" / "index.json").write_text("{not json")
    with pytest.raises(MemscanError, match="damaged"):
        CorpusIndex.open(tmp_path / "idx")
    with pytest.raises(MemscanError, match="not a corpus index"):
        CorpusIndex.open(tmp_path / "nothing")


def test_bad_documents_and_empty_corpus(tmp_path):
    with pytest.raises(InputError, match="no document"):
        CorpusIndex.build([], tmp_path / "a")
    with pytest.raises(InputError, match="no token"):
        CorpusIndex.build([b"", b""], tmp_path / "b")
    with pytest.raises(InputError, match="mix"):
        CorpusIndex.build([b"ab", np.asarray([1, 2])], tmp_path / "c")
    with pytest.raises(InputError, match="outside the vocabulary"):
        CorpusIndex.build([np.asarray([1, 300])], tmp_path / "d", vocab_size=256)


def test_tokenizer_is_recorded_and_checked(tmp_path):
    rec = {"name": "tok-a", "vocab_sha256": "a" * 64, "vocab_size": 100}
    index = CorpusIndex.build([np.arange(10)], tmp_path / "idx", tokenizer=rec)
    assert index.tokenizer_record == rec and index.dtype == np.dtype("u1")
    check_tokenizer(index, dict(rec))
    with pytest.raises(InputError, match="tokenizer"):
        check_tokenizer(index, {**rec, "vocab_sha256": "b" * 64})
    with pytest.raises(InputError, match="tokenizer"):
        index.count("some text")  # text needs the tokenizer
    with pytest.raises(InputError, match="bytes query"):
        index.count(b"ab")


def test_an_index_pickles_by_reopening_its_folder(tmp_path):
    import pickle

    index = CorpusIndex.build([b"abcabc", b"cab"], tmp_path / "idx", shard_tokens=4)
    copy = pickle.loads(pickle.dumps(index))
    assert copy is not index and copy.root == index.root
    assert copy.count(b"ab") == index.count(b"ab") == 3 and copy.locate(b"cab").tolist() == [[0, 2], [1, 0]]
