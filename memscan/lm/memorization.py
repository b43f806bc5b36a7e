"""Memorization measures of a causal language model on sequences of its training data.

Each sequence is a window of training tokens ``x`` with a *suffix* ``y = x[s : s + m]`` at a fixed
position ``s`` and prefixes ``x[s − k : s]`` extending backwards for each prefix length ``k`` (so a
sweep over ``k`` does not move the suffix, as in Carlini et al. 2022, Sec. 4.1).

- **k-extractable** (Carlini et al. 2022, "Quantifying Memorization Across Neural Language
  Models", Def. 3.1): the greedy continuation ``ŷ`` of the k-token prefix equals the suffix
  exactly, ``ŷ_t = y_t`` for all ``t < m`` — :func:`k_extractable`.
- **match fraction**: the share of suffix tokens the greedy continuation gets right,
  ``(1/m) Σ_t 1[ŷ_t = y_t]`` (position by position, no re-alignment) — :func:`match_fraction`.
- **Pythia memorization score** (Biderman et al. 2023, "Emergent and Predictable Memorization in
  Large Language Models", Sec. 2.2): always a 32-token prefix and the next 32 tokens:
  ``score = (1/32) Σ_{t<32} 1[ŷ_t = y_t]``; a sequence counts as memorized at score 1 (32/32) —
  :func:`pythia_score` with the same formula as the match fraction.
- **Exact memorization** M(f) (Tirumala et al. 2022, "Memorization Without Overfitting", Def. 1):
  under teacher forcing, the share of suffix positions where the model's argmax is the true
  token, ``(1/m) Σ_t 1[argmax_v p(v | x_<s+t) = y_t]`` — :func:`exact_memorization`.
- **Probabilistic discoverable extraction** (Hayes et al. 2025, "Measuring memorization in
  language models via probabilistic extraction", eqs. 1–2): for a decoding scheme ``q``
  (temperature, top-k, top-p, renormalised: :mod:`memscan.lm.decoding`), the probability that
  one sample reproduces the suffix is ``p = Π_t q(y_t | prefix, y_<t)`` (0 when a true token is
  outside the top k); the chance that ``n`` independent samples contain it is ``1 − (1 − p)^n``,
  so the smallest ``n`` reaching a target ``τ`` is ``⌈log(1 − τ) / log(1 − p)⌉`` (computed with
  ``log1p``; infinite when ``p = 0``) — :func:`suffix_log_probability`, :func:`samples_needed`.

Examples
--------
>>> import numpy as np
>>> greedy = np.array([[1, 2, 3, 4], [1, 2, 0, 4]])
>>> true = np.array([[1, 2, 3, 4], [1, 2, 3, 4]])
>>> k_extractable(greedy, true).tolist(), match_fraction(greedy, true).tolist()
([True, False], [1.0, 0.75])
>>> samples_needed(np.array([np.log(0.5), np.log(0.1), -np.inf]), 0.5).tolist()
[1.0, 7.0, inf]
"""

from __future__ import annotations

import numpy as np

from memscan.errors import InputError
from memscan.lm.decoding import scheme_logprobs

#: The Pythia memorization score's prefix and suffix lengths (Biderman et al. 2023).
PYTHIA_LENGTH = 32


def _pair(greedy, true) -> tuple[np.ndarray, np.ndarray]:
    g, t = np.atleast_2d(np.asarray(greedy)), np.atleast_2d(np.asarray(true))
    if g.shape != t.shape:
        raise InputError(f"continuation {g.shape} and suffix {t.shape} differ in shape", "compare equal lengths")
    return g, t


def k_extractable(greedy: np.ndarray, true_suffix: np.ndarray) -> np.ndarray:
    """Carlini et al. 2022 Def. 3.1: every greedy token equals the true suffix token (B bools)."""
    g, t = _pair(greedy, true_suffix)
    return np.all(g == t, axis=1)


def match_fraction(greedy: np.ndarray, true_suffix: np.ndarray) -> np.ndarray:
    """Share of suffix positions where the greedy token is the true token (B floats)."""
    g, t = _pair(greedy, true_suffix)
    if g.shape[1] == 0:
        return np.ones(g.shape[0])
    return np.mean(g == t, axis=1)


def pythia_score(greedy32: np.ndarray, true32: np.ndarray) -> np.ndarray:
    """Biderman et al. 2023 Sec. 2.2: ``(1/32) Σ 1[ŷ_t = y_t]`` over a 32-token prefix's 32 greedy tokens."""
    g, t = _pair(greedy32, true32)
    if g.shape[1] != PYTHIA_LENGTH:
        raise InputError(f"the Pythia score needs {PYTHIA_LENGTH} tokens, got {g.shape[1]}", "pass 32 tokens")
    return match_fraction(g, t)


def exact_memorization(argmax_tokens: np.ndarray, true_suffix: np.ndarray) -> np.ndarray:
    """Tirumala et al. 2022 Def. 1: share of positions whose teacher-forced argmax is the true token.

    ``argmax_tokens[b, t] = argmax_v p(v | prefix, y_<t)`` (teacher forcing: the true tokens are
    fed, not the model's own); see :func:`teacher_forced`.
    """
    return match_fraction(argmax_tokens, true_suffix)


def suffix_log_probability(scheme_token_logprobs: np.ndarray) -> np.ndarray:
    """Hayes et al. 2025 eq. 1 in logs: ``log p = Σ_t log q(y_t | prefix, y_<t)`` (−inf when any is)."""
    lq = np.atleast_2d(np.asarray(scheme_token_logprobs, dtype=np.float64))
    return np.sum(lq, axis=1)


def samples_needed(log_p: np.ndarray, target: float) -> np.ndarray:
    """Smallest ``n ≥ 1`` with ``1 − (1 − p)^n ≥ target`` (Hayes et al. 2025 eq. 2); ``inf`` when ``p = 0``.

    ``(1 − p)^n`` is evaluated as ``exp(n · log1p(−p))`` and the ratio ``log1p(−τ)/log1p(−p)`` is
    rounded up and then checked against the criterion at ``n − 1`` and ``n``, so that float
    rounding never gives an ``n`` one too large or too small. A ``p`` so small that ``n`` exceeds
    the float range is reported as ``inf`` as well (``log_p`` keeps the exact value). A NaN
    ``log_p`` (NaN log-probabilities from the model) is refused: it is not ``p = 0``.
    """
    if not (0 < target < 1):
        raise InputError(f"target {target} must be in (0, 1)", "e.g. 0.5 or 0.9")
    log_p = np.asarray(log_p, dtype=np.float64)
    bad = np.flatnonzero(np.isnan(log_p.ravel()))
    if bad.size:
        raise InputError(
            f"log p is NaN for {bad.size} of {log_p.size} suffixes (the first: position {int(bad[0])}): "
            "the model's log-probabilities hold NaN",
            "check the model's weights and dtype (float16 overflow gives NaN; try --dtype float32)",
        )
    out = np.full(log_p.shape, np.inf)
    flat_in, flat_out = log_p.ravel(), out.reshape(-1)
    lt = np.log1p(-target)
    for i, lp in enumerate(flat_in):
        if not np.isfinite(lp) and lp < 0:
            continue  # p = 0
        p = min(float(np.exp(lp)), 1.0)
        if p >= 1.0:
            flat_out[i] = 1.0
            continue
        lq = np.log1p(-p)  # log(1 − p); 0 when p underflows: n beyond the float range
        with np.errstate(over="ignore"):  # p below ~1e-308 (log p in (−745, −709)): n beyond the float range
            ratio = lt / lq if lq < 0 else np.inf
        if not np.isfinite(ratio):
            continue
        if ratio >= 2**40:  # beyond, n·log(1 − p) cannot tell n from n ± 1 in float64
            flat_out[i] = float(np.ceil(ratio))
            continue
        n = max(1, int(np.ceil(ratio)))
        while n > 1 and -np.expm1((n - 1) * lq) >= target:
            n -= 1
        while -np.expm1(n * lq) < target:
            n += 1
        flat_out[i] = float(n)
    return out


def extraction_rate_within(n_needed: np.ndarray, ns) -> np.ndarray:
    """The (n, p) curve of Hayes et al. 2025 Fig. 1: for each ``n`` in ``ns``, the share of
    sequences extractable with probability ≥ the target within ``n`` samples (``n_needed ≤ n``)."""
    needed = np.asarray(n_needed, dtype=np.float64)
    if needed.size == 0:
        return np.zeros(len(ns))
    return np.asarray([float(np.mean(needed <= n)) for n in ns])


def teacher_forced(
    lm,
    windows: np.ndarray,
    start: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = 40,
    top_p: float | None = None,
    max_elements: int = 1 << 23,
) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced statistics of the tokens ``windows[:, start + 1:]`` given everything before.

    Returns ``(argmax, log_q)``, both ``B × (T − 1 − start)``: the model's argmax at each position
    (for :func:`exact_memorization`) and ``log q(y_t | …)`` of the true token under the decoding
    scheme (for :func:`suffix_log_probability`). Rows go through ``lm.next_token_logprobs`` in
    chunks of at most ``max_elements`` float64 values, so a 50k vocabulary does not need the whole
    ``B × T × V`` array at once.
    """
    x = np.atleast_2d(np.asarray(windows, dtype=np.int64))
    b, t = x.shape
    width = t - 1 - start
    v = int(lm.vocab_size)
    rows = max(1, int(max_elements // max(1, width * v)))
    argmax = np.zeros((b, width), dtype=np.int64)
    log_q = np.zeros((b, width), dtype=np.float64)
    targets = x[:, start + 1 :]
    for lo in range(0, b, rows):
        hi = min(b, lo + rows)
        lp = np.asarray(lm.next_token_logprobs(x[lo:hi], start=start), dtype=np.float64)
        if lp.shape != (hi - lo, width, v):
            raise InputError(
                f"next_token_logprobs returned {lp.shape}; expected {(hi - lo, width, v)}",
                "return B×(T−1−start)×vocab_size log-probabilities",
            )
        argmax[lo:hi] = lp.argmax(axis=-1)
        lq = scheme_logprobs(lp, temperature=temperature, top_k=top_k, top_p=top_p)
        log_q[lo:hi] = np.take_along_axis(lq, targets[lo:hi, :, None], axis=-1)[..., 0]
    return argmax, log_q
