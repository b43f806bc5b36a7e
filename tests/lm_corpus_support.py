"""Shared inputs of the language-model tests: a small corpus with memorized and unseen documents,
and a lookup "model" (py:lm_corpus_support:lookup) that has memorized exactly the ``MEMORIZED`` ones."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

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
