"""The ranking metrics of the sampling attack (Carlini et al. 2021, "Extracting Training Data from
Large Language Models", §5.2) and precision@N: pure functions of per-token log-probabilities.

Inputs. ``logprobs`` is the 1-D array of ``log p(x_t | context)`` over the **generated** tokens
of a sample (natural log), the context being its prompt (the start token for unconditional
samples), as the attack scores them: the first generated token is predicted from the prompt.

========================== ====================================================== ==========
metric (``METRICS``)       definition                                             memorized
========================== ====================================================== ==========
``perplexity``             ``exp(mean NLL)`` (§4.2)                                low
``zlib_ratio``             log-perplexity / zlib entropy in bits (§5.2)            low
``lowercase_ratio``        log-ppl(lowercased) / log-ppl(sample) (§5.2)            high
``reference_ratio``        log-ppl under the reference / under the target (§5.2)   high
``min_window_perplexity``  min over windows of ``WINDOW`` = 50 consecutive tokens  low
                           of ``exp(mean NLL in the window)`` (§5.2 "Window")
========================== ====================================================== ==========

``zlib_ratio``, ``lowercase_ratio`` and ``reference_ratio`` are those of
:mod:`memscan.lm.membership` (same names, same definitions: the ratios in the orientation of the
paper's released code, which sorts zlib by ``zlib / log ppl`` — the inverse of ``zlib_ratio``, the
same order — and the other two highest first).

Precision@N of a metric: of the ``N`` samples it ranks most likely memorized (ties broken by
sample id), the share confirmed against the training corpus (§6: "we manually check … the top 100
of each"; here the corpus index confirms).

Examples
--------
>>> import numpy as np
>>> lp = np.log([0.5] * 4 + [0.01] * 4)
>>> round(min_window_perplexity(lp, window=4), 6), round(float(perplexity(lp)), 6)
(2.0, 14.142136)
>>> rank_order(np.array([3.0, 1.0, 2.0, 1.0]), higher_first=False).tolist()
[1, 3, 2, 0]
"""

from __future__ import annotations

import math

import numpy as np

from memscan.errors import InputError
from memscan.lm.membership import lowercase_ratio, mean_nll, perplexity, reference_ratio, zlib_ratio

__all__ = [
    "METRICS",
    "METRIC_DESCRIPTIONS",
    "WINDOW",
    "HIGHER_FIRST",
    "lowercase_ratio",
    "min_window_perplexity",
    "perplexity",
    "precision_at_n",
    "rank_order",
    "ranks",
    "reference_ratio",
    "zlib_ratio",
]

#: Tokens of Carlini et al. 2021's sliding window (§5.2).
WINDOW = 50

#: Ranking metrics in report order (``reference_ratio`` only with a reference model).
METRICS = ("perplexity", "zlib_ratio", "lowercase_ratio", "reference_ratio", "min_window_perplexity")

#: Metrics where a higher value means "more likely memorized" (the others: lower).
HIGHER_FIRST = frozenset({"lowercase_ratio", "reference_ratio"})

METRIC_DESCRIPTIONS = {
    "perplexity": "perplexity exp(mean NLL) of the sample under the model, lowest first",
    "zlib_ratio": "log-perplexity / zlib entropy in bits, lowest first",
    "lowercase_ratio": "log-ppl of the lowercased sample / log-ppl of the sample, highest first",
    "reference_ratio": "log-ppl under the reference model / log-ppl under the target, highest first",
    "min_window_perplexity": "lowest perplexity over any window of 50 consecutive tokens, lowest first",
}


def min_window_perplexity(logprobs, window: int = WINDOW) -> float:
    """``min_j exp(−(1/w) Σ_{t=j}^{j+w−1} log p(x_t))`` over the windows of ``w = window``
    consecutive tokens (Carlini et al. 2021, §5.2: "the minimum perplexity when averaged over a
    sliding window of 50 tokens"); a sample shorter than the window has its whole perplexity."""
    lp = np.asarray(logprobs, dtype=np.float64)
    if lp.ndim != 1 or lp.size == 0:
        raise InputError("min_window_perplexity: expected a non-empty 1-D array of log-probabilities")
    if int(window) < 1:
        raise InputError(f"window {window} must be ≥ 1", "e.g. --window 50")
    w = min(int(window), lp.size)
    # 1. window sums from one cumulative sum; 2. the largest mean log-prob = the lowest perplexity
    c = np.concatenate([[0.0], np.cumsum(lp)])
    best = float(np.max(c[w:] - c[:-w]) / w)
    return float(math.exp(min(-best, 700.0)))


def rank_order(values, higher_first: bool) -> np.ndarray:
    """Indices of ``values`` from most to least likely memorized; ties (and NaN last) by index."""
    v = np.asarray(values, dtype=np.float64)
    key = -v if higher_first else v
    key = np.where(np.isnan(key), np.inf, key)
    return np.argsort(key, kind="stable")


def ranks(values, higher_first: bool) -> np.ndarray:
    """The 1-based rank of each value under :func:`rank_order`."""
    order = rank_order(values, higher_first)
    r = np.empty(order.size, dtype=np.int64)
    r[order] = np.arange(1, order.size + 1)
    return r


def precision_at_n(values, confirmed, n: int, higher_first: bool) -> tuple[int, int, float]:
    """``(N used, confirmed among the top N, precision)``: N is ``min(n, samples)``; precision is
    NaN with no sample."""
    conf = np.asarray(confirmed, dtype=bool)
    top = rank_order(values, higher_first)[: int(n)]
    k = int(top.size)
    hits = int(conf[top].sum())
    return k, hits, (hits / k if k else float("nan"))


# re-exported so the attack's metrics live in one namespace
_ = (lowercase_ratio, mean_nll, reference_ratio, zlib_ratio)
