"""Memorization against duplication: the duplicate counts of `memscan lm extractable --index` against
a naive count, and the log-linear fit against numpy.linalg.lstsq (memscan.lm.duplication)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from lm_corpus_support import MEMORIZED, UNSEEN
from typer.testing import CliRunner

from memscan.cli import app
from memscan.lm.duplication import duplication_curve, log2_bin, log_linear_fit

runner = CliRunner()
COPIES = [1, 1, 2, 4, 8, 16]  # copies of MEMORIZED[i] in the corpus


def _invoke(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


def _naive_count(texts, q: str) -> int:
    return sum(1 for t in texts for i in range(len(t) - len(q) + 1) if t[i : i + len(q)] == q)


def test_log_linear_fit_against_lstsq():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 2000, size=300)
    y = (rng.random(300) < 0.1 + 0.15 * np.log10(np.maximum(counts, 1))).astype(float)
    fit = log_linear_fit(counts, y)
    keep = counts >= 1  # a count of 0 has no logarithm: left out
    X = np.stack([np.ones(keep.sum()), np.log10(counts[keep])], axis=1)
    beta, rss, *_ = np.linalg.lstsq(X, y[keep], rcond=None)
    cov = rss[0] / (keep.sum() - 2) * np.linalg.inv(X.T @ X)
    assert fit["intercept"] == pytest.approx(beta[0], rel=1e-10)
    assert fit["slope_per_decade"] == pytest.approx(beta[1], rel=1e-10)
    assert fit["intercept_se"] == pytest.approx(np.sqrt(cov[0, 0]), rel=1e-10)
    assert fit["slope_se"] == pytest.approx(np.sqrt(cov[1, 1]), rel=1e-10)
    assert fit["n"] == keep.sum()
    assert log_linear_fit([5, 5, 5], [0, 1, 1]) is None and log_linear_fit([1, 10], [0, 1]) is None


def test_log2_bins_and_the_curve_by_hand():
    counts = [0, 1, 1, 2, 3, 4, 7, 8, 100]
    extractable = [0, 0, 1, 0, 1, 1, 1, 1, 1]
    assert log2_bin(counts).tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 7]
    curve = duplication_curve(counts, extractable)
    assert curve["bin"].tolist() == [0, 1, 2, 3, 4, 7]
    assert curve["low"].tolist() == [0, 1, 2, 4, 8, 64] and curve["high"].tolist() == [1, 2, 4, 8, 16, 128]
    assert curve["sequences"].tolist() == [1, 2, 2, 2, 1, 1]
    assert curve["extractable_rate"].tolist() == [0.0, 0.5, 0.5, 1.0, 1.0, 1.0]
    assert curve["mean_count"].tolist() == [0.0, 1.0, 2.5, 5.5, 8.0, 100.0]


@pytest.fixture(scope="module")
def duplicated(tmp_path_factory):
    """A corpus with MEMORIZED[i] copied COPIES[i] times (and the unseen documents once), its token
    index (the lookup model's tokenizer) and its byte index."""
    root = tmp_path_factory.mktemp("dup")
    texts = [t for t, c in zip(MEMORIZED, COPIES) for _ in range(c)] + UNSEEN
    data = root / "corpus.jsonl"
    data.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    tok = "py:lm_corpus_support:lookup"
    _invoke("lm", "index", data, "--out", root / "idx", "--tokenizer", tok, "--shard-tokens", 500)
    _invoke("lm", "index", data, "--out", root / "bidx", "--bytes")
    return root, data, texts


def _extractable(root, data, out, index):
    _invoke(
        "lm", "extractable", "--model", "py:lm_corpus_support:lookup", "--data", data, "--out", out,
        "--prefix-lengths", "16,32", "--suffix-length", 20, "--sequences", 30, "--seed", 3, "--shard-size", 10,
        "--batch-size", 8, "--index", index, "--quiet",
    )  # fmt: skip
    return pd.read_parquet(out / "sequences.parquet")


def test_duplicate_counts_against_a_naive_count_and_the_report(duplicated, tmp_path):
    root, data, texts = duplicated
    df = _extractable(root, data, tmp_path / "run", root / "idx")
    assert {"suffix_count", "window_count"} <= set(df.columns) and len(df) == 60
    for _, r in df.iterrows():
        assert r["suffix_count"] == _naive_count(texts, r["suffix_text"])
        assert r["window_count"] == _naive_count(texts, r["prefix_text"] + r["suffix_text"])
    # the copies of each memorized document are its count; every unseen one occurs once
    for _, r in df[df["extractable"]].iterrows():
        assert r["window_count"] in COPIES
    assert (df.loc[~df["extractable"], "window_count"] == 1).all()
    # the byte index gives the same counts (ASCII text, a byte-level tokenizer)
    dfb = _extractable(root, data, tmp_path / "brun", root / "bidx")
    assert dfb["window_count"].tolist() == df["window_count"].tolist()
    assert dfb["suffix_count"].tolist() == df["suffix_count"].tolist()
    # summary: per prefix length, the curve and the fit of extractable on log10 window count
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    dup = m["summary"]["duplication"]["32"]["window"]
    g = df[df["prefix_len"] == 32]
    want = log_linear_fit(g["window_count"], g["extractable"])
    assert dup["fit"]["slope_per_decade"] == pytest.approx(want["slope_per_decade"]) and want["slope_per_decade"] > 0
    assert m["corpus_index"]["mode"] == "tokens" and m["corpus_index"]["documents"] == len(texts)
    _invoke("report", tmp_path / "run")
    html = (tmp_path / "run" / "report.html").read_text()
    assert "Memorization against duplication" in html and "per decade" in html


def test_tiny_gpt2_token_index_end_to_end(tmp_path):
    """A transformers model: its tokenizer indexes the corpus, and `lm extractable --index` with the
    same model counts every window (ByT5 ids are bytes + 3, so text counts are token counts)."""
    pytest.importorskip("transformers")
    from memscan import CorpusIndex
    from memscan.testing.tiny_lm import make_tiny_gpt2

    model = make_tiny_gpt2(tmp_path / "gpt2", seed=1)
    texts = MEMORIZED[:3] * 2 + UNSEEN[:2]
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    _invoke("lm", "index", data, "--out", tmp_path / "idx", "--tokenizer", model)
    index = CorpusIndex.open(tmp_path / "idx")
    byt5 = lambda t: np.frombuffer(t.encode(), np.uint8).astype(np.int64) + 3  # noqa: E731 - ByT5: byte + 3
    assert index.dtype == np.dtype(">u2") and index.n_tokens == sum(len(t.encode()) for t in texts)
    assert index.count(byt5(MEMORIZED[1][:30])) == 2 and index.count(byt5("Unseen 1")) == 1
    out = tmp_path / "run"
    _invoke(
        "lm", "extractable", "--model", model, "--data", data, "--out", out, "--prefix-lengths", 16,
        "--suffix-length", 8, "--sequences", 6, "--batch-size", 6, "--index", tmp_path / "idx", "--quiet",
    )  # fmt: skip
    df = pd.read_parquet(out / "sequences.parquet")
    for _, r in df.iterrows():
        assert r["window_count"] == _naive_count(texts, r["prefix_text"] + r["suffix_text"]) >= 1
        assert r["suffix_count"] == _naive_count(texts, r["suffix_text"])
    # the run's model has the recorded vocabulary (a model of another one is refused: bad-input corpus)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_sha256"] == index.tokenizer_record["vocab_sha256"]


class _SentencePieceWords:
    """A SentencePiece-style tokenizer (the `tokenizers` library's Metaspace pre-tokenizer and
    decoder over a word vocabulary, as Llama / T5 tokenizers decode): "▁word" decodes to "word"
    at the front of a text."""

    def __init__(self, words):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        vocab = {w: i for i, w in enumerate(["<unk>", *sorted({f"▁{w}" for w in words})])}
        self.tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        self.tok.pre_tokenizer = pre_tokenizers.Metaspace()
        self.tok.decoder = decoders.Metaspace()

    def encode(self, text):
        return np.asarray(self.tok.encode(text).ids, dtype=np.int64)

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids])


def test_byte_counts_keep_a_sentencepiece_leading_space(tmp_path):
    """A byte index and a tokenizer whose decoding drops a leading space: the window "▁word ▁is
    ▁here" inside a document is the text " word is here" (once in the corpus), not "word is here"
    (also inside "sword is here"); a window at its document's start has no such space. Against a
    naive count of the texts written by hand."""
    pytest.importorskip("tokenizers")
    from memscan import CorpusIndex
    from memscan.lm.duplication import duplicate_counts, window_bytes

    docs = ["the sword is here now", "a word is here now", "word is here now too"]
    sp = _SentencePieceWords(" ".join(docs).split())
    index = CorpusIndex.build([d.encode() for d in docs], tmp_path / "bidx")
    tokens = np.stack([sp.encode(docs[1]), sp.encode(docs[2])])  # both windows start their documents
    assert sp.decode(tokens[0, 1:4]) == "word is here"  # what decoding alone gives
    suffix, window = duplicate_counts(index, tokens, 2, [1, 2], 2, sp, starts=np.array([0, 0]))
    # suffix tokens 2..3, windows 1..3 (k = 1) and 0..3 (k = 2), the true text of each by hand
    want_suffix = [" is here", " here now"]
    want_window = [[" word is here", "a word is here"], [" is here now", "word is here now"]]
    assert suffix.tolist() == [_naive_count(docs, q) for q in want_suffix] == [3, 3]
    assert window.tolist() == [[_naive_count(docs, q) for q in row] for row in want_window] == [[1, 1], [3, 3]]
    # the same tokens inside their documents: the leading space is kept
    mid = duplicate_counts(index, tokens, 2, [2], 2, sp, starts=np.array([7, 7]))[1]
    assert mid.tolist() == [[_naive_count(docs, " a word is here")], [_naive_count(docs, " word is here now")]]
    assert mid.tolist() == [[0], [1]]
    assert window_bytes(sp, tokens[1, :3]) == b" word is here"
    assert window_bytes(sp, tokens[1, :3], document_start=True) == b"word is here"


def test_byte_counts_refuse_a_tokenizer_whose_windows_have_no_known_text(tmp_path):
    from memscan import CorpusIndex
    from memscan.errors import InputError
    from memscan.lm.duplication import duplicate_counts

    class Counting:  # decodes a sequence to its length: no token's text is a prefix of the window's
        def decode(self, ids):
            return str(len(list(ids)))

    index = CorpusIndex.build([b"abc"], tmp_path / "bidx")
    with pytest.raises(InputError, match="--tokenizer"):
        duplicate_counts(index, np.arange(6)[None], 3, [3], 3, Counting(), starts=np.array([4]))
