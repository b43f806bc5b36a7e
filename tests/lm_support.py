"""Small causal language models for the ``lm mia`` tests, behind the causal-LM protocol.

``ByteBigram``: a byte-level bigram model with add-α smoothing, fitted on a list of texts — a
model that "memorized" its training texts, with next-token distributions known exactly (numpy),
so the run's scores can be checked against a direct computation. ``py:lm_support:bigram`` loads
the one fitted on :data:`MEMBERS` (the Ray workers import it the same way).
"""

from __future__ import annotations

import numpy as np

MEMBERS = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine, or so they say",
    "all that glitters is not gold, said the old man",
    "to be or not to be, that is the question here",
    "the early bird catches the worm before the rain",
    "an apple a day keeps the doctor away from town",
    "every cloud has a silver lining after the storm",
    "the pen is mightier than the sword in the end",
]
NONMEMBERS = [
    "purple elephants dance quietly beneath frozen lakes",
    "seventeen violins whispered to a curious lighthouse",
    "my neighbour's kettle composes jazz on tuesdays",
    "crimson bicycles rarely argue with polite mountains",
    "a velvet tornado borrowed three spoons yesterday",
    "quantum muffins orbit the sleepy library at noon",
    "the glass giraffe forgot its umbrella in paris",
    "eleven foxes knitted a scarf for the moon again",
]


class ByteBigram:
    """log p(b | a) = log (count(a, b) + α) / (count(a) + 256 α) over the bytes of ``texts``."""

    vocab_size = 256
    eos_token_id = None

    def __init__(self, texts, alpha: float = 0.1):
        counts = np.full((256, 256), float(alpha))
        for t in texts:
            b = np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64)
            np.add.at(counts, (b[:-1], b[1:]), 1.0)
        self.table = np.log(counts / counts.sum(axis=1, keepdims=True))
        self.parameters = int(self.table.size)
        self.spec = "py:lm_support:bigram"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in np.asarray(ids).ravel()).decode("utf-8", errors="replace")

    def next_token_logprobs(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        return self.table[ids[:, :-1]]

    def token_logprobs(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        return np.take_along_axis(self.next_token_logprobs(ids), ids[:, 1:, None], axis=-1)[..., 0]

    def greedy(self, prefixes, n_new):  # not used by lm mia
        raise NotImplementedError

    def describe(self) -> dict:
        return {"class": "ByteBigram", "spec": self.spec, "vocab_size": 256, "tokenizer": {"name": "bytes"}}


class TokenLogprobsOnly(ByteBigram):
    """A user's model without next-token distributions: no Min-K%++."""

    next_token_logprobs = None  # type: ignore[assignment]

    def token_logprobs(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        return np.take_along_axis(self.table[ids[:, :-1]], ids[:, 1:, None], axis=-1)[..., 0]


def bigram() -> ByteBigram:
    """The bigram fitted on :data:`MEMBERS` (``py:lm_support:bigram``)."""
    return ByteBigram(MEMBERS)


def reference_bigram() -> ByteBigram:
    """A reference model fitted on other text (``py:lm_support:reference_bigram``)."""
    m = ByteBigram(NONMEMBERS[:4] + ["some other english text about ordinary things, said the man"])
    m.spec = "py:lm_support:reference_bigram"
    return m


class MomentsBigram(ByteBigram):
    """The bigram with the optional ``next_token_moments`` of the adapter (computed here by the
    paper's formula, independently of memscan.lm.membership)."""

    calls = 0

    def next_token_moments(self, ids):
        MomentsBigram.calls += 1
        nlp = self.next_token_logprobs(ids)
        p = np.exp(nlp)
        mu = (p * nlp).sum(-1)
        sigma = np.sqrt(np.maximum((p * nlp**2).sum(-1) - mu**2, 0.0))
        tok = np.take_along_axis(nlp, np.asarray(ids)[:, 1:, None], axis=-1)[..., 0]
        return tok, mu, sigma
