"""Membership scores of a causal language model on one text: pure functions of its per-token
log-probabilities (and, for Min-K%++, of the model's next-token distributions and the text).

Inputs. ``logprobs`` is the 1-D array ``log p(x_t | x_<t)`` of the scored tokens of a text, as
:meth:`CausalLM.token_logprobs` returns it. By default (``lm mia``) the text is fed as it is, so
its first token has no prediction and t = 2 … T. The papers' code tokenizes with the tokenizer's
default special tokens (``tokenizer.encode(text)``): that adds nothing for GPT-2 or Pythia (the
default here), but puts a BOS token first for LLaMA's tokenizer, and then every text token,
the first included, is scored after it — ``lm mia --document-start`` does that (the model's BOS
token, else its EOS token, :func:`memscan.lm.decoding.document_start`). Logarithms are natural
(nats).

Orientation. Every ``*_score`` function returns a number where **higher = more likely a
member** (the convention of :mod:`memscan.mia.attacks` and :func:`memscan.mia.metrics.roc_metrics`):
members are fit better, so their log-likelihood is higher and their loss lower. The raw
quantities (:func:`mean_nll`, :func:`perplexity`, :func:`zlib_ratio`, …) keep the sign of their
paper; the score says how it is turned.

========================  ======================================================  ===================
score (``SCORE_NAMES``)   definition                                              higher = member as
========================  ======================================================  ===================
``loss``                  −(1/n) Σ_t −log p(x_t)  (Yeom et al. 2018; Carlini 2021)  −mean NLL
``zlib``                  −log-ppl / zlib bits   (Carlini et al. 2021, §5.2)        −ratio
``lowercase``             log-ppl(lower(x)) / log-ppl(x)  (Carlini et al. 2021)     ratio
``min_k``                 mean of the lowest k% of log p(x_t)  (Shi et al. 2024)   the mean
``min_k_plus_plus``       mean of the lowest k% of (log p(x_t) − μ_t)/σ_t          the mean
                          (Zhang et al. 2025)
``reference``             log-ppl_ref(x) / log-ppl_target(x)  (Carlini et al. 2021) ratio
========================  ======================================================  ===================

Perplexity (``exp`` of the mean NLL) ranks texts exactly as the loss does, so a run reports the
loss only; :func:`perplexity` is here for the tables and the report.

Examples
--------
>>> import numpy as np
>>> lp = np.log([0.5, 0.25, 0.125, 0.5, 0.5])
>>> round(loss_score(lp), 6), round(float(perplexity(lp)), 6)
(-1.109035, 3.031433)
>>> round(min_k_score(lp, 40), 6)     # the lowest 2 of 5: log 0.125, log 0.25
-1.732868
"""

from __future__ import annotations

import math
import zlib

import numpy as np

from memscan.errors import InputError

__all__ = [
    "DEFAULT_K_PERCENT",
    "FLAT_RTOL",
    "LOGPROB_ATOL",
    "LOGSUMEXP_ATOL",
    "SCORE_DESCRIPTIONS",
    "SCORE_NAMES",
    "SIGMA_FLOOR",
    "k_count",
    "loss_score",
    "lowercase_ratio",
    "lowercase_score",
    "mean_nll",
    "min_k_plus_plus_score",
    "min_k_score",
    "next_token_moments",
    "perplexity",
    "reference_ratio",
    "reference_score",
    "standardized_logprobs",
    "zlib_entropy_bits",
    "zlib_ratio",
    "zlib_score",
]

#: k of Min-K% and Min-K%++ (percent of the tokens), the default of Shi et al. 2024.
DEFAULT_K_PERCENT = 20.0

#: Below this standard deviation of log p(z) the next-token distribution is uniform on its
#: support up to float64 rounding, and the standardized log-probability of a supported token is 0.
SIGMA_FLOOR = 1e-10

#: Relative tolerance of a flat (uniform on its support) next-token distribution for moments
#: computed in float32, as the transformers adapter's fast path does: an exactly uniform
#: distribution then has ``σ_t`` and ``|log p − μ_t|`` of a few float32 ε · ``|μ_t|`` (4.8e-6 for
#: 50257 tokens, where ``μ_t = −10.8``) instead of 0. ``1e-5`` is ≈ 84 float32 ε (ε ≈ 1.2e-7).
#: See :func:`standardized_logprobs`.
FLAT_RTOL = 1e-5

#: Per-token log-probabilities may exceed 0 by this much (float rounding of a log-softmax) and are
#: then taken as 0; anything larger is not a log-probability. One value for every check of them
#: (:func:`_logprobs` and :mod:`memscan.lm.mia_run`).
LOGPROB_ATOL = 1e-6

#: Each next-token row's ``logsumexp`` must be 0 within this (a distribution; float32 log-softmax
#: rounding over a vocabulary of 10⁵–10⁶ tokens stays below 1e-4).
LOGSUMEXP_ATOL = 1e-3

#: Scores of a run, in report order (``reference`` only with a reference model).
SCORE_NAMES = ("loss", "zlib", "lowercase", "min_k", "min_k_plus_plus", "reference")

#: What each score is, for tables and the report.
SCORE_DESCRIPTIONS = {
    "loss": "loss: −mean NLL (Yeom et al. 2018; Carlini et al. 2021)",
    "zlib": "zlib ratio: −log-perplexity / zlib entropy in bits (Carlini et al. 2021)",
    "lowercase": "lowercase ratio: log-ppl(lowercased) / log-ppl(text) (Carlini et al. 2021)",
    "min_k": "Min-K% Prob: mean of the lowest k% token log-probabilities (Shi et al. 2024)",
    "min_k_plus_plus": "Min-K%++: mean of the lowest k% standardized log-probabilities (Zhang et al. 2025)",
    "reference": "reference ratio: log-ppl under the reference / log-ppl under the target (Carlini et al. 2021)",
}

#: Denominators of the ratios are floored here (a text the model predicts with probability 1
#: has log-perplexity 0), so that every score stays finite.
_TINY = 1e-12


def _logprobs(logprobs, name: str = "logprobs") -> np.ndarray:
    lp = np.asarray(logprobs, dtype=np.float64)
    if lp.ndim != 1:
        raise InputError(f"{name}: expected a 1-D array of per-token log-probabilities, got shape {lp.shape}")
    if lp.size == 0:
        raise InputError(f"{name}: no tokens to score", "a text needs at least 2 tokens (the first is not predicted)")
    if np.isnan(lp).any() or (lp > LOGPROB_ATOL).any():
        raise InputError(
            f"{name}: log-probabilities must be ≤ 0 (up to {LOGPROB_ATOL:g}) and not NaN", "pass log p(x_t | x_<t)"
        )
    return np.minimum(lp, 0.0)


# ---- loss and perplexity -------------------------------------------------------------------
def mean_nll(logprobs) -> float:
    """Mean negative log-likelihood per token, ``−(1/n) Σ_t log p(x_t | x_<t)`` (nats): the
    log-perplexity. The loss of Yeom et al. 2018 ("Privacy risk in machine learning", the loss
    threshold attack) for a language model, as Carlini et al. 2021 ("Extracting Training Data
    from Large Language Models", §4.2, eq. for P) use it."""
    return float(-np.mean(_logprobs(logprobs)))


def perplexity(logprobs) -> float:
    """``exp(mean_nll)`` (Carlini et al. 2021, §4.2: ``P = exp(−(1/n) Σ log f(x_i | x_<i))``)."""
    return float(math.exp(mean_nll(logprobs)))


def loss_score(logprobs) -> float:
    """The loss attack (Yeom et al. 2018): ``−mean_nll``; higher = member (lower loss)."""
    return -mean_nll(logprobs)


# ---- zlib ------------------------------------------------------------------------------------
def zlib_entropy_bits(text: str) -> int:
    """zlib entropy of ``text`` in bits: ``8 × len(zlib.compress(utf-8 bytes))`` (zlib's default
    level 6), DESIGN.md's definition of Carlini et al. 2021's zlib entropy (§5.2 "Comparing to
    zlib Compression")."""
    return 8 * len(zlib.compress(text.encode("utf-8")))


def zlib_ratio(logprobs, text: str) -> float:
    """``log-perplexity / zlib entropy in bits`` (Carlini et al. 2021, §5.2): low when the model
    finds a text much easier than a generic compressor does — the signature of memorization."""
    return mean_nll(logprobs) / zlib_entropy_bits(text)


def zlib_score(logprobs, text: str) -> float:
    """``−zlib_ratio``; higher = member."""
    return -zlib_ratio(logprobs, text)


# ---- lowercase -------------------------------------------------------------------------------
def lowercase_ratio(logprobs, lower_logprobs) -> float:
    """``log-ppl(lowercased text) / log-ppl(text)`` (Carlini et al. 2021, §5.2 "Comparing to
    Lowercased Text"; the ratio their released code sorts by, highest first): a memorized text
    loses its advantage once its case is changed, so its ratio is high. ``lower_logprobs`` are the
    per-token log-probabilities of ``text.lower()`` (tokenized anew). The denominator is floored
    at 1e-12."""
    return mean_nll(lower_logprobs) / max(mean_nll(logprobs), _TINY)


def lowercase_score(logprobs, lower_logprobs) -> float:
    """:func:`lowercase_ratio`; higher = member."""
    return lowercase_ratio(logprobs, lower_logprobs)


# ---- reference model -------------------------------------------------------------------------
def reference_ratio(logprobs, reference_logprobs) -> float:
    """``log-ppl under the reference model / log-ppl under the target`` (Carlini et al. 2021, §5.2
    "Comparing to Other Neural Language Models": the *ratio* of the two log-perplexities, as in the
    paper and its code — not their difference). A text the target finds much easier than a second
    model trained on other data is likely a member; the ratio is then high. The denominator is
    floored at 1e-12."""
    return mean_nll(reference_logprobs) / max(mean_nll(logprobs), _TINY)


def reference_score(logprobs, reference_logprobs) -> float:
    """:func:`reference_ratio`; higher = member."""
    return reference_ratio(logprobs, reference_logprobs)


# ---- Min-K% ----------------------------------------------------------------------------------
def k_count(n: int, k_percent: float = DEFAULT_K_PERCENT) -> int:
    """How many of ``n`` tokens "the lowest k%" holds: ``max(1, floor(n · k / 100))``.

    The floor is the convention of both papers' code (``int(len(x) * ratio)``); memscan keeps at
    least one token, so a short text still has a score.

    Examples
    --------
    >>> k_count(10), k_count(9), k_count(4), k_count(7, 100)
    (2, 1, 1, 7)
    """
    if not (0 < float(k_percent) <= 100):
        raise InputError(f"k = {k_percent}% is not in (0, 100]", "use e.g. --k-percent 20")
    if n < 1:
        raise InputError("no tokens to score", "a text needs at least 2 tokens")
    # integer arithmetic where k is whole, so 20% of 15 is exactly 3
    kk = float(k_percent)
    count = (n * int(kk)) // 100 if kk.is_integer() else math.floor(n * kk / 100.0 + 1e-9)
    return max(1, int(count))


def _lowest_mean(values: np.ndarray, k_percent: float) -> float:
    k = k_count(values.size, k_percent)
    return float(np.mean(np.sort(values, kind="stable")[:k]))


def min_k_score(logprobs, k_percent: float = DEFAULT_K_PERCENT) -> float:
    """Min-K% Prob (Shi et al. 2024, "Detecting Pretraining Data from Large Language Models", §3,
    eq. 1): the mean log-probability of the lowest ``k`` % of the tokens (:func:`k_count` of
    them). Higher = member (a non-member has a few very unlikely tokens). With ``k = 100`` it is
    the mean log-probability, ``−mean_nll``."""
    return _lowest_mean(_logprobs(logprobs), k_percent)


# ---- Min-K%++ --------------------------------------------------------------------------------
def next_token_moments(next_logprobs, name: str = "next_logprobs") -> tuple[np.ndarray, np.ndarray]:
    """``(μ_t, σ_t)`` of ``log p(z)`` under each next-token distribution ``p(· | x_<t)``, exactly
    over the vocabulary (Zhang et al. 2025, "Min-K%++: Improved Baseline for Detecting
    Pre-Training Data from Large Language Models", eq. 3):

        μ_t = Σ_z p(z) log p(z),      σ_t² = Σ_z p(z) (log p(z))² − μ_t²

    ``next_logprobs`` is ``(..., V)`` log-probabilities, each row a distribution: its
    ``logsumexp`` must be 0 within :data:`LOGSUMEXP_ATOL` (else :class:`InputError` naming
    ``name``, the number of such rows and the first). σ² is computed as
    ``Σ_z p(z) (log p(z) − μ_t)²``, equal to the paper's form and free of its cancellation;
    tokens with ``p(z) = 0`` contribute 0. Returns float64 arrays of shape ``(...)``.
    """
    lp = np.asarray(next_logprobs, dtype=np.float64)
    if lp.ndim < 1 or lp.shape[-1] < 1:
        raise InputError(f"{name}: expected (..., V) log-probabilities, got shape {lp.shape}")
    # six passes over the (..., V) array: exp, Σ p, Σ p·l, l − μ, its square, Σ p·(l − μ)²
    with np.errstate(over="ignore", invalid="ignore"):
        p = np.exp(lp)
        total = p.sum(-1)  # exp(logsumexp) of each row
        with np.errstate(divide="ignore"):
            off = ~(np.abs(np.log(total)) <= LOGSUMEXP_ATOL)  # NaN and ±inf too
    if off.any():
        first = tuple(int(i) for i in np.argwhere(off)[0])
        row = f"row {', '.join(map(str, first))}" if first else "the row"
        raise InputError(
            f"{name}: {int(off.sum())} of {off.size} next-token row(s) are not log-probability distributions "
            f"(first: {row}, Σ exp(log p) = {float(total[first]):.6g}; each row's logsumexp must be 0 "
            f"within {LOGSUMEXP_ATOL:g})",
            "return the log-softmax of the logits over the whole vocabulary (in float32 or float64), "
            "not logits or shifted log-probabilities",
        )
    mu = np.einsum("...v,...v->...", p, lp)
    bad = ~np.isfinite(mu)  # rows with impossible tokens (log p = −inf: 0 · −inf is NaN)
    if bad.any():
        row = lp[bad]
        finite = np.isfinite(row)
        mu[bad] = np.sum(np.where(finite, p[bad] * np.where(finite, row, 0.0), 0.0), axis=-1)
    dev = lp - mu[..., None]
    np.square(dev, out=dev)
    if bad.any():
        dev[bad] = np.where(np.isfinite(dev[bad]), dev[bad], 0.0)
    var = np.einsum("...v,...v->...", p, dev)
    return mu, np.sqrt(np.maximum(var, 0.0))


def standardized_logprobs(logprobs, mu, sigma) -> np.ndarray:
    """Per token ``(log p(x_t) − μ_t) / σ_t`` (Zhang et al. 2025, eq. 3), with one rule for a
    flat next-token distribution.

    With ``tol_t = max(`` :data:`SIGMA_FLOOR` ``,`` :data:`FLAT_RTOL` ``· |μ_t|)``, the
    distribution is flat — uniform on its support up to the rounding of moments computed in
    float32 (or float64) — where ``σ_t ≤ tol_t``. On a flat distribution a token with
    ``|log p(x_t) − μ_t| ≤ tol_t`` (or any supported token when ``σ_t = 0``) is exactly typical
    and its value is 0; a token outside the support (``log p = −inf``) gets ``−inf``; a token off
    the flat part with a negligible but nonzero probability keeps ``(log p − μ_t) / σ_t``. Without
    the relative tolerance, float32 moments of a uniform distribution over 50257 tokens
    (``σ_t ≈ |log p − μ_t| ≈ 4.8e-6``) gave ``±1`` instead of 0.

    Examples
    --------
    >>> lp = np.float32(-np.log(50257))  # uniform, moments rounded as in float32
    >>> standardized_logprobs([lp], [lp + 4.8e-6], [4.8e-6]).tolist()
    [0.0]
    """
    lp = _logprobs(logprobs)
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.shape != lp.shape or sigma.shape != lp.shape:
        raise InputError(f"μ {mu.shape} and σ {sigma.shape} must match the {lp.shape} log-probabilities")
    tol = np.maximum(SIGMA_FLOOR, FLAT_RTOL * np.abs(mu))
    with np.errstate(divide="ignore", invalid="ignore"):
        typical = (sigma <= tol) & np.isfinite(lp) & ((np.abs(lp - mu) <= tol) | (sigma == 0))
        z = (lp - mu) / np.where(sigma > 0, sigma, 1.0)
    return np.where(typical, 0.0, np.where(np.isfinite(lp), z, -np.inf))


def min_k_plus_plus_score(logprobs, mu, sigma, k_percent: float = DEFAULT_K_PERCENT) -> float:
    """Min-K%++ (Zhang et al. 2025, eq. 3–4): the mean of the lowest ``k`` % of the standardized
    log-probabilities :func:`standardized_logprobs` (:func:`k_count` of them), with ``μ_t`` and
    ``σ_t`` from :func:`next_token_moments` (exact expectations over the vocabulary, not samples).
    Higher = member: training texts sit at local maxima of the likelihood, where the true token
    is more likely than a typical token of the model's own distribution."""
    return _lowest_mean(standardized_logprobs(logprobs, mu, sigma), k_percent)
