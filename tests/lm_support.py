"""Shared inputs of the language-model tests: a small corpus with memorized and unseen documents,
and a lookup "model" (py:lm_support:lookup) that has memorized exactly the ``MEMORIZED`` ones.

For ``lm mia`` (below): ``ByteBigram``, a byte-level bigram model with add-α smoothing fitted on a
list of texts — a model that "memorized" its training texts, with next-token distributions known
exactly (numpy), so the run's scores can be checked against a direct computation.
``py:lm_support:bigram`` loads the one fitted on :data:`MEMBERS` (the Ray workers import it the
same way)."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import numpy as np

from memscan.testing.lookup_lm import LookupLM


def _words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8))) for _ in range(n))


#: Documents the lookup model was trained on (it reproduces them given any 12-byte context: their
#: 12-byte substrings are unique).
MEMORIZED = [f"Record {i}: " + _words(i, 30) + "." for i in range(6)]
#: Documents it never saw.
UNSEEN = [f"Unseen {i}: " + _words(100 + i, 30) + "." for i in range(6)]


def write_corpus(path: Path) -> Path:
    """A JSONL corpus: memorized docs m0..m5, unseen docs u0..u5, and one too-short doc."""
    path = Path(path)
    with open(path, "w") as f:
        for i, t in enumerate(MEMORIZED):
            f.write(json.dumps({"id": f"m{i}", "text": t}) + "\n")
        for i, t in enumerate(UNSEEN):
            f.write(json.dumps({"id": f"u{i}", "text": t}) + "\n")
        f.write(json.dumps({"id": "short", "text": "too short"}) + "\n")
    return path


def lookup() -> LookupLM:
    """The lookup model of ``MEMORIZED`` (order 12: every 12-byte context in them is unique)."""
    return LookupLM.from_texts(MEMORIZED, order=12)


def not_a_causal_lm():
    return object()


# ---- lm mia (lmmia) ---------------------------------------------------------------------------------
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
