"""Memorization against duplication (Carlini et al. 2022, Fig. 1b; Kandpal et al. 2022): how often
each sampled training sequence occurs in the corpus, and the extractable rate as a function of it.

- :func:`duplicate_counts`: for every sequence of ``memscan lm extractable`` and prefix length k,
  ``suffix_count`` (occurrences of its m-token suffix in the corpus index) and ``window_count``
  (occurrences of the k-token prefix followed by the suffix). With a byte-mode index the tokens are
  decoded with the model's tokenizer and counted as UTF-8 bytes (:func:`window_bytes`: the text the
  tokens stand for inside their document, a SentencePiece word's leading space included; a
  multi-byte character cut by the window's edge decodes to U+FFFD and may then count 0).
- :func:`duplication_curve`: the extractable rate in log₂ bins of the count (``[1, 2), [2, 4), …``;
  a count of 0, a sequence absent from the index, is its own bin and left out of the fit);
- :func:`log_linear_fit`: the least-squares line ``extractable = a + b · log10 count`` over the
  sequences (a linear probability model; the rate grows log-linearly with duplication), with the
  usual OLS standard errors ``se(b) = sqrt(σ² / Σ(x − x̄)²)``, ``σ² = RSS / (n − 2)``.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from memscan.errors import InputError
from memscan.lm.corpus_index import CorpusIndex, check_tokenizer


def window_bytes(lm, ids, *, document_start: bool = False) -> bytes:
    """The UTF-8 bytes of the text the tokens ``ids`` stand for inside their document.

    Decoding a window alone does not always give that text: a SentencePiece tokenizer (Llama,
    T5, …) drops the leading space of the first token (``"▁word"`` decodes to ``"word"``, whose
    bytes also occur inside ``"sword"``). So a window that does not start its document is decoded
    after one more token, its own first token: ``decode([t₀, *ids])`` with ``decode([t₀])`` cut
    from its front, where the space is kept. A window at a document's start
    (``document_start``) is decoded alone: there the tokenizer added that space itself (the
    dummy prefix), and the document's bytes do not hold it. Byte-level tokenizers (GPT-2, ByT5)
    give the same bytes either way. A tokenizer whose decoding of ``[t₀, *ids]`` does not start
    with that of ``t₀`` is refused (its windows' text is not known).
    """
    ids = [int(t) for t in np.asarray(ids).ravel()]
    if document_start or not ids:
        return lm.decode(ids).encode("utf-8")
    head, both = lm.decode(ids[:1]), lm.decode(ids[:1] + ids)
    if not both.startswith(head):
        raise InputError(
            f"the model's tokenizer decodes token {ids[0]} as {head!r} alone but not at the front of "
            f"{both[: len(head) + 20]!r}, so the text of a window of tokens is not known for the byte index",
            "index the corpus with the model's tokenizer instead (memscan lm index CORPUS --tokenizer MODEL)",
        )
    return both[len(head) :].encode("utf-8")


def duplicate_counts(
    index: CorpusIndex, tokens: np.ndarray, left: int, prefix_lengths, suffix_length: int, lm=None, starts=None
):
    """``(suffix_count[N], window_count[N, K])`` for windows ``tokens`` (N × (left + right)), the
    suffix starting at column ``left``; ``window_count[:, j]`` is for ``prefix_lengths[j]``.

    ``lm`` (its ``decode``) is needed with a byte-mode index (:func:`window_bytes`), and so is
    ``starts``, the document token index of each row's column 0 (``offset − left``; ``None``: no
    row starts its document); a token-mode index must share its tokenizer
    (:func:`memscan.lm.corpus_index.check_tokenizer`)."""
    if lm is not None:
        check_tokenizer(index, lm)
    n = len(tokens)
    row_at_start = np.zeros(n, dtype=bool) if starts is None else np.asarray(starts) == 0

    def key(i, a, b):
        if index.mode == "bytes":
            return window_bytes(lm, tokens[i, a:b], document_start=bool(row_at_start[i] and a == 0))
        return tokens[i, a:b]

    suffix = np.zeros(n, dtype=np.int64)
    window = np.zeros((n, len(prefix_lengths)), dtype=np.int64)
    for i in range(n):
        suffix[i] = index.count(key(i, left, left + suffix_length))
        for j, k in enumerate(prefix_lengths):
            window[i, j] = index.count(key(i, left - k, left + suffix_length))
    return suffix, window


def log2_bin(counts) -> np.ndarray:
    """The log₂ bin of each count: 0 for 0, else ``floor(log2 c) + 1`` (bin b holds ``[2^(b−1), 2^b)``).

    >>> log2_bin([0, 1, 2, 3, 4, 1000]).tolist()
    [0, 1, 2, 2, 3, 10]
    """
    c = np.asarray(counts, dtype=np.int64)
    out = np.zeros(len(c), dtype=np.int64)
    pos = c > 0
    out[pos] = np.floor(np.log2(c[pos])).astype(np.int64) + 1
    return out


def log_linear_fit(counts, outcome) -> dict | None:
    """Least squares of ``outcome`` (0/1 or a rate) on ``log10 count`` over the rows with
    count ≥ 1: slope (per decade of duplication), intercept, their standard errors, n.

    None when fewer than 3 rows or a single distinct count (no slope to estimate).

    >>> f = log_linear_fit([1, 10, 100, 1000], [0.0, 0.2, 0.4, 0.6])
    >>> round(f["slope_per_decade"], 6), round(f["intercept"], 6), round(f["slope_se"], 6)
    (0.2, 0.0, 0.0)
    """
    c = np.asarray(counts, dtype=float)
    y = np.asarray(outcome, dtype=float)
    keep = c >= 1
    x, y = np.log10(c[keep]), y[keep]
    n = len(x)
    if n < 3 or np.ptp(x) == 0:
        return None
    # 1. the normal equations of y = a + b x
    xm, ym = x.mean(), y.mean()
    sxx = float(((x - xm) ** 2).sum())
    b = float(((x - xm) * (y - ym)).sum() / sxx)
    a = float(ym - b * xm)
    # 2. residual variance and the standard errors of b and a
    rss = float(((y - a - b * x) ** 2).sum())
    s2 = rss / (n - 2)
    return {
        "slope_per_decade": b,
        "intercept": a,
        "slope_se": math.sqrt(s2 / sxx),
        "intercept_se": math.sqrt(s2 * (1.0 / n + xm**2 / sxx)),
        "n": int(n),
    }


def duplication_curve(counts, extractable) -> pd.DataFrame:
    """The extractable rate by log₂ bin of the duplicate count: ``bin``, ``low``, ``high``
    (counts ``low ≤ c < high``; bin 0 is c = 0), ``sequences``, ``mean_count``, ``extractable_rate``."""
    c = np.asarray(counts, dtype=np.int64)
    e = np.asarray(extractable, dtype=float)
    b = log2_bin(c)
    rows = []
    for k in np.unique(b):
        sel = b == k
        rows.append(
            {
                "bin": int(k),
                "low": 0 if k == 0 else int(2 ** (k - 1)),
                "high": 1 if k == 0 else int(2**k),
                "sequences": int(sel.sum()),
                "mean_count": float(c[sel].mean()),
                "extractable_rate": float(e[sel].mean()),
            }
        )
    return pd.DataFrame(rows, columns=["bin", "low", "high", "sequences", "mean_count", "extractable_rate"])


def duplication_summary(table: pd.DataFrame) -> dict | None:
    """Per prefix length: the curve over ``window_count`` and its log-linear fit, and the same over
    ``suffix_count`` (None when the table has no counts)."""
    if "window_count" not in table:
        return None
    out = {}
    for k, g in table.groupby("prefix_len", sort=True):
        out[int(k)] = {
            "window": {
                "curve": duplication_curve(g["window_count"], g["extractable"]).to_dict("records"),
                "fit": log_linear_fit(g["window_count"], g["extractable"]),
            },
            "suffix": {
                "curve": duplication_curve(g["suffix_count"], g["extractable"]).to_dict("records"),
                "fit": log_linear_fit(g["suffix_count"], g["extractable"]),
            },
        }
    return out
