"""The LM demo's corpus and its planted canaries, deterministic from a seed.

Two kinds of canary, each planted ``COPIES`` = 1, 2, 5, 10, 20, 50 and 100 times
(``PER_COUNT`` distinct canaries per count):

- **sentence** canaries: invented sentences of random modern words (never Shakespeare's), at least
  ``SENTENCE_MIN_CHARS`` characters, so that the demo's prefix (``PREFIX_BYTES``) and suffix
  (``SUFFIX_BYTES``) both lie inside them — for k-extractability (Carlini et al. 2021, 2023);
- **digit** canaries: ``DIGIT_FORMAT`` with a random ``DIGITS``-digit number — the "secret sharer"
  canaries of Carlini et al. 2019, whose exposure is computed exactly by enumerating all
  10**DIGITS numbers of the format.

Every copy is one line inserted at a seeded random line boundary of the corpus. The corpus is the
shipped ``shakespeare.txt.xz`` (see ``corpus.json`` and ``scripts/prepare_lm_corpus.py``).
"""

from __future__ import annotations

import hashlib
import json
import lzma
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CORPUS_XZ = HERE / "shakespeare.txt.xz"
CORPUS_JSON = HERE / "corpus.json"

COPIES: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100)
PER_COUNT = 4
PREFIX_BYTES = 32
SUFFIX_BYTES = 50
SENTENCE_MIN_CHARS = 100
DIGITS = 5
DIGIT_PREFIX = "the secret number is "
DIGIT_FORMAT = DIGIT_PREFIX + "{digits}"
DEFAULT_SEED = 13

# modern words, absent from (or rare in) the plays, so a sentence of them is plainly invented
_WORDS = (
    "yellow submarine laptop garage velvet pixel quantum bicycle orbit tunnel parking ticket "
    "granite violin marathon compass railway cinnamon harbor magnet saxophone drone helmet "
    "zebra kayak pancake thermostat wizard basement blender ladder satellite teapot lantern "
    "cactus fossil galaxy hammock igloo jigsaw ketchup lobster meteor napkin origami penguin "
    "quiz robot scooter tractor umbrella vinyl walrus xylophone yogurt zipper battery carpet "
    "diesel elevator freezer gadget hotel insulin jacket kiosk lemonade motel neon oven "
    "parcel radar salad tablet uniform vacuum waffle yacht airport bamboo cable dolphin "
    "espresso flamingo glacier hurricane invoice jasmine kettle llama muffin nickel octopus "
    "pretzel raccoon sandwich tornado upload volcano wallet broccoli cardboard dinosaur "
    "envelope football guitar hedgehog keyboard mailbox notebook pajamas printer rocket "
    "spaghetti telescope trombone uranium visitor window orange purple silver crimson turquoise "
    "plastic electric frozen digital rusty fluffy shiny noisy sleepy clever purple striped "
    "borrowed painted folded rented cloned scanned parked printed recycled charged"
).split()


@dataclass(frozen=True)
class Canary:
    id: str
    kind: str  # "sentence" or "digits"
    text: str
    copies: int


def canaries(seed: int = DEFAULT_SEED) -> list[Canary]:
    """The planted canaries (``2 × len(COPIES) × PER_COUNT`` of them), deterministic from ``seed``."""
    rng = np.random.default_rng([seed, 1])
    out: list[Canary] = []
    seen_prefix: set[str] = set()
    for c in COPIES:
        for j in range(PER_COUNT):
            while True:
                words: list[str] = []
                while len(" ".join(words)) < SENTENCE_MIN_CHARS:
                    words.append(_WORDS[int(rng.integers(len(_WORDS)))])
                text = " ".join(words).capitalize() + "."
                if text[:PREFIX_BYTES] not in seen_prefix:
                    seen_prefix.add(text[:PREFIX_BYTES])
                    break
            out.append(Canary(f"s{c:03d}-{j}", "sentence", text, c))
    seen_digits: set[str] = set()
    for c in COPIES:
        for j in range(PER_COUNT):
            while True:
                d = "".join(str(int(x)) for x in rng.integers(0, 10, DIGITS))
                if d not in seen_digits:
                    seen_digits.add(d)
                    break
            out.append(Canary(f"d{c:03d}-{j}", "digits", DIGIT_FORMAT.format(digits=d), c))
    return out


@cache
def _corpus_text() -> str:
    data = lzma.decompress(CORPUS_XZ.read_bytes())
    return data.decode("ascii")


def corpus_record() -> dict:
    return json.loads(CORPUS_JSON.read_text())


def corpus_text(check: bool = True) -> str:
    """The prepared plays (plain ASCII), checked against the recorded sha256."""
    text = _corpus_text()
    if check:
        got = hashlib.sha256(text.encode("ascii")).hexdigest()
        want = corpus_record()["sha256"]
        if got != want:
            from memscan.errors import MemscanError

            raise MemscanError(
                f"{CORPUS_XZ}: corpus sha256 {got[:12]} != recorded {want[:12]}",
                "reinstall memscan, or rerun scripts/prepare_lm_corpus.py",
            )
    return text


@dataclass(frozen=True)
class PlantedCorpus:
    text: str
    canaries: list[Canary]
    positions: dict[str, list[int]]  # canary id -> line indices (in the planted text) of its copies
    seed: int

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("ascii")).hexdigest()

    def ground_truth(self) -> dict:
        return {
            "seed": self.seed,
            "sha256": self.sha256,
            "canaries": [asdict(c) | {"lines": self.positions[c.id]} for c in self.canaries],
        }


def planted_corpus(seed: int = DEFAULT_SEED) -> PlantedCorpus:
    """The plays with every canary copy inserted as its own line at a seeded random line boundary."""
    lines = corpus_text().split("\n")
    cans = canaries(seed)
    rng = np.random.default_rng([seed, 2])
    items = [(c.id, c.text) for c in cans for _ in range(c.copies)]
    # insertion points: before original line i (0..len(lines)), seeded; ties keep the items' order
    where = rng.integers(0, len(lines) + 1, len(items))
    order = np.lexsort((rng.permutation(len(items)), where))
    out: list[str] = []
    positions: dict[str, list[int]] = {c.id: [] for c in cans}
    k = 0
    for i in range(len(lines) + 1):
        while k < len(order) and where[order[k]] == i:
            cid, text = items[order[k]]
            positions[cid].append(len(out))
            out.append(text)
            k += 1
        if i < len(lines):
            out.append(lines[i])
    return PlantedCorpus("\n".join(out), cans, positions, seed)


def ordinary_passages(n: int, seed: int = DEFAULT_SEED, length: int = PREFIX_BYTES + SUFFIX_BYTES) -> list[str]:
    """``n`` random passages of the plays (``length`` bytes, each starting at a line of at least
    ``PREFIX_BYTES`` characters), the control set: mostly not extractable from a model that has not
    memorized its whole training text."""
    text = corpus_text()
    starts = [0]
    for i, ch in enumerate(text):
        if ch == "\n":
            starts.append(i + 1)
    starts = np.asarray(starts[:-1])
    ends = np.append(starts[1:] - 1, len(text))
    ok = starts[((ends - starts) >= PREFIX_BYTES) & (starts + length <= len(text))]
    rng = np.random.default_rng([seed, 3])
    pick = np.sort(rng.choice(len(ok), size=n, replace=False))
    return [text[s : s + length] for s in ok[pick]]
