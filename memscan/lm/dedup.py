"""Fuzzy de-duplication of generated samples by word trigrams (Carlini et al. 2021, §6.1 "Data
De-Duplication").

The paper's rule, exactly: ``tri(s)`` is the **multiset** of word-level trigrams of ``s``, words
split on whitespace and punctuation (any Unicode punctuation character, category P*, such as
"—" and "“", and the ASCII ``string.punctuation``); ``s1`` is a duplicate of ``s2`` when

    |tri(s1) ∩ tri(s2)| ≥ |tri(s1)| / 2

(multiset intersection: a shared trigram counts ``min`` of its two multiplicities). The relation
is not symmetric: a short sample inside a long one is a duplicate of it, not the reverse.

The paper applies it while selecting the top 100 samples of each ranking. memscan applies it once
over all samples, walking them in a given order (:func:`greedy_dedup`; the extraction run walks
them by increasing perplexity, so the kept copy of a group is its most likely one): a sample is
kept unless it is a duplicate of a sample kept before it. Every ranking then sees the same kept
set, and ``samples.parquet`` has one row per kept sample.

A sample with no trigram (fewer than three words) has ``|tri| = 0``, which the rule would make a
duplicate of everything; memscan calls it a duplicate only of a kept sample with the same text.

Examples
--------
>>> sorted(word_trigrams("my name my name my name").items())
[(('my', 'name', 'my'), 2), (('name', 'my', 'name'), 2)]
>>> words("“Wait”—she said")
['Wait', 'she', 'said']
>>> is_near_duplicate("a b c d e", "a b c d x y z")  # 2 of 3 trigrams shared
True
>>> greedy_dedup(["a b c d e", "x y z w", "a b c d e f"]).keep.tolist()
[0, 1]
"""

from __future__ import annotations

import functools
import re
import string
import sys
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

__all__ = ["DedupResult", "greedy_dedup", "is_near_duplicate", "trigram_overlap", "word_trigrams", "words"]


@functools.cache
def _split_pattern() -> re.Pattern:
    """Whitespace, ASCII ``string.punctuation`` and every Unicode punctuation character (general
    category P*: Pc, Pd, Ps, Pe, Pi, Pf, Po), as one character class (built once, ≈ 0.1 s)."""
    punct = {c for c in string.punctuation}
    punct.update(chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)).startswith("P"))
    return re.compile("[\\s" + "".join(re.escape(c) for c in sorted(punct)) + "]+")


def words(text: str) -> list[str]:
    """``text`` split on whitespace and punctuation — Unicode category P* and ASCII
    ``string.punctuation`` — with empty pieces dropped."""
    return [w for w in _split_pattern().split(text) if w]


def word_trigrams(text: str) -> Counter:
    """The multiset ``tri(text)`` of consecutive word triples (Carlini et al. 2021, §6.1 "Data De-Duplication")."""
    w = words(text)
    return Counter(zip(w, w[1:], w[2:]))


def trigram_overlap(a: Counter, b: Counter) -> int:
    """``|a ∩ b|`` of two trigram multisets (sum of the smaller multiplicities)."""
    if len(a) > len(b):
        a, b = b, a
    return sum(min(n, b[t]) for t, n in a.items() if t in b)


def is_near_duplicate(s1: str, s2: str) -> bool:
    """``|tri(s1) ∩ tri(s2)| ≥ |tri(s1)| / 2`` (Carlini et al. 2021, §6.1 "Data De-Duplication"); with no trigram in
    ``s1``, equal texts only."""
    t1 = word_trigrams(s1)
    if not t1:
        return s1 == s2
    return 2 * trigram_overlap(t1, word_trigrams(s2)) >= sum(t1.values())


@dataclass
class DedupResult:
    """Which samples a :func:`greedy_dedup` kept.

    Attributes
    ----------
    keep : indices of the kept samples, in walking order
    duplicate_of : per sample (input order), the index of the kept sample it duplicates, −1 if kept
    duplicates : per sample, how many samples were removed as its duplicates (0 for removed ones)
    """

    keep: np.ndarray
    duplicate_of: np.ndarray
    duplicates: np.ndarray


def greedy_dedup(texts: list[str], order=None) -> DedupResult:
    """Walk ``texts`` in ``order`` (default: as given); keep a sample unless it is a near duplicate
    (:func:`is_near_duplicate`) of a sample kept before it.

    The overlaps with all kept samples are counted at once from an inverted index (trigram → kept
    samples holding it, with multiplicity), so the cost is the total length of the posting lists
    touched, not the number of pairs. A removed sample is attributed to the kept sample of largest
    overlap (the lowest sample index on ties).
    """
    n = len(texts)
    order = np.arange(n) if order is None else np.asarray(order, dtype=np.int64)
    if sorted(order.tolist()) != list(range(n)):
        raise ValueError("order must be a permutation of the samples")
    postings: dict[tuple, list[tuple[int, int]]] = defaultdict(list)  # trigram → [(kept sample, count)]
    exact: dict[str, int] = {}  # texts of kept samples without trigrams
    duplicate_of = np.full(n, -1, dtype=np.int64)
    keep: list[int] = []
    for i in order.tolist():
        tri = word_trigrams(texts[i])
        # 1. samples without trigrams: duplicates only of an equal kept text
        if not tri:
            j = exact.get(texts[i])
            if j is None:
                j = next((k for k in keep if texts[k] == texts[i]), None)
            if j is not None:
                duplicate_of[i] = j
                continue
            exact[texts[i]] = i
            keep.append(i)
            continue
        # 2. |tri(i) ∩ tri(k)| for every kept k, from the posting lists of i's trigrams
        overlap: dict[int, int] = defaultdict(int)
        for t, c in tri.items():
            for k, ck in postings.get(t, ()):
                overlap[k] += min(c, ck)
        size = sum(tri.values())
        best = max(((v, -k) for k, v in overlap.items() if 2 * v >= size), default=None)
        if best is not None:
            duplicate_of[i] = -best[1]
            continue
        # 3. kept: index its trigrams
        keep.append(i)
        for t, c in tri.items():
            postings[t].append((i, c))
    dup = np.zeros(n, dtype=np.int64)
    for j in duplicate_of[duplicate_of >= 0]:
        dup[j] += 1
    return DedupResult(np.asarray(keep, dtype=np.int64), duplicate_of, dup)
