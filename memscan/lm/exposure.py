"""Canary exposure (Carlini et al. 2019, "The Secret Sharer: Evaluating and Testing Unintended
Memorization in Neural Networks", Sec. 4).

A *format* is text with holes, e.g. ``my PIN is {d6}`` (``{dN}``: N decimal digits; several holes
allowed); its *randomness space* ``R`` is every filling (``|R| = 10^(total digits)``). A canary
``s[r]`` is one filling that was inserted into the training data.

- **log-perplexity** (Def. 1): ``Px(s) = −Σ_t log2 p(x_t | x_<t)`` over the tokens of the whole
  canary text after its first token (the first token is shared by every candidate of a format whose
  text does not start with a hole; in any case every candidate is scored the same way).
- **rank** (Def. 2): the canary's position among all candidates ordered by log-perplexity, 1 = the
  most likely. Ties: ``rank = 1 + #{r ≠ s : Px(r) < Px(s)}`` (candidates with exactly the same
  log-perplexity do not push the canary down; they are counted in ``ties``).
- **exposure** (Def. 3): ``exposure = log2 |R| − log2 rank``, from 0 (the canary is the least
  likely candidate… the rank |R|) to ``log2 |R|`` (rank 1).
- **estimate** (Sec. 4.3, "extrapolation" by a fitted distribution): when ``|R|`` is too large to
  enumerate (here above :data:`EXACT_LIMIT` = 10^5), sample candidates uniformly from ``R``, fit a
  skew-normal distribution to their log-perplexities (``scipy.stats.skewnorm``), and report
  ``exposure ≈ −log2 F(Px(s))`` with ``F`` its CDF — the rank divided by ``|R|`` is the share of
  candidates at least as likely as the canary.

Examples
--------
>>> fmt = CanaryFormat.parse("my PIN is {d3}, and {d1}")
>>> fmt.space_size, fmt.fill(42), fmt.index_of("my PIN is 004, and 2")
(10000, 'my PIN is 004, and 2', 42)
>>> exposure_from_rank(1, 1000), exposure_from_rank(1000, 1000)
(9.965784284662087, 0.0)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from memscan.errors import InputError

#: Enumerate R exactly when |R| is at most this; above, estimate with a fitted skew-normal.
EXACT_LIMIT = 10**5
_HOLE = re.compile(r"\{d(\d+)\}")


@dataclass(frozen=True)
class CanaryFormat:
    """A canary format: literal pieces and digit holes (``parts``: str literals, int hole widths)."""

    text: str
    parts: tuple

    @classmethod
    def parse(cls, text: str) -> CanaryFormat:
        parts, pos = [], 0
        for m in _HOLE.finditer(text):
            if m.start() > pos:
                parts.append(text[pos : m.start()])
            width = int(m.group(1))
            if width < 1:
                raise InputError(f"canary format {text!r} has an empty hole {m.group(0)}", "use {d1} or wider")
            parts.append(width)
            pos = m.end()
        if pos < len(text):
            parts.append(text[pos:])
        if not any(isinstance(p, int) for p in parts):
            raise InputError(f"canary format {text!r} has no hole", "mark the secret, e.g. 'my PIN is {d6}'")
        return cls(text, tuple(parts))

    @property
    def digits(self) -> int:
        return sum(p for p in self.parts if isinstance(p, int))

    @property
    def space_size(self) -> int:
        """|R| = 10^(total digits)."""
        return 10**self.digits

    def fill(self, index: int) -> str:
        """The candidate with secret ``index`` (its digits, zero-padded, spread over the holes)."""
        if not 0 <= index < self.space_size:
            raise InputError(f"secret {index} is outside 0..{self.space_size - 1}", "")
        digits = str(int(index)).zfill(self.digits)
        out, pos = [], 0
        for p in self.parts:
            if isinstance(p, int):
                out.append(digits[pos : pos + p])
                pos += p
            else:
                out.append(p)
        return "".join(out)

    def index_of(self, canary: str) -> int:
        """The secret of ``canary`` (which must match the format)."""
        pattern = "".join(rf"(\d{{{p}}})" if isinstance(p, int) else re.escape(p) for p in self.parts)
        m = re.fullmatch(pattern, canary)
        if not m:
            raise InputError(
                f"canary {canary!r} does not match its format {self.text!r}",
                "the canary must be the format with each {dN} replaced by N digits",
            )
        return int("".join(m.groups()))


def exposure_from_rank(rank: int | float, space_size: int) -> float:
    """Carlini et al. 2019 Def. 3: ``log2 |R| − log2 rank``."""
    return float(math.log2(space_size) - math.log2(rank))


def log_perplexity(lm, texts: list[str], *, batch_size: int = 256) -> np.ndarray:
    """``Px`` in bits of each text (Carlini et al. 2019 Def. 1), batched by token length (no padding).

    With ``lm.token_logprobs_shared_prefix`` (the transformers adapter has it), the common first
    tokens of a batch go through the model once."""
    encoded = [np.asarray(lm.encode(t), dtype=np.int64) for t in texts]
    # candidates of one format share their first tokens: an adapter that can reuse the KV cache
    # of the shared prefix scores only the tails (the same numbers up to float rounding)
    score = getattr(lm, "token_logprobs_shared_prefix", None) or lm.token_logprobs
    out = np.zeros(len(texts), dtype=np.float64)
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    for length, rows in by_len.items():
        if length < 2:
            raise InputError(f"canary {texts[rows[0]]!r} is a single token", "use a longer canary format")
        for lo in range(0, len(rows), batch_size):
            chunk = rows[lo : lo + batch_size]
            lp = np.asarray(score(np.stack([encoded[i] for i in chunk])), dtype=np.float64)
            out[chunk] = -lp.sum(axis=1) / math.log(2)
    return out


def count_lower(lm, fmt: CanaryFormat, canary_px: float, lo: int, hi: int, *, skip: int = -1, batch_size: int = 256):
    """``(n_lower, n_ties)`` among candidates ``lo ≤ r < hi`` (except ``skip``, the canary itself):
    how many have a log-perplexity below / equal to ``canary_px``."""
    lower = ties = 0
    for start in range(lo, hi, batch_size * 4):
        idx = [r for r in range(start, min(hi, start + batch_size * 4)) if r != skip]
        px = log_perplexity(lm, [fmt.fill(r) for r in idx], batch_size=batch_size)
        lower += int(np.sum(px < canary_px))
        ties += int(np.sum(px == canary_px))
    return lower, ties


def exact_exposure(lm, fmt: CanaryFormat, canary: str, *, batch_size: int = 256) -> dict:
    """Exposure by enumerating all of ``R`` (Carlini et al. 2019 Def. 2–3)."""
    if fmt.space_size > EXACT_LIMIT * 100:
        raise InputError(f"|R| = {fmt.space_size} is too large to enumerate", "use estimated_exposure")
    secret = fmt.index_of(canary)
    px = float(log_perplexity(lm, [canary])[0])
    lower, ties = count_lower(lm, fmt, px, 0, fmt.space_size, skip=secret, batch_size=batch_size)
    rank = 1 + lower
    return {"log_perplexity": px, "rank": rank, "ties": ties, "exposure": exposure_from_rank(rank, fmt.space_size)}


def sample_secrets(fmt: CanaryFormat, n: int, seed: int) -> np.ndarray:
    """``n`` secrets drawn uniformly from R (with replacement), reproducibly."""
    rng = np.random.default_rng(seed)
    if fmt.space_size <= 2**62:
        return rng.integers(0, fmt.space_size, size=n, dtype=np.int64)
    raise InputError(f"canary format {fmt.text!r} has more than 18 digits", "use at most 18 digits")


def skewnorm_exposure(sample_px: np.ndarray, canary_px: float) -> dict:
    """Carlini et al. 2019 Sec. 4.3: fit a skew-normal to sampled log-perplexities; ``−log2 F(Px(s))``."""
    from scipy.stats import skewnorm

    x = np.asarray(sample_px, dtype=np.float64)
    if x.size < 10 or np.ptp(x) == 0:
        raise InputError(f"{x.size} sampled log-perplexities cannot be fitted", "sample more candidates")
    a, loc, scale = skewnorm.fit(x)
    log_cdf = float(skewnorm.logcdf(canary_px, a, loc, scale))
    return {
        "exposure": max(0.0, -log_cdf / math.log(2)),
        "skewnorm_a": float(a),
        "skewnorm_loc": float(loc),
        "skewnorm_scale": float(scale),
        "empirical_share_lower": float(np.mean(x < canary_px)),
    }


def estimated_exposure(
    lm, fmt: CanaryFormat, canary: str, *, samples: int = 10_000, seed: int = 0, batch_size: int = 256
) -> dict:
    """Exposure estimated from ``samples`` uniform candidates and a fitted skew-normal (Sec. 4.3)."""
    fmt.index_of(canary)
    px = float(log_perplexity(lm, [canary])[0])
    secrets = sample_secrets(fmt, samples, seed)
    sample_px = log_perplexity(lm, [fmt.fill(int(r)) for r in secrets], batch_size=batch_size)
    return {"log_perplexity": px, **skewnorm_exposure(sample_px, px)}
