"""Models and corpora for the ``lm extract`` tests: copy models (:class:`LookupLM`) whose samples
reproduce their training text, so which samples the corpus index must confirm is known.

``py:lm_extract_support:copy_lm`` and ``py:lm_extract_support:reference_lm`` load them by spec (the
Ray workers import them the same way); ``no_start_lm`` has no BOS/EOS token.
"""

from __future__ import annotations

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
