"""Canary exposure (Carlini et al. 2019, "The Secret Sharer: Evaluating and Testing Unintended
Memorization in Neural Networks", Sec. 4).

A *format* is text with holes, e.g. ``my PIN is {d6}`` (``{dN}``: N decimal digits; several holes
allowed); its *randomness space* ``R`` is every filling (``|R| = 10^(total digits)``). A canary
``s[r]`` is one filling that was inserted into the training data.

- **log-perplexity** (Def. 1): ``Px(s) = −Σ_t log2 p(x_t | x_0, x_<t)`` over *every* token
  ``x_1 … x_T`` of the canary's text, conditioned on ``x_0``, the model's start token
  (:func:`start_token`: its BOS token, else its EOS token — where a document starts). The first
  token is scored too, so a format that starts with a hole (``{d1} is it``) ranks its candidates
  by their first token as well.
- **rank** (Def. 2): ``rank(s) = |{r ∈ R : Px(s[r]) ≤ Px(s)}|``, the canary included, so
  ``rank = 1 + n_lower + n_ties`` with ``n_lower`` / ``n_ties`` the *other* candidates whose
  log-perplexity is below / equal to the canary's. Ties push the canary down: a model that gives
  every candidate the same probability ranks the canary ``|R|`` (exposure 0).
- **exposure** (Def. 3): ``exposure = log2 |R| − log2 rank``, from 0 (rank ``|R|``: no candidate
  is less likely than the canary) to ``log2 |R|`` (rank 1: the canary alone is the most likely).
- **estimate** (Sec. 4.3, "extrapolation" by a fitted distribution): when ``|R|`` is too large to
  enumerate (here above :data:`EXACT_LIMIT` = 10^5), sample candidates uniformly from ``R``, fit a
  skew-normal distribution to their log-perplexities (``scipy.stats.skewnorm``): the paper's
  extrapolated exposure is ``−log2 F(Px(s))`` with ``F`` its CDF (the share of candidates at
  least as likely as the canary is ``rank / |R|``). That extrapolation can exceed ``log2 |R|``
  (a "rank" below 1) when the canary lies further in the tail than the fit expects of any of the
  ``|R|`` candidates; the reported ``exposure`` is clipped to ``log2 |R|`` and ``clipped`` says so,
  with the unclipped value kept as ``extrapolated_exposure``.

Equal log-perplexities are compared exactly, which is sound because the canary and the candidates
it is compared with are scored *the same way*: :func:`compare_to_canary` adds the canary as one
more row to every batch of candidates of its token length, so both go through the same forward
pass (the shared-prefix KV cache of ``token_logprobs_shared_prefix`` included) and an equally
likely candidate gives the same float, to the last bit. Candidates of another token length are
compared with the canary scored alone (:func:`canary_log_perplexity`; the value reported as its
``log_perplexity``): their sums have a different number of terms, so only float rounding —
≤ 2e-5 bits on the demo-sized model — separates the two ways of scoring.

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
from memscan.generators.seeds import numpy_seed
from memscan.lm.decoding import document_start

#: Enumerate R exactly when |R| is at most this; above, estimate with a fitted skew-normal.
EXACT_LIMIT = 10**5
_HOLE = re.compile(r"\{d(\d+)\}")
#: The definitions an ``lm-exposure`` run records in its manifest (and checks on ``--resume``, so
#: that one run never mixes shards counted under two definitions).
DEFINITIONS = {
    "log_perplexity": "-sum of log2 p(x_t | x_0, x_<t) over every token of the canary; x_0 = BOS, else EOS",
    "rank": "|{r in R: Px(r) <= Px(canary)}| = 1 + n_lower + n_ties (ties push the canary down)",
    "exposure": "log2 |R| - log2 rank; an estimate: -log2 F(Px(canary)) clipped to log2 |R|",
}


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
        # ASCII digits only: R is the candidates ``fill`` writes ("٣" or "３" is no candidate's digit)
        pattern = "".join(rf"([0-9]{{{p}}})" if isinstance(p, int) else re.escape(p) for p in self.parts)
        m = re.fullmatch(pattern, canary)
        if not m:
            raise InputError(
                f"canary {canary!r} does not match its format {self.text!r}",
                "the canary must be the format with each {dN} replaced by N ASCII digits 0-9",
            )
        return int("".join(m.groups()))


def exposure_from_rank(rank: int | float, space_size: int) -> float:
    """Carlini et al. 2019 Def. 3: ``log2 |R| − log2 rank``."""
    return float(math.log2(space_size) - math.log2(rank))


def start_token(lm) -> int:
    """The token ``x_0`` every text is scored after, so that its first token is predicted too:
    the model's BOS token, else its EOS token (where a document starts; the context
    :func:`memscan.lm.sampling_attack.start_ids` samples from)."""
    tok = document_start(lm)
    if tok is None:
        raise InputError(
            "the model has neither a BOS nor an EOS token to score a canary's first token after",
            "give the model a bos_token_id (or eos_token_id): the token its training documents start after",
        )
    return int(tok)


def scored_ids(lm, text: str, start: int) -> np.ndarray:
    """``[start, *lm.encode(text)]``: the token ids a text is scored as (every token but ``start``
    is predicted)."""
    ids = np.asarray(lm.encode(text), dtype=np.int64).ravel()
    if ids.size == 0:
        raise InputError(f"canary {text!r} encodes to no token", "use a canary format with text")
    return np.concatenate([np.asarray([start], dtype=np.int64), ids])


def _score(lm, encoded: list[np.ndarray], batch_size: int, anchor: np.ndarray | None = None):
    """``(px, anchor_px)``: ``Px`` in bits of each row of ``encoded``, batched by token length (no
    padding); with ``anchor``, the anchor is one more row of every batch of its token length and
    ``anchor_px[i]`` is its ``Px`` in row ``i``'s batch (NaN for rows of another length)."""
    # candidates of one format share their first tokens: an adapter that can reuse the KV cache
    # of the shared prefix scores only the tails (the same numbers up to float rounding)
    score = getattr(lm, "token_logprobs_shared_prefix", None) or lm.token_logprobs
    out = np.zeros(len(encoded), dtype=np.float64)
    anchor_px = np.full(len(encoded), np.nan)
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    for length, rows in by_len.items():
        with_anchor = anchor is not None and len(anchor) == length
        for lo in range(0, len(rows), batch_size):
            chunk = rows[lo : lo + batch_size]
            batch = [anchor, *(encoded[i] for i in chunk)] if with_anchor else [encoded[i] for i in chunk]
            lp = np.asarray(score(np.stack(batch)), dtype=np.float64)
            px = -lp.sum(axis=1) / math.log(2)
            if with_anchor:
                anchor_px[chunk] = px[0]
                px = px[1:]
            out[chunk] = px
    return out, anchor_px


def log_perplexity(lm, texts: list[str], *, batch_size: int = 256) -> np.ndarray:
    """``Px`` in bits of each text (Carlini et al. 2019 Def. 1): ``−Σ log2 p`` over every token of
    the text after the model's start token (:func:`start_token`), batched by token length (no
    padding).

    With ``lm.token_logprobs_shared_prefix`` (the transformers adapter has it), the common first
    tokens of a batch go through the model once."""
    start = start_token(lm)
    return _score(lm, [scored_ids(lm, t, start) for t in texts], batch_size)[0]


def canary_log_perplexity(lm, canary: str) -> float:
    """The canary's ``Px`` in bits, scored alone: the ``log_perplexity`` an ``lm-exposure`` run
    reports (the same in every shard), and what candidates of another token length are compared
    with (:func:`compare_to_canary`)."""
    return float(log_perplexity(lm, [canary])[0])


def compare_to_canary(
    lm, texts: list[str], canary: str, canary_px: float, *, batch_size: int = 256
) -> tuple[np.ndarray, int, int]:
    """``(px, n_lower, n_ties)``: the log-perplexities of ``texts`` and how many are below / equal to
    the canary's (Carlini et al. 2019 Def. 2).

    A text of the canary's token length is compared with the canary scored in the same batch (the
    canary is one more row of it), so equal probabilities give equal floats; a text of another
    length with ``canary_px`` (the canary scored alone)."""
    start = start_token(lm)
    anchor = scored_ids(lm, canary, start)
    px, ref = _score(lm, [scored_ids(lm, t, start) for t in texts], batch_size, anchor=anchor)
    ref = np.where(np.isnan(ref), canary_px, ref)
    return px, int(np.sum(px < ref)), int(np.sum(px == ref))


def count_lower(
    lm, fmt: CanaryFormat, canary: str, lo: int, hi: int, *, canary_px: float | None = None, batch_size: int = 256
) -> tuple[int, int]:
    """``(n_lower, n_ties)`` among the candidates ``lo ≤ r < hi`` other than the canary itself: how
    many have a log-perplexity below / equal to the canary's (:func:`compare_to_canary`;
    ``canary_px``: :func:`canary_log_perplexity`, computed when not given). Summed over a partition
    of ``R``, ``rank = 1 + n_lower + n_ties``."""
    skip = fmt.index_of(canary)
    if canary_px is None:
        canary_px = canary_log_perplexity(lm, canary)
    lower = ties = 0
    for start in range(lo, hi, batch_size * 4):
        idx = [r for r in range(start, min(hi, start + batch_size * 4)) if r != skip]
        _, n_lower, n_ties = compare_to_canary(lm, [fmt.fill(r) for r in idx], canary, canary_px, batch_size=batch_size)
        lower += n_lower
        ties += n_ties
    return lower, ties


def exact_exposure(lm, fmt: CanaryFormat, canary: str, *, batch_size: int = 256) -> dict:
    """Exposure by enumerating all of ``R`` (Carlini et al. 2019 Def. 2–3):
    ``rank = 1 + n_lower + n_ties`` (ties push the canary down)."""
    if fmt.space_size > EXACT_LIMIT * 100:
        raise InputError(f"|R| = {fmt.space_size} is too large to enumerate", "use estimated_exposure")
    px = canary_log_perplexity(lm, canary)
    lower, ties = count_lower(lm, fmt, canary, 0, fmt.space_size, canary_px=px, batch_size=batch_size)
    rank = 1 + lower + ties
    return {"log_perplexity": px, "rank": rank, "ties": ties, "exposure": exposure_from_rank(rank, fmt.space_size)}


def sample_secrets(fmt: CanaryFormat, n: int, seed: int) -> np.ndarray:
    """``n`` secrets drawn uniformly from R (with replacement), reproducibly."""
    rng = np.random.default_rng(numpy_seed(seed))
    if fmt.space_size <= 2**62:
        return rng.integers(0, fmt.space_size, size=n, dtype=np.int64)
    raise InputError(f"canary format {fmt.text!r} has more than 18 digits", "use at most 18 digits")


def skewnorm_exposure(sample_px: np.ndarray, canary_px: float, *, space_size: int | None = None) -> dict:
    """Carlini et al. 2019 Sec. 4.3: fit a skew-normal to sampled log-perplexities; the paper's
    extrapolated exposure ``−log2 F(Px(s))``.

    Returns ``exposure`` (clipped to ``log2 space_size``, the most Def. 3 allows, when
    ``space_size`` is given), ``extrapolated_exposure`` (unclipped), ``clipped``, the fit, and
    ``empirical_share_at_most``, the share of the sample at least as likely as the canary."""
    from scipy.stats import skewnorm

    x = np.asarray(sample_px, dtype=np.float64)
    if x.size < 10 or np.ptp(x) == 0:
        raise InputError(f"{x.size} sampled log-perplexities cannot be fitted", "sample more candidates")
    a, loc, scale = skewnorm.fit(x)
    log_cdf = float(skewnorm.logcdf(canary_px, a, loc, scale))
    extrapolated = max(0.0, -log_cdf / math.log(2))
    cap = math.log2(space_size) if space_size is not None else math.inf
    return {
        "exposure": min(extrapolated, cap),
        "extrapolated_exposure": extrapolated,
        "clipped": bool(extrapolated > cap),
        "skewnorm_a": float(a),
        "skewnorm_loc": float(loc),
        "skewnorm_scale": float(scale),
        "empirical_share_at_most": float(np.mean(x <= canary_px)),
    }


def estimated_exposure(
    lm, fmt: CanaryFormat, canary: str, *, samples: int = 10_000, seed: int = 0, batch_size: int = 256
) -> dict:
    """Exposure estimated from ``samples`` uniform candidates and a fitted skew-normal (Sec. 4.3),
    clipped to ``log2 |R|`` (:func:`skewnorm_exposure`)."""
    fmt.index_of(canary)
    px = canary_log_perplexity(lm, canary)
    secrets = sample_secrets(fmt, samples, seed)
    sample_px, _, _ = compare_to_canary(lm, [fmt.fill(int(r)) for r in secrets], canary, px, batch_size=batch_size)
    return {"log_perplexity": px, **skewnorm_exposure(sample_px, px, space_size=fmt.space_size)}
