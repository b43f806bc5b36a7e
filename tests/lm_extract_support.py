"""Models and corpora for the ``lm extract`` tests: copy models (:class:`LookupLM`) whose samples
reproduce their training text, so which samples the corpus index must confirm is known.

``py:lm_extract_support:copy_lm`` and ``py:lm_extract_support:reference_lm`` load them by spec (the
Ray workers import them the same way); ``no_start_lm`` has no BOS/EOS token; ``merge_lm`` copies
the same documents over a tokenizer with merges, sampling them in non-canonical tokens.
"""

from __future__ import annotations

import numpy as np

from memscan.generators.causal_lm import vocab_sha256
from memscan.testing.lookup_lm import LookupLM

#: The copy model's training documents: one holds markup that the report must escape.
DOCS = [
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa. " * 3,
    "warning <script>alert('x')</script> the quick brown fox jumps over the lazy dog near the river bank. " * 3,
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen. " * 3,
]
#: Prompts that start the copy model inside its documents.
PROMPTS = ["alpha ", "warning ", "one ", "xyz "]
#: Other text for the reference model.
OTHER = ["the weather today is mild with a light breeze from the west and some clouds later on. " * 2]


def copy_lm() -> LookupLM:
    """An order-8 byte lookup model of :data:`DOCS`, nearly deterministic (confidence 0.999), no EOS."""
    lm = LookupLM.from_texts(DOCS, order=8, confidence=0.999)
    lm.eos_token_id = None
    lm.spec = "py:lm_extract_support:copy_lm"
    return lm


def reference_lm() -> LookupLM:
    """A lookup model of other text (``reference_ratio``)."""
    lm = LookupLM.from_texts(OTHER, order=4, confidence=0.9)
    lm.eos_token_id = None
    lm.spec = "py:lm_extract_support:reference_lm"
    return lm


def no_start_lm() -> LookupLM:
    """A copy model without BOS or EOS: unconditional samples have nothing to start from."""
    lm = copy_lm()
    lm.spec = "py:lm_extract_support:no_start_lm"
    return lm


#: Multi-byte tokens of :class:`MergeLM` (none in :data:`PROMPTS`, so a prompt encodes to bytes).
PIECES = ["bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima",
          "mike", "november", "oscar", "papa", "quick", "brown", "jumps", "over", "lazy", "river", "bank", "three",
          "four", "five", "seven", "eight", "nine", "eleven", "twelve", "thirteen", "fourteen", "fifteen",
          "sixteen"]  # fmt: skip


class MergeLM(LookupLM):
    """The copy model over a tokenizer with merges: ids 0–255 are bytes, 256 the end token,
    257 + i the piece :data:`PIECES`\\ [i]. ``encode`` is the canonical tokenization (greedy
    longest piece, else a byte), the one a corpus index of :data:`DOCS` holds; the model was
    trained on the documents' *bytes*, so it samples them byte by byte — a non-canonical spelling
    of the same text ("b" "r" "a" "v" "o" for "bravo"), as a BPE model may sample "hel" + "lo"."""

    def __init__(self):
        seqs = [np.frombuffer(d.encode("utf-8"), dtype=np.uint8).astype(np.int64) for d in DOCS]
        super().__init__(seqs, 257 + len(PIECES), order=8, confidence=0.999, eos_token_id=None)
        self.pieces = [bytes([i]) for i in range(256)] + [b""] + [p.encode() for p in PIECES]
        self.spec = "py:lm_extract_support:merge_lm"

    def encode(self, text: str) -> np.ndarray:
        b, out, i = text.encode("utf-8"), [], 0
        while i < len(b):
            hit = max((k for k, p in enumerate(PIECES) if b.startswith(p.encode(), i)), key=lambda k: len(PIECES[k]),
                      default=None)  # fmt: skip
            out.append(b[i] if hit is None else 257 + hit)
            i += 1 if hit is None else len(PIECES[hit])
        return np.asarray(out, dtype=np.int64)

    def decode(self, ids) -> str:
        return b"".join(self.pieces[int(i)] for i in np.asarray(ids).ravel()).decode("utf-8", errors="replace")

    def describe(self) -> dict:
        d = super().describe()
        d["tokenizer"] = {**d["tokenizer"], "name": "merge", "vocab_sha256": vocab_sha256(
            {p.decode("latin-1"): i for i, p in enumerate(self.pieces)})}  # fmt: skip
        return d


def merge_lm() -> MergeLM:
    return MergeLM()
