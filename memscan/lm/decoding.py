"""Decoding schemes as distributions: temperature, top-k and top-p applied to next-token
log-probabilities, renormalised (pure numpy).

The scheme is the one transformers' samplers apply, in the same order (``TemperatureLogitsWarper``,
``TopKLogitsWarper``, ``TopPLogitsWarper``):

1. temperature ``T``: ``log p / T`` (``T = 1``: unchanged);
2. top-k: tokens whose tempered log-probability is below the k-th largest are removed; tokens
   tied with the k-th largest are **kept** (so ties at the boundary can keep more than k tokens,
   as ``logits < topk(logits, k).values[..., -1]`` does);
3. top-p (nucleus, Holtzman et al. 2020): the smallest set of most likely tokens whose
   probability (after steps 1–2, renormalised) sums to ≥ ``top_p`` is kept (at least one token);
4. renormalise: ``q(v) = exp(s_v) / Σ_kept exp(s_u)``; removed tokens get ``q = 0`` (log −inf).

This is the q of probabilistic discoverable extraction (Hayes et al. 2025, eq. 1): the
probability that one sample of the scheme reproduces a suffix ``y`` is ``Π_t q(y_t | prefix, y_<t)``.

Examples
--------
>>> import numpy as np
>>> lp = np.log(np.array([0.5, 0.3, 0.2]))
>>> np.round(np.exp(scheme_logprobs(lp, top_k=2)), 4)
array([0.625, 0.375, 0.   ])
>>> np.round(np.exp(scheme_logprobs(lp, top_p=0.6)), 4)
array([0.625, 0.375, 0.   ])
>>> np.round(np.exp(scheme_logprobs(lp, temperature=0.5)), 4)
array([0.6579, 0.2368, 0.1053])
"""

from __future__ import annotations

import numpy as np

from memscan.errors import InputError


def check_scheme(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> None:
    """Refuse a scheme that is not a distribution (T ≤ 0, k < 1, p outside (0, 1])."""
    if not (temperature > 0 and np.isfinite(temperature)):
        raise InputError(f"temperature {temperature} must be > 0", "use greedy decoding for T = 0, or e.g. 1.0")
    if top_k is not None and int(top_k) < 1:
        raise InputError(f"top-k {top_k} must be ≥ 1", "pass 0/None to disable top-k, or e.g. 40")
    if top_p is not None and not (0 < top_p <= 1):
        raise InputError(f"top-p {top_p} must be in (0, 1]", "e.g. 0.9, or 1.0 to disable")


def scheme_logprobs(
    logprobs: np.ndarray, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> np.ndarray:
    """log q(·) of the decoding scheme over the last axis of ``logprobs`` (log p, or logits).

    Returns float64 of the same shape, ``-inf`` for removed tokens; each row sums (in
    probability) to 1. ``top_k`` of ``None``/``0`` and ``top_p`` of ``None``/``1.0`` disable them.
    """
    top_k = None if not top_k else int(top_k)
    check_scheme(temperature, top_k, top_p)  # before 1 means "off": a top-p above 1 is refused
    top_p = None if top_p is None or top_p >= 1.0 else float(top_p)
    s = np.asarray(logprobs, dtype=np.float64) / float(temperature)
    v = s.shape[-1]
    if top_k is not None and top_k < v:
        kth = -np.partition(-s, top_k - 1, axis=-1)[..., top_k - 1 : top_k]
        s = np.where(s < kth, -np.inf, s)
    s = s - _logsumexp(s)
    if top_p is not None:
        order = np.argsort(-s, axis=-1, kind="stable")
        sorted_p = np.exp(np.take_along_axis(s, order, axis=-1))
        before = np.cumsum(sorted_p, axis=-1) - sorted_p  # mass strictly above each token
        remove_sorted = before >= top_p  # the token is not needed to reach top_p
        remove_sorted[..., 0] = False
        remove = np.zeros_like(remove_sorted)
        np.put_along_axis(remove, order, remove_sorted, axis=-1)
        s = np.where(remove, -np.inf, s)
        s = s - _logsumexp(s)
    return s


def _logsumexp(s: np.ndarray) -> np.ndarray:
    m = np.max(s, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return m + np.log(np.sum(np.exp(s - m), axis=-1, keepdims=True))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """``logits − logsumexp(logits)`` over the last axis, float64."""
    s = np.asarray(logits, dtype=np.float64)
    return s - _logsumexp(s)


def document_start(lm) -> int | None:
    """The token a document starts after — the model's BOS token, else its EOS token (None
    without either): the context of an unconditional sample and the ``x_0`` a canary is scored
    after, so that its first token is predicted too."""
    for name in ("bos_token_id", "eos_token_id"):
        tok = getattr(lm, name, None)
        if tok is not None:
            return int(tok)
    return None
