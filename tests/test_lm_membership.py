"""Membership scores (memscan.lm.membership) against direct computations and invariants, and the
blind baseline (memscan.lm.blind) on biased and unbiased splits."""

from __future__ import annotations

import math
import zlib
from itertools import product

import numpy as np
import pytest

from memscan.errors import InputError
from memscan.lm import membership as m
from memscan.lm.blind import BLIND_AUC_WARNING, blind_baseline

# a hand-made text of 6 predicted tokens: probabilities 1/2, 1/4, 1/8, 1/2, 1/16, 1
P = [0.5, 0.25, 0.125, 0.5, 0.0625, 1.0]
LP = np.log(P)


def test_loss_and_perplexity_by_hand():
    nll = (math.log(2) + math.log(4) + math.log(8) + math.log(2) + math.log(16) + 0.0) / 6  # = 11 ln2 / 6
    assert m.mean_nll(LP) == pytest.approx(11 * math.log(2) / 6, rel=1e-14)
    assert m.mean_nll(LP) == pytest.approx(nll, rel=1e-14)
    assert m.perplexity(LP) == pytest.approx(2 ** (11 / 6), rel=1e-13)  # geometric mean of 1/p
    assert m.loss_score(LP) == -m.mean_nll(LP)
    assert m.loss_score(np.log([0.9, 0.9])) > m.loss_score(np.log([0.1, 0.9]))  # members fit better


def test_zlib_ratio_is_log_perplexity_over_compressed_bits():
    text = "the quick brown fox jumps over the lazy dog " * 3
    bits = 8 * len(zlib.compress(text.encode("utf-8")))
    assert m.zlib_entropy_bits(text) == bits
    assert m.zlib_ratio(LP, text) == pytest.approx((11 * math.log(2) / 6) / bits, rel=1e-14)
    assert m.zlib_score(LP, text) == -m.zlib_ratio(LP, text)
    # non-ASCII text is compressed as UTF-8
    assert m.zlib_entropy_bits("café ☕") == 8 * len(zlib.compress("café ☕".encode()))


def test_lowercase_and_reference_ratios():
    lower = np.log([0.25, 0.25, 0.25])  # log-ppl ln 4
    assert m.lowercase_ratio(LP, lower) == pytest.approx(math.log(4) / (11 * math.log(2) / 6), rel=1e-14)
    assert m.lowercase_score(LP, lower) == m.lowercase_ratio(LP, lower)
    assert m.lowercase_ratio(LP, LP) == pytest.approx(1.0)  # a text that is already lowercase
    ref = np.log([0.1] * 4)
    assert m.reference_ratio(LP, ref) == pytest.approx(math.log(10) / (11 * math.log(2) / 6), rel=1e-14)
    # the target memorized it (log-ppl → 0): a huge but finite ratio
    assert np.isfinite(m.reference_score(np.zeros(3), ref)) and m.reference_score(np.zeros(3), ref) > 1e9


@pytest.mark.parametrize(
    ("n", "k", "want"),
    [
        (10, 20, 2),
        (9, 20, 1),
        (15, 20, 3),
        (4, 20, 1),
        (1, 20, 1),
        (7, 100, 7),
        (8, 12.5, 1),
        (16, 12.5, 2),
        (5, 50, 2),
    ],
)
def test_k_count_is_the_floor_with_at_least_one(n, k, want):
    assert m.k_count(n, k) == want


def test_min_k_against_a_direct_computation():
    rng = np.random.default_rng(0)
    for _ in range(50):
        lp = np.log(rng.uniform(1e-4, 1.0, rng.integers(1, 40)))
        for k in (5, 20, 50, 100):
            n = max(1, int(len(lp) * k / 100 + 1e-9))
            want = float(np.mean(sorted(lp.tolist())[:n]))
            assert m.min_k_score(lp, k) == pytest.approx(want, rel=1e-12)
    # by hand: the lowest 20% of 6 tokens is 1 token, log(1/16); of 50%: 3 tokens
    assert m.min_k_score(LP, 20) == pytest.approx(math.log(0.0625))
    assert m.min_k_score(LP, 50) == pytest.approx((math.log(0.0625) + math.log(0.125) + math.log(0.25)) / 3)


def test_min_k_at_100_percent_is_the_mean_log_probability():
    assert m.min_k_score(LP, 100) == pytest.approx(-m.mean_nll(LP), rel=1e-14)


def _moments_by_enumeration(probs):
    """μ = E[log p(z)], σ² = E[(log p(z))²] − μ² (the paper's form), one distribution at a time."""
    mus, sigmas = [], []
    for row in probs:
        mu = sum(p * math.log(p) for p in row if p > 0)
        second = sum(p * math.log(p) ** 2 for p in row if p > 0)
        mus.append(mu)
        sigmas.append(math.sqrt(max(second - mu * mu, 0.0)))
    return np.array(mus), np.array(sigmas)


def test_min_k_plus_plus_against_an_explicit_distribution():
    # vocabulary of 4; the next-token distribution at each of 5 positions, and the true tokens
    probs = np.array(
        [
            [0.7, 0.1, 0.1, 0.1],
            [0.25, 0.25, 0.25, 0.25],  # uniform: σ = 0
            [0.5, 0.5, 0.0, 0.0],  # uniform on its support: σ = 0
            [0.05, 0.05, 0.1, 0.8],
            [0.4, 0.3, 0.2, 0.1],
        ]
    )
    tokens = [0, 2, 1, 1, 3]
    with np.errstate(divide="ignore"):
        nlp = np.log(probs)
    mu, sigma = m.next_token_moments(nlp)
    want_mu, want_sigma = _moments_by_enumeration(probs)
    np.testing.assert_allclose(mu, want_mu, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(sigma, want_sigma, rtol=1e-9, atol=1e-7)
    assert sigma[1] == pytest.approx(0.0, abs=1e-12) and sigma[2] == pytest.approx(0.0, abs=1e-12)
    lp = nlp[np.arange(5), tokens]
    z = m.standardized_logprobs(lp, mu, sigma)
    direct = []
    for t in range(5):
        if want_sigma[t] < 1e-7:
            direct.append(0.0)  # uniform: every token exactly typical
        else:
            direct.append((math.log(probs[t, tokens[t]]) - want_mu[t]) / want_sigma[t])
    np.testing.assert_allclose(z, direct, rtol=1e-9, atol=1e-12)
    for k in (20, 40, 60, 100):
        n = max(1, int(5 * k / 100))
        assert m.min_k_plus_plus_score(lp, mu, sigma, k) == pytest.approx(np.mean(sorted(direct)[:n]), rel=1e-9)


def test_min_k_plus_plus_on_uniform_distributions_is_zero():
    v = 50
    nlp = np.full((7, v), -math.log(v))
    mu, sigma = m.next_token_moments(nlp)
    np.testing.assert_allclose(mu, -math.log(v), rtol=1e-14)
    assert (sigma <= m.SIGMA_FLOOR).all()
    lp = nlp[:, 3]
    assert m.min_k_plus_plus_score(lp, mu, sigma, 20) == 0.0


def test_min_k_plus_plus_on_float32_moments_of_a_uniform_distribution():
    """Moments computed in float32 (the transformers adapter's fast path) of an exactly uniform
    distribution over GPT-2's 50257 tokens: σ and |log p − μ| are float32 rounding (~1e-6), not 0.
    Every token of a uniform distribution equals μ, so its standardized value is exactly 0 (this
    gave ±1 with the absolute floor 1e-10 alone)."""
    v = 50257
    lp32 = np.full(v, -np.log(v), dtype=np.float32)  # float32 log-softmax of equal logits
    p32 = np.exp(lp32)
    mu32 = np.sum(p32 * lp32, dtype=np.float32)
    sd32 = np.sqrt(np.sum(p32 * np.square(lp32 - mu32), dtype=np.float32))
    assert sd32 > 1e-7 and lp32[0] != mu32  # rounding, not 0
    lp, mu, sd = (np.full(6, x, dtype=np.float64) for x in (lp32[0], mu32, sd32))
    np.testing.assert_array_equal(m.standardized_logprobs(lp, mu, sd), np.zeros(6))
    assert m.min_k_plus_plus_score(lp, mu, sd, 20) == 0.0
    # the adapter's own float32 moments, on a uniform and on a uniform-on-its-support distribution
    torch = pytest.importorskip("torch")
    from memscan.generators.causal_lm import per_token_moments

    logits = torch.zeros((2, 7, v))
    logits[1, :, v // 3 :] = -float("inf")  # uniform on the first third of the vocabulary
    ids = torch.zeros((2, 7), dtype=torch.long)
    ids[:, 1:] = torch.tensor([5, 17, 4000, 9, 0, 11])  # all inside the support
    tok, mu, sd = (t.double().numpy() for t in per_token_moments(logits, ids))
    for row in range(2):
        np.testing.assert_array_equal(m.standardized_logprobs(tok[row], mu[row], sd[row]), np.zeros(6))


def test_a_rare_token_next_to_a_flat_part_keeps_its_standardized_value():
    """Uniform over 1000 tokens (mass a = 1 − q) plus one token of mass q = 1e-20: σ ≈ 4e-9 is far
    below the flat tolerance, but the rare token is not typical. Two-valued log p: σ² = a·q·(l_u −
    l_r)², so z(rare) = −sqrt(a/q) = −1e10 and z(uniform token) = sqrt(q/a) = 1e-10."""
    q = 1e-20
    nlp = np.log(np.r_[np.full(1000, (1 - q) / 1000), q])[None]
    mu, sd = m.next_token_moments(nlp)
    z = m.standardized_logprobs(nlp[0, [1000, 3]], np.repeat(mu, 2), np.repeat(sd, 2))
    assert z[0] == pytest.approx(-math.sqrt((1 - q) / q), rel=1e-6)
    assert z[1] == pytest.approx(math.sqrt(q / (1 - q)), abs=1e-9)


def test_min_k_plus_plus_on_every_two_point_distribution():
    """Every vocabulary-2 distribution on a grid and both tokens, against the definitions written
    out again."""
    for p0, tok in product(np.linspace(0.05, 0.95, 19), (0, 1)):
        p = np.array([p0, 1 - p0])
        mu = float(np.sum(p * np.log(p)))
        sd = math.sqrt(float(np.sum(p * np.log(p) ** 2)) - mu**2)
        z = m.standardized_logprobs(np.log(p[[tok]]), *m.next_token_moments(np.log(p)[None]))
        if sd < 1e-7:
            assert z[0] == 0.0
        else:
            assert z[0] == pytest.approx((math.log(p[tok]) - mu) / sd, rel=1e-6)
            # two points: z is ±sqrt(p_other / p_token)
            assert abs(z[0]) == pytest.approx(math.sqrt(p[1 - tok] / p[tok]), rel=1e-6)


def test_moments_of_a_batch_match_row_by_row_and_ignore_zero_probabilities():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 6, 11)) * 3
    logits[0, 0, :5] = -np.inf  # five tokens impossible
    nlp = logits - np.log(np.sum(np.exp(logits), axis=-1, keepdims=True))
    mu, sigma = m.next_token_moments(nlp)
    assert mu.shape == sigma.shape == (3, 6)
    want_mu, want_sigma = _moments_by_enumeration(np.exp(nlp).reshape(-1, 11))
    np.testing.assert_allclose(mu.ravel(), want_mu, rtol=1e-12)
    np.testing.assert_allclose(sigma.ravel(), want_sigma, rtol=1e-9)


def test_scores_refuse_what_is_not_a_log_probability():
    with pytest.raises(InputError, match="no tokens"):
        m.loss_score([])
    with pytest.raises(InputError, match="≤ 0"):
        m.min_k_score([0.5, -1.0])
    with pytest.raises(InputError, match="1-D"):
        m.loss_score(np.zeros((2, 2)))
    with pytest.raises(InputError, match="not in"):
        m.min_k_score(LP, 0)
    with pytest.raises(InputError, match="match"):
        m.min_k_plus_plus_score(LP, np.zeros(3), np.ones(3))


def test_next_token_rows_must_be_distributions():
    """A row that is not a log-distribution (shifted log-probabilities, raw logits) gave wrong μ,
    σ silently; now one error naming the input, how many rows and the first."""
    shifted = np.log([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]]) - 0.5
    with pytest.raises(
        InputError, match=r"adapter X: 2 of 2 next-token row\(s\).*first: row 0, Σ exp\(log p\) = 0.606531"
    ):
        m.next_token_moments(shifted, name="adapter X")
    logits = np.zeros((2, 3, 4))
    logits[1, 2] = [np.nan, 0, 0, 0]
    logits[0] = np.log(0.25)  # rows (0, ·) are distributions; (1, ·) are logits, one with a NaN
    with pytest.raises(InputError, match=r"3 of 6 .*first: row 1, 0") as exc:
        m.next_token_moments(logits)
    assert "log-softmax" in exc.value.hint
    # float32 log-softmax rows (rounding ~1e-7) and rows with impossible tokens are distributions
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 1000)).astype(np.float32) * 5
    x[0, :10] = -np.inf
    lp32 = x - np.log(np.sum(np.exp(x.astype(np.float64)), -1, keepdims=True)).astype(np.float32)
    mu, sd = m.next_token_moments(lp32)
    want_mu, want_sd = _moments_by_enumeration(np.exp(lp32.astype(np.float64)))
    np.testing.assert_allclose(mu, want_mu, rtol=1e-5)
    np.testing.assert_allclose(sd, want_sd, rtol=1e-5)


def test_one_tolerance_for_slightly_positive_log_probabilities():
    """float32 rounding can give log p slightly above 0: up to LOGPROB_ATOL it is taken as 0 (the
    run's check and the scores use the same constant), beyond it is refused."""
    assert m.LOGPROB_ATOL == 1e-6
    assert m.loss_score([5e-7, math.log(0.5)]) == pytest.approx(math.log(0.5) / 2, rel=1e-15)
    with pytest.raises(InputError, match="≤ 0"):
        m.loss_score([2e-6, math.log(0.5)])


# ---- the blind baseline# ---- the blind baseline --------------------------------------------------------------------------
WORDS = (
    "river stone garden window letter summer market silver morning quiet paper harbor table yellow "
    "forest candle winter bridge orange music station cloud pocket valley"
).split()


def _sentences(rng, n, extra=None, years=None):
    out = []
    for _ in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(6, 12))).tolist()
        if extra:
            words.insert(int(rng.integers(0, len(words))), extra)
        if years:
            words.append(f"in {int(rng.integers(*years))}")
        out.append(" ".join(words))
    return out


def test_blind_baseline_separates_a_split_with_a_marker_word():
    rng = np.random.default_rng(0)
    texts = _sentences(rng, 60, extra="copyright") + _sentences(rng, 60)
    res = blind_baseline(texts, [True] * 60 + [False] * 60, seed=0)
    assert res.roc.auc >= 0.9 and res.warning and res.folds == 5


def test_blind_baseline_separates_a_split_by_date_range():
    rng = np.random.default_rng(1)
    texts = _sentences(rng, 60, years=(1990, 2000)) + _sentences(rng, 60, years=(2015, 2024))
    res = blind_baseline(texts, [True] * 60 + [False] * 60, seed=0)
    assert res.roc.auc >= 0.9 and res.warning


def test_blind_baseline_is_at_chance_on_an_iid_split():
    rng = np.random.default_rng(2)
    texts = _sentences(rng, 300)
    is_member = rng.permutation(np.arange(300) < 150)
    res = blind_baseline(texts, is_member, seed=0)
    assert abs(res.roc.auc - 0.5) < 0.08, res.roc.auc
    assert not res.warning and res.roc.auc < BLIND_AUC_WARNING


def test_blind_baseline_scores_are_out_of_fold_and_deterministic():
    rng = np.random.default_rng(3)
    texts = _sentences(rng, 20, extra="alpha") + _sentences(rng, 20)
    a = blind_baseline(texts, [True] * 20 + [False] * 20, seed=5, bootstrap=50)
    b = blind_baseline(texts, [True] * 20 + [False] * 20, seed=5, bootstrap=50)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert a.roc.ci["auc"][0] <= a.roc.auc <= a.roc.ci["auc"][1]


def test_blind_baseline_with_too_few_texts_is_skipped_with_its_reason():
    res = blind_baseline(["a b", "c d", "e f"], [True, False, False])
    assert res.roc is None and not res.warning and "at least 2" in res.skipped
    assert blind_baseline(["a b", "c d", "e f", "g h"], [True, True, False, False]).folds == 2


def test_min_k_is_monotone_in_k_and_never_above_the_mean():
    rng = np.random.default_rng(7)
    for _ in range(100):
        lp = np.log(rng.uniform(1e-6, 1.0, rng.integers(1, 60)))
        values = [m.min_k_score(lp, k) for k in (1, 5, 10, 20, 50, 80, 100)]
        assert all(a <= b + 1e-12 for a, b in zip(values, values[1:]))
        assert values[-1] == pytest.approx(m.loss_score(lp))
        mu, sd = m.next_token_moments(np.log(rng.dirichlet(np.ones(9), size=lp.size)))
        z = [m.min_k_plus_plus_score(lp, mu, sd, k) for k in (5, 20, 100)]
        assert z[0] <= z[1] + 1e-12 <= z[2] + 2e-12
