"""`memscan lm index`: the corpus forms of memscan.lm.text_data, byte and token mode, the recorded
tokenizer, and the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from lm_corpus_support import MEMORIZED, UNSEEN, lookup, write_corpus
from typer.testing import CliRunner

from memscan import CorpusIndex
from memscan.cli import app
from memscan.errors import InputError
from memscan.lm.corpus_index import check_tokenizer

runner = CliRunner()


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def _naive_count(docs, q) -> int:
    q = list(q)
    return sum(1 for d in docs for i in range(len(d) - len(q) + 1) if list(d[i : i + len(q)]) == q)


def test_token_mode_jsonl_with_the_models_tokenizer(tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl")
    res = _cli("lm", "index", corpus, "--out", tmp_path / "idx", "--tokenizer", "py:lm_corpus_support:lookup")
    assert res.exit_code == 0, res.output
    assert "13 documents" in res.output
    lm = lookup()
    index = CorpusIndex.open(tmp_path / "idx", tokenizer=lm)
    assert (
        index.mode == "tokens" and index.tokenizer_record["vocab_sha256"] == lm.describe()["tokenizer"]["vocab_sha256"]
    )
    docs = [lm.encode(t) for t in [*MEMORIZED, *UNSEEN, "too short"]]
    for text in ("Record 3", "ecord", MEMORIZED[2][5:40], "zzzz", UNSEEN[0]):
        assert index.count(text) == _naive_count(docs, lm.encode(text)), text
    # documents keep the source's ids
    assert index.documents["train_id"].tolist()[:2] == ["m0", "m1"] and index.documents["n_tokens"].sum() == len(index)
    doc, off = index.locate("Record 4")[0]
    assert index.documents.loc[doc, "train_id"] == "m4" and off == 0
    rep = _cli("report", tmp_path / "idx")
    assert rep.exit_code == 0, rep.output
    assert "memscan lm index report" in (tmp_path / "idx" / "report.html").read_text()


def test_byte_mode_takes_any_bytes_and_text_mode_refuses_invalid_utf8(tmp_path):
    folder = tmp_path / "txt"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"caf\xe9 au lait, caf\xe9 noir")
    (folder / "b.txt").write_text("plain text about caf\u00e9")
    res = _cli("lm", "index", folder, "--out", tmp_path / "bytes", "--bytes")
    assert res.exit_code == 0, res.output
    index = CorpusIndex.open(tmp_path / "bytes")
    assert index.count(b"caf\xe9") == 2 and index.count("café") == 1  # Latin-1 é vs UTF-8 é
    assert index.locate(b"noir").tolist() == [[0, 19]]  # one byte per character
    res = _cli("lm", "index", folder, "--out", tmp_path / "tok", "--tokenizer", "py:lm_corpus_support:lookup")
    assert res.exit_code == 2 and "a.txt is not UTF-8" in res.output and "--bytes" in res.output
    assert not (tmp_path / "tok" / "manifest.json").exists()  # refused before the run starts


class _WordTokenizer:
    """A word-level tokenizer (whitespace-split words; an unknown word, "\ufeffalpha" among
    them, is id 0) with a vocabulary record: the tokens of a word change with a byte-order mark
    before it, as BPE merges do."""

    VOCAB = ("<unk>", "alpha", "beta", "gamma", "delta")
    vocab_size = len(VOCAB)

    def encode(self, text):
        return np.asarray([self.VOCAB.index(w) if w in self.VOCAB else 0 for w in text.split()], dtype=np.int64)

    def describe(self):
        from memscan.generators.causal_lm import vocab_sha256

        vocab = {w: i for i, w in enumerate(self.VOCAB)}
        return {"tokenizer": {"name": "words", "vocab_size": self.vocab_size, "vocab_sha256": vocab_sha256(vocab)}}


def test_a_byte_order_mark_is_read_as_lm_extractable_reads_it(tmp_path):
    """A .txt starting with a UTF-8 byte-order mark: the token index holds the tokens that
    lm extractable draws its windows from (memscan.lm.text_data drops the mark), so a window at the
    document's start is found there, at offset 0."""
    from memscan.lm.index_run import lm_index
    from memscan.lm.text_data import iter_documents, open_text_source

    folder = tmp_path / "txt"
    folder.mkdir()
    (folder / "a.txt").write_bytes("alpha beta gamma delta".encode("utf-8-sig"))
    (folder / "b.txt").write_text("beta gamma delta alpha")
    tok = _WordTokenizer()
    index = lm_index(folder, tmp_path / "idx", tokenizer=tok)
    # what lm extractable tokenizes, by hand: [alpha, beta, gamma, delta] and [beta, gamma, delta, alpha]
    runs = [ids.tolist() for _, _, ids in iter_documents(open_text_source(folder), tok.encode)]
    assert runs == [[1, 2, 3, 4], [2, 3, 4, 1]] and index.n_tokens == 8
    assert index.count(np.array([1, 2, 3])) == 1  # alpha beta gamma: a.txt's start
    assert index.locate(np.array([1, 2, 3])).tolist() == [[0, 0]]
    assert index.count(np.array([2, 3, 4])) == 2


def test_pretokenized_ids_need_the_recorded_tokenizer(tmp_path):
    lm = lookup()
    ids = np.stack([lm.encode("x" * 5 + MEMORIZED[0][:40]), lm.encode("y" * 5 + MEMORIZED[1][:40])])
    np.save(tmp_path / "ids.npy", ids)
    sha = lm.describe()["tokenizer"]["vocab_sha256"]
    (tmp_path / "ids.npy.tokenizer.json").write_text(json.dumps({"vocab_sha256": sha}))
    res = _cli(
        "lm", "index", tmp_path / "ids.npy", "--out", tmp_path / "idx", "--tokenizer", "py:lm_corpus_support:lookup"
    )
    assert res.exit_code == 0, res.output
    index = CorpusIndex.open(tmp_path / "idx")
    assert index.n_docs == 2 and index.count(ids[1][3:20]) == 1
    res = _cli("lm", "index", tmp_path / "ids.npy", "--out", tmp_path / "b", "--bytes")
    assert res.exit_code == 2 and "pre-tokenized" in res.output


def test_exactly_one_of_tokenizer_and_bytes(tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl")
    for extra in ([], ["--bytes", "--tokenizer", "py:lm_corpus_support:lookup"]):
        res = _cli("lm", "index", corpus, "--out", tmp_path / "o", *extra)
        assert res.exit_code == 2 and "exactly one of --tokenizer" in res.output


def test_check_tokenizer_refuses_another_vocabulary(tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl")
    assert (
        _cli("lm", "index", corpus, "--out", tmp_path / "idx", "--tokenizer", "py:lm_corpus_support:lookup").exit_code
        == 0
    )
    index = CorpusIndex.open(tmp_path / "idx")
    check_tokenizer(index, lookup())
    from memscan.testing.lookup_lm import LookupLM

    other = LookupLM([[1, 2, 3]], vocab_size=300)  # another vocabulary, another hash
    with pytest.raises(InputError, match="not the corpus index's"):
        check_tokenizer(index, other)
    with pytest.raises(InputError, match="not the corpus index's"):
        CorpusIndex.open(tmp_path / "idx", tokenizer=other)
