"""Memorization measures (memscan.lm.memorization, memscan.lm.decoding) against hand-worked
token sequences, the lookup model where answers are known, and brute-force enumeration."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from memscan.errors import InputError
from memscan.lm.decoding import scheme_logprobs
from memscan.lm.memorization import (
    exact_memorization,
    extraction_rate_within,
    k_extractable,
    match_fraction,
    pythia_score,
    samples_needed,
    suffix_log_probability,
    teacher_forced,
)
from memscan.testing.lookup_lm import LookupLM

# ---- hand-worked sequences


def test_hand_worked_greedy_measures():
    true = np.array([[5, 6, 7, 8, 9], [5, 6, 7, 8, 9], [5, 6, 7, 8, 9]])
    greedy = np.array([[5, 6, 7, 8, 9], [5, 6, 7, 8, 0], [0, 6, 7, 8, 9]])
    assert k_extractable(greedy, true).tolist() == [True, False, False]
    assert match_fraction(greedy, true).tolist() == [1.0, 0.8, 0.8]
    # Pythia: 32 tokens, 30 matching = 0.9375; strict flag only at 32/32
    t32 = np.arange(32)[None, :]
    g32 = t32.copy()
    g32[0, [3, 17]] = 99
    assert pythia_score(g32, t32).tolist() == [30 / 32]
    assert pythia_score(t32, t32).tolist() == [1.0]
    with pytest.raises(InputError, match="32 tokens"):
        pythia_score(greedy, true)
    # M(f): argmax under teacher forcing equals the true token at 3 of 5 positions
    assert exact_memorization(np.array([[5, 1, 7, 1, 9]]), true[:1]).tolist() == [0.6]


def test_hand_worked_decoding_scheme():
    p = np.array([0.5, 0.25, 0.125, 0.125])
    lp = np.log(p)
    # top-2 keeps 0.5, 0.25 → 2/3, 1/3
    np.testing.assert_allclose(np.exp(scheme_logprobs(lp, top_k=2)), [2 / 3, 1 / 3, 0, 0])
    # tie at the k-th value is kept (transformers' convention): top-3 keeps both 0.125s
    np.testing.assert_allclose(np.exp(scheme_logprobs(lp, top_k=3)), p)
    # T = 2: p^(1/2) renormalised
    r = np.sqrt(p) / np.sqrt(p).sum()
    np.testing.assert_allclose(np.exp(scheme_logprobs(lp, temperature=2.0)), r)
    # top-p 0.7: 0.5 alone < 0.7, 0.5 + 0.25 ≥ 0.7 → keep two
    np.testing.assert_allclose(np.exp(scheme_logprobs(lp, top_p=0.7)), [2 / 3, 1 / 3, 0, 0])
    # top-p 0.5: the first token already reaches it
    np.testing.assert_allclose(np.exp(scheme_logprobs(lp, top_p=0.5)), [1, 0, 0, 0])
    # suffix probability: product of the per-step scheme probabilities
    steps = np.log(np.array([[2 / 3, 1 / 3, 1.0]]))
    assert np.isclose(np.exp(suffix_log_probability(steps))[0], 2 / 9)
    assert suffix_log_probability(np.array([[0.0, -np.inf]]))[0] == -np.inf


def test_samples_needed_hand_worked_and_stable():
    # 1 − (1 − 0.5)^1 = 0.5 ≥ 0.5 → 1; 0.9: (0.5)^n ≤ 0.1 → n = 4 (0.0625), n = 3 is 0.125
    assert samples_needed(np.log([0.5]), 0.5).tolist() == [1.0]
    assert samples_needed(np.log([0.5]), 0.9).tolist() == [4.0]
    # p = 0.1, τ = 0.5: 0.9^6 = 0.531, 0.9^7 = 0.478 → 7
    assert samples_needed(np.log([0.1]), 0.5).tolist() == [7.0]
    assert samples_needed(np.array([0.0]), 0.9).tolist() == [1.0]
    assert samples_needed(np.array([-np.inf]), 0.5).tolist() == [np.inf]
    # tiny p: n ≈ ln 2 / p, no loss of precision (1 − p rounds to 1 in float64)
    lp = math.log(1e-20)
    assert samples_needed(np.array([lp]), 0.5)[0] == pytest.approx(math.log(2) / 1e-20, rel=1e-12)
    assert samples_needed(np.array([-2000.0]), 0.5)[0] == np.inf  # beyond the float range
    # brute force over small n
    for p in [0.9, 0.3, 0.05, 0.01, 0.001]:
        for tau in [0.5, 0.9]:
            n = next(k for k in range(1, 100000) if 1 - (1 - p) ** k >= tau)
            assert samples_needed(np.log([p]), tau)[0] == n, (p, tau)
    assert extraction_rate_within(np.array([1, 3, np.inf, 10]), [1, 3, 10, 100]).tolist() == [0.25, 0.5, 0.75, 0.75]


def test_samples_needed_refuses_nan_and_is_quiet_below_the_float_range():
    """NaN log p (a model's NaN log-probabilities) is an error, not "p = 0"; log p in (−745, −709)
    is p > 0 whose n ≈ ln 2 / p exceeds the float range: inf without an overflow warning."""
    import warnings

    with pytest.raises(InputError, match="NaN for 1 of 3"):
        samples_needed(np.array([np.log(0.5), np.nan, -np.inf]), 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = samples_needed(np.array([-720.0, -740.0, -700.0]), 0.5)
    assert math.log(2) / math.exp(-720.0) > np.finfo(np.float64).max  # the true n: beyond float64
    assert got[:2].tolist() == [np.inf, np.inf]
    assert got[2] == pytest.approx(math.log(2) * math.exp(700.0), rel=1e-9)  # still in range: exact


def test_a_top_p_above_1_is_refused_and_1_is_off():
    from memscan.lm.extractable_run import ExtractableConfig

    lp = np.log(np.array([0.5, 0.3, 0.2]))
    np.testing.assert_array_equal(scheme_logprobs(lp, top_p=1.0), scheme_logprobs(lp))
    for bad in (1.5, 0.0, -0.2, float("nan")):
        with pytest.raises(InputError, match="top-p"):
            scheme_logprobs(lp, top_p=bad)
        with pytest.raises(InputError, match="top-p"):
            ExtractableConfig(top_p=bad).validate()
    assert ExtractableConfig(top_p=1.0).validate().top_p is None
    assert ExtractableConfig(top_p=0.9).validate().top_p == 0.9
    for kwargs in ({"temperature": 0.0}, {"top_k": -1}):
        with pytest.raises(InputError):
            ExtractableConfig(**kwargs).validate()


# ---- the lookup model, where the answers are known


def test_lookup_model_memorized_and_not():
    memorized = "the mome raths outgrabe while the jabberwock with eyes of flame came whiffling"
    lm = LookupLM.from_texts([memorized], order=8)
    ids = lm.encode(memorized)[None, :]
    k, m = 20, 30
    prefix, suffix = ids[:, :k], ids[:, k : k + m]
    greedy, _ = lm.greedy(prefix, m)
    assert k_extractable(greedy, suffix).tolist() == [True]
    argmax, log_q = teacher_forced(lm, ids[:, : k + m], k - 1, temperature=1.0, top_k=40)
    assert exact_memorization(argmax, suffix).tolist() == [1.0]
    # every true token has probability 0.9 + 0.1·f(y) under the model; top-40 renormalises
    f = np.exp(lm.fallback)
    q = []
    for y in suffix[0]:
        dist = 0.1 * f
        dist[y] += 0.9
        keep = np.sort(dist)[::-1][39]
        kept = dist[dist >= keep]
        q.append(dist[y] / kept.sum())
    np.testing.assert_allclose(np.exp(log_q[0]), q)
    np.testing.assert_allclose(suffix_log_probability(log_q), [np.sum(np.log(q))])
    # a text never seen: greedy follows the fallback (token 0), nothing is extractable
    other = lm.encode("zzzz zzzz zzzz zzzz zzzz zzzz zzzz zzzz zzzz zzzz zzzz zzzz")[None, :]
    greedy, _ = lm.greedy(other[:, :k], m)
    assert k_extractable(greedy, other[:, k : k + m]).tolist() == [False]
    argmax, log_q = teacher_forced(lm, other[:, : k + m], k - 1, top_k=40)
    assert (argmax == 0).mean() > 0.5
    # 'z' (122) is far down a fallback that prefers low ids: outside the top 40 → p = 0, n = ∞
    assert suffix_log_probability(log_q)[0] == -np.inf
    assert samples_needed(suffix_log_probability(log_q), 0.5)[0] == np.inf


def test_lookup_model_prefix_sweep_known_answer():
    """A text whose 4-grams repeat until position 24: short prefixes are ambiguous, longer ones are not."""
    body = "abcdabcdabcdabcdabcdabcdXYZW-the-suffix-is-here-to-stay"
    lm = LookupLM.from_texts([body], order=4)
    ids = lm.encode(body)[None, :]
    s, m = 26, 20
    greedy, _ = lm.greedy(ids[:, s - 4 : s], m)
    assert k_extractable(greedy, ids[:, s : s + m]).tolist() == [True]


# ---- brute force over a tiny vocabulary


def _table_model(V: int, seed: int):
    """A model over V tokens whose next-token distribution depends on the last two tokens (random table)."""
    rng = np.random.default_rng(seed)
    table = rng.dirichlet(np.ones(V) * 0.7, size=(V, V))

    class Table:
        vocab_size = V
        eos_token_id = None

        def next_token_logprobs(self, ids, start=0):
            ids = np.atleast_2d(ids)
            out = np.zeros((ids.shape[0], ids.shape[1] - 1 - start, V))
            for b in range(ids.shape[0]):
                for j in range(start, ids.shape[1] - 1):
                    out[b, j - start] = np.log(table[ids[b, j - 1] if j else 0, ids[b, j]])
            return out

    return Table(), table


def _scheme_by_hand(p, temperature, top_k, top_p):
    """An independent, loop-by-loop implementation of temperature → top-k → top-p."""
    w = [x ** (1 / temperature) for x in p]
    z = sum(w)
    w = [x / z for x in w]
    order = sorted(range(len(w)), key=lambda i: -w[i])
    keep = set(order[:top_k]) if top_k else set(order)
    if top_k:
        kth = w[order[top_k - 1]]
        keep |= {i for i in range(len(w)) if w[i] == kth}
    z = sum(w[i] for i in keep)
    w = [w[i] / z if i in keep else 0.0 for i in range(len(w))]
    if top_p is not None:
        acc, kept = 0.0, set()
        for i in sorted(range(len(w)), key=lambda i: -w[i]):
            if acc >= top_p:
                break
            kept.add(i)
            acc += w[i]
        z = sum(w[i] for i in kept)
        w = [w[i] / z if i in kept else 0.0 for i in range(len(w))]
    return w


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, None, None), (1.0, 2, None), (0.7, 3, None), (1.3, None, 0.8), (1.0, 3, 0.6)]
)
def test_p_sample_equals_brute_force_enumeration(temperature, top_k, top_p):
    V, L = 4, 3
    model, table = _table_model(V, seed=11)
    prefix = [2, 1]
    total, probs = 0.0, {}
    for seq in itertools.product(range(V), repeat=L):
        ctx, pr = list(prefix), 1.0
        for y in seq:
            pr *= _scheme_by_hand(list(table[ctx[-2], ctx[-1]]), temperature, top_k, top_p)[y]
            ctx.append(y)
        probs[seq] = pr
        total += pr
    assert total == pytest.approx(1.0)
    seqs = list(probs)
    windows = np.array([prefix + list(s) for s in seqs])
    _, log_q = teacher_forced(model, windows, len(prefix) - 1, temperature=temperature, top_k=top_k, top_p=top_p)
    got = np.exp(suffix_log_probability(log_q))
    np.testing.assert_allclose(got, [probs[s] for s in seqs], rtol=1e-12, atol=1e-15)
    assert got.sum() == pytest.approx(1.0)


def test_p_sample_matches_monte_carlo_sampling_of_the_lookup_model():
    """Sampling the lookup model many times finds the suffix at the rate p predicts."""
    lm = LookupLM([[0, 1, 2, 3, 1, 2, 0, 3, 3, 2]], 4, order=2, confidence=0.6)
    prefix = np.array([[0, 1]])
    suffix = np.array([[2, 3, 1]])
    _, log_q = teacher_forced(lm, np.concatenate([prefix, suffix], 1), 1, temperature=1.0, top_k=3)
    p = float(np.exp(suffix_log_probability(log_q))[0])
    draws = lm.sample(np.repeat(prefix, 4000, 0), 3, temperature=1.0, top_k=3, seed=3)
    hits = np.all(draws == suffix, axis=1).mean()
    assert hits == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / 4000))


def test_teacher_forced_chunks_rows():
    lm = LookupLM.from_texts(["hello there general kenobi"], order=3)
    ids = np.stack([lm.encode("hello there general kenobi")] * 5)
    a = teacher_forced(lm, ids, 4, top_k=40)
    b = teacher_forced(lm, ids, 4, top_k=40, max_elements=1)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
