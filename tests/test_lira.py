"""Membership inference attacks: LiRA against hand computation, and one conformance test for all."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import norm

from memscan.errors import InputError
from memscan.mia.attack_labels import run_attacks
from memscan.mia.attacks import (
    ATTACKS,
    AttackInputs,
    LiRAOffline,
    LiRAOnline,
    LossThreshold,
    make_attack,
)
from memscan.mia.metrics import AttackResult, RocResult, roc_metrics


def _known_gaussians(seed=0, n=40):
    """Shadow losses whose IN/OUT sample mean and (ddof=0) std are exactly chosen values.

    For each example: 2 IN models with losses mu_in ± sd_in and 3 OUT models with losses
    mu_out − sd·sqrt(1.5), mu_out, mu_out + sd·sqrt(1.5) (mean mu_out, population std sd).
    """
    rng = np.random.default_rng(seed)
    mu_in = rng.uniform(0.1, 0.5, n)
    sd_in = rng.uniform(0.05, 0.2, n)
    mu_out = mu_in + rng.uniform(0.0, 0.6, n)
    sd_out = rng.uniform(0.05, 0.3, n)
    c = np.sqrt(1.5)
    shadow = np.stack([mu_in - sd_in, mu_in + sd_in, mu_out - c * sd_out, mu_out, mu_out + c * sd_out])
    mask = np.zeros(shadow.shape, bool)
    mask[:2] = True
    # shuffle the models per example so IN/OUT are not in fixed rows
    for i in range(n):
        p = rng.permutation(5)
        shadow[:, i], mask[:, i] = shadow[p, i], mask[p, i]
    target = rng.uniform(0.0, 1.2, n)
    return target, shadow, mask, (mu_in, sd_in, mu_out, sd_out)


def test_online_matches_known_gaussians():
    target, shadow, mask, (mu_in, sd_in, mu_out, sd_out) = _known_gaussians()
    r = LiRAOnline().fit_score(AttackInputs(target, shadow, mask))
    # statistic s = −loss: the Gaussians of s have means −mu and the same σ
    s = -target
    expected = norm.logpdf(s, -mu_in, sd_in) - norm.logpdf(s, -mu_out, sd_out)
    np.testing.assert_allclose(r.scores, expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(r.extras["mu_in"], -mu_in, atol=1e-12)
    np.testing.assert_allclose(r.extras["sigma_out"], sd_out, rtol=1e-10)
    # the log-likelihood ratio does not depend on modelling loss or −loss
    np.testing.assert_allclose(
        r.scores,
        norm.logpdf(target, mu_in, sd_in) - norm.logpdf(target, mu_out, sd_out),
        atol=1e-10,
    )
    assert r.extras["n_in"].tolist() == [2] * 40 and r.extras["n_out"].tolist() == [3] * 40


def test_offline_matches_known_gaussians_one_sided():
    target, shadow, mask, (_, _, mu_out, sd_out) = _known_gaussians(seed=1)
    r = LiRAOffline().fit_score(AttackInputs(target, shadow, mask))
    s = -target
    # paper: Λ = 1 − Pr[Z > s], Z ~ N(μ_out, σ_out²) on the s scale; low loss → high Λ
    lam = 1.0 - norm.sf(s, loc=-mu_out, scale=sd_out)
    np.testing.assert_allclose(r.extras["lambda"], lam, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(lam, 1.0 - norm.cdf((target - mu_out) / sd_out), atol=1e-12)
    # returned score: −log Pr[Z ≥ s], same ranking as Λ
    np.testing.assert_allclose(r.scores, -norm.logsf(s, loc=-mu_out, scale=sd_out), rtol=1e-10)
    assert np.all(np.diff(lam[np.argsort(r.scores)]) >= 0)
    # loss further below the OUT models (in σ_out) → more member-like
    assert np.argmax(r.scores) == np.argmin((target - mu_out) / sd_out)


def test_offline_does_not_saturate():
    # OUT losses ~ N(5, 1); targets 10..40 σ below: Λ is 1.0 in float64 for all, scores are not
    shadow = np.tile(np.array([[4.0], [6.0]]), (1, 4))
    target = np.array([-5.0, -15.0, -25.0, -35.0])
    r = LiRAOffline().fit_score(AttackInputs(target, shadow))
    assert (r.extras["lambda"] == 1.0).all()
    assert np.all(np.diff(r.scores) > 0)
    np.testing.assert_allclose(r.scores, -norm.logsf(-target, loc=-5, scale=1), rtol=1e-10)


def _random_masked(seed=3, m=16, n=30):
    rng = np.random.default_rng(seed)
    shadow = rng.gamma(2.0, 0.5, size=(m, n))
    mask = rng.random((m, n)) < 0.5
    mask[:2], mask[2:4] = True, False  # at least 2 IN and 2 OUT per example
    target = rng.gamma(2.0, 0.5, size=n)
    return target, shadow, mask


# --------------------------------------------------------------------------------------------
# reference: LiRA written out per example from Carlini et al. 2022 (Alg. 1 and §IV-C), with σ
# from the definitions — not from memscan's vectorised code
# --------------------------------------------------------------------------------------------
def _pooled_sd_by_least_squares(values_per_example):
    """Pooled within-example deviation as the residual deviation of a one-way ANOVA: regress all
    values on one indicator per example; σ² = residual sum of squares / (n − rank)."""
    y = np.concatenate(values_per_example)
    groups = np.repeat(np.arange(len(values_per_example)), [len(v) for v in values_per_example])
    design = (groups[:, None] == np.arange(len(values_per_example))[None, :]).astype(float)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ coef
    return float(np.sqrt(resid @ resid / (y.size - np.linalg.matrix_rank(design))))


def _pooled_sd_loop(values_per_example):
    """σ² = Σ_i Σ_m (s_mi − m_i)² / Σ_i (n_i − 1) around each example's mean m_i, as a plain loop."""
    ss = dof = 0.0
    for v in values_per_example:
        c = sum(v) / len(v)
        ss += sum((float(x) - c) ** 2 for x in v)
        dof += len(v) - 1
    return (ss / dof) ** 0.5


def _reference_lira(target, shadow, mask, *, fixed_variance=False, location="mean"):
    """(online, offline scores, σ_in, σ_out online, σ_out offline) of LiRA on s = −loss, per example.

    As in Carlini et al.'s released code (research/mi_lira_2021/plot.py, ``generate_ours``):
    ``location`` picks μ only (``np.median(dat_in, 1)`` there); every σ is a deviation around
    means — per example ``np.std(dat_in, 1)``, here ``statistics.pstdev(v)`` (its default centre is
    the mean). Fixed variance: pooled within-example σ when IN and OUT each have a degree of
    freedom (for the offline attack: OUT alone); otherwise the global deviation of all values of a
    side, ``np.std(dat)`` in that code, here ``statistics.pstdev``.
    """
    import statistics

    center = statistics.fmean if location == "mean" else statistics.median
    n = len(target)
    s = [-float(v) for v in target]
    ins = [[-float(shadow[m][i]) for m in range(len(shadow)) if mask[m][i]] for i in range(n)]
    outs = [[-float(shadow[m][i]) for m in range(len(shadow)) if not mask[m][i]] for i in range(n)]
    mu_in = [center(v) if v else float("nan") for v in ins]
    mu_out = [center(v) for v in outs]

    def fixed(values, pooled):
        if pooled:
            return [_pooled_sd_loop(values)] * n
        return [statistics.pstdev([x for v in values for x in v])] * n

    def has_dof(values):
        return sum(len(v) - 1 for v in values) >= 1

    if fixed_variance:
        both = has_dof(ins) and has_dof(outs)
        sd_in = fixed(ins, both) if all(ins) else None
        sd_out_on = fixed(outs, both)
        sd_out_off = fixed(outs, has_dof(outs))
    else:
        sd_in = [statistics.pstdev(v) for v in ins] if all(ins) else None
        sd_out_on = sd_out_off = [statistics.pstdev(v) for v in outs]
    online = None
    if sd_in is not None:  # Algorithm 1, line 12, in logs
        online = np.array(
            [norm.logpdf(s[i], mu_in[i], sd_in[i]) - norm.logpdf(s[i], mu_out[i], sd_out_on[i]) for i in range(n)]
        )
    # §IV-C: Λ = 1 − Pr[Z > s]; memscan returns −log Pr[Z ≥ s], the same ranking
    offline = np.array([-norm.logsf(s[i], mu_out[i], sd_out_off[i]) for i in range(n)])
    return online, offline, sd_in, sd_out_on, sd_out_off


def _pairwise_auc(scores, is_member):
    """AUC as Pr[score(member) > score(non-member)] + ½ Pr[tie], over all pairs."""
    pos, neg = scores[is_member], scores[~is_member]
    return float(((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean())


@pytest.mark.parametrize("location", ["mean", "median"])
@pytest.mark.parametrize("fixed_variance", [False, True])
def test_lira_vs_loop_reference(fixed_variance, location):
    target, shadow, mask = _random_masked()  # 2–14 IN and OUT models per example
    online, offline, sd_in, sd_out, _ = _reference_lira(
        target, shadow, mask, fixed_variance=fixed_variance, location=location
    )
    inputs = AttackInputs(target, shadow, mask)
    on = LiRAOnline(fixed_variance=fixed_variance, location=location).fit_score(inputs)
    off = LiRAOffline(fixed_variance=fixed_variance, location=location).fit_score(inputs)
    np.testing.assert_allclose(on.extras["sigma_in"], sd_in, rtol=1e-12)
    np.testing.assert_allclose(on.extras["sigma_out"], sd_out, rtol=1e-12)
    np.testing.assert_allclose(on.scores, online, rtol=1e-9)
    np.testing.assert_allclose(off.scores, offline, rtol=1e-9)
    sigma = "pooled" if fixed_variance else "per_example"  # 2–14 values per example: pooled
    assert on.params == {"fixed_variance": fixed_variance, "location": location, "sigma": sigma}
    assert off.params["sigma"] == sigma


def test_fixed_variance_pooled_is_the_anova_residual_deviation():
    """With the mean as location, the pooled σ is the residual deviation of a one-way ANOVA on the
    example (computed by least squares): Σ(n_i − 1) degrees of freedom, not Σ n_i."""
    target, shadow, mask = _random_masked(seed=5)
    r = LiRAOnline(fixed_variance=True).fit_score(AttackInputs(target, shadow, mask))
    n = target.size
    ins = [-shadow[mask[:, i], i] for i in range(n)]
    outs = [-shadow[~mask[:, i], i] for i in range(n)]
    np.testing.assert_allclose(r.extras["sigma_in"], _pooled_sd_by_least_squares(ins), rtol=1e-10)
    np.testing.assert_allclose(r.extras["sigma_out"], _pooled_sd_by_least_squares(outs), rtol=1e-10)


def test_fixed_variance_hand_worked_pooled():
    """Two examples, four shadow models, worked by hand (losses ℓ; s = −ℓ has the same σ).

    Example 0: IN ℓ = 1, 3 (models 0, 1; mean 2, SS 2); OUT ℓ = 2, 6 (models 2, 3; mean 4, SS 8).
    Example 1: IN ℓ = 4, 6, 8 (models 1–3; mean 6, SS 8); OUT ℓ = 5 (model 0; SS 0).
    σ_in² = (2 + 8) / ((2−1) + (3−1)) = 10/3;  σ_out² = (8 + 0) / ((2−1) + (1−1)) = 8.
    (Dividing by Σ n_i would give 2 and 8/3.) Targets ℓ = 2, 5:
    score_0 = −½·0/σ_in² + ½·(2−4)²/8 + ½ ln(σ_out²/σ_in²) = 1/4 + ½ ln 2.4
    score_1 = −½·(5−6)²/(10/3) + ½·0 + ½ ln 2.4 = −3/20 + ½ ln 2.4
    offline: z = (μ_out − ℓ)/σ_out = (4 − 2)/√8, (5 − 5)/√8 = 1/√2, 0.
    """
    shadow = np.array([[1.0, 5.0], [3.0, 4.0], [2.0, 6.0], [6.0, 8.0]])
    mask = np.array([[1, 0], [1, 1], [0, 1], [0, 1]], dtype=bool)
    x = AttackInputs(target_loss=[2.0, 5.0], shadow_loss=shadow, shadow_in=mask)
    on = LiRAOnline(fixed_variance=True).fit_score(x)
    np.testing.assert_allclose(on.extras["sigma_in"], [np.sqrt(10 / 3)] * 2, rtol=1e-14)
    np.testing.assert_allclose(on.extras["sigma_out"], [np.sqrt(8.0)] * 2, rtol=1e-14)
    np.testing.assert_allclose(on.scores, [0.25 + 0.5 * np.log(2.4), -0.15 + 0.5 * np.log(2.4)], rtol=1e-13)
    off = LiRAOffline(fixed_variance=True).fit_score(x)
    np.testing.assert_allclose(off.extras["sigma_out"], [np.sqrt(8.0)] * 2, rtol=1e-14)
    np.testing.assert_allclose(off.extras["z"], [1 / np.sqrt(2), 0.0], rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(off.extras["lambda"], [norm.cdf(1 / np.sqrt(2)), 0.5], rtol=1e-12)


def test_fixed_variance_hand_worked_one_value_per_example():
    """Two shadow models, each example IN one and OUT the other (a balanced pair): no example has
    two values, so σ is the global deviation of each side (the authors' np.std), not 0.

    IN ℓ = 1, 3, 5 → σ_in² = 8/3; OUT ℓ = 0, 4, 8 → σ_out² = 32/3 (ddof 0, around the overall
    means 3 and 4). Targets ℓ = 0.5, 4, 9:
    online score = −½(ℓ − μ_in)²·3/8 + ½(ℓ − μ_out)²·3/32 + ln 2;
    offline z = (μ_out − ℓ)/σ_out = (−0.5, 0, −1)/√(32/3): three distinct scores. The old pooled
    σ was 0 here (floored at 1e-12), which tied examples 0 and 2 at score 0.
    """
    shadow = np.array([[1.0, 4.0, 5.0], [0.0, 3.0, 8.0]])
    mask = np.array([[1, 0, 1], [0, 1, 0]], dtype=bool)
    x = AttackInputs(target_loss=[0.5, 4.0, 9.0], shadow_loss=shadow, shadow_in=mask)
    on = LiRAOnline(fixed_variance=True).fit_score(x)
    np.testing.assert_allclose(on.extras["sigma_in"], [np.sqrt(8 / 3)] * 3, rtol=1e-14)
    np.testing.assert_allclose(on.extras["sigma_out"], [np.sqrt(32 / 3)] * 3, rtol=1e-14)
    expected = np.array([-0.046875 + 0.01171875, -0.1875, -3.0 + 0.046875]) + np.log(2.0)
    np.testing.assert_allclose(on.scores, expected, rtol=1e-13)
    off = LiRAOffline(fixed_variance=True).fit_score(x)
    np.testing.assert_allclose(off.extras["z"], np.array([-0.5, 0.0, -1.0]) / np.sqrt(32 / 3), rtol=1e-14)
    assert off.scores[1] > off.scores[0] > off.scores[2]
    assert 0.0 < off.extras["lambda"].min() and off.extras["lambda"].max() < 1.0
    assert on.params["sigma"] == off.params["sigma"] == "global"  # recorded with the result


@pytest.mark.parametrize("location", ["mean", "median"])
def test_fixed_variance_one_shadow_value_per_example(location):
    """One IN and one OUT value per example (e.g. `memscan mia --model` with a 2-model balanced
    shadow directory; or one OUT reference model offline): σ is the global deviation, the scores
    do not saturate, and AUC and low-FPR TPR equal the reference's."""
    rng = np.random.default_rng(11)
    n = 400
    difficulty = rng.gamma(2.0, 1.0, n)
    first = rng.random(n) < 0.5
    mask = np.stack([first, ~first])  # each example IN exactly one of the two models
    shadow = difficulty - 0.3 * mask + 0.1 * rng.normal(size=mask.shape)
    is_member = rng.random(n) < 0.5
    target = difficulty - 0.3 * is_member + 0.1 * rng.normal(size=n)
    x = AttackInputs(target, shadow, mask, is_member=is_member)
    online, offline, sd_in, sd_out, _ = _reference_lira(target, shadow, mask, fixed_variance=True, location=location)
    for attack, ref, sds in (
        (LiRAOnline(fixed_variance=True, location=location), online, (sd_in, sd_out)),
        (LiRAOffline(fixed_variance=True, location=location), offline, (sd_out,)),
    ):
        r = attack.fit_score(x)
        sigmas = [r.extras["sigma_out"]] if len(sds) == 1 else [r.extras["sigma_in"], r.extras["sigma_out"]]
        for got, want in zip(sigmas, sds):
            assert got.min() > 1e-6
            np.testing.assert_allclose(got, want, rtol=1e-12)
        assert np.unique(r.scores).size == n, f"{attack}: tied (saturated) scores"
        np.testing.assert_allclose(r.scores, ref, rtol=1e-9)
        assert r.roc.auc == pytest.approx(_pairwise_auc(ref, is_member), abs=1e-12)
        assert r.roc.auc == pytest.approx(_pairwise_auc(r.scores, is_member), abs=1e-12)
        assert r.roc.tpr_at_fpr(0.01) == roc_metrics(ref, is_member).tpr_at_fpr(0.01)
    # the offline attack with one OUT reference model only (shadow_in omitted)
    ref_model = shadow[:1]
    r = LiRAOffline(fixed_variance=True).fit_score(AttackInputs(target, ref_model, is_member=is_member))
    np.testing.assert_allclose(r.extras["sigma_out"], np.std(-ref_model), rtol=1e-12)
    assert np.unique(r.scores).size == n and np.unique(r.extras["lambda"]).size > n // 2


def test_fixed_variance_unequal_in_out_counts_is_unbiased():
    """2 IN and 6 OUT values per example, both drawn with σ = 1 around per-example means: both
    estimates are ≈ 1. Dividing by Σ n_i instead gave √(1/2) ≈ 0.71 for IN and √(5/6) ≈ 0.91 for
    OUT, skewing the online ratio."""
    rng = np.random.default_rng(2)
    n, m = 4000, 8
    mu = rng.gamma(2.0, 1.0, n)
    mask = np.zeros((m, n), bool)
    for i in range(n):
        mask[rng.choice(m, 2, replace=False), i] = True
    shadow = mu - 0.5 * mask + rng.normal(size=(m, n))
    target = mu + rng.normal(size=n)
    x = AttackInputs(target, shadow, mask)
    on = LiRAOnline(fixed_variance=True).fit_score(x)
    assert on.extras["n_in"].tolist() == [2] * n and on.extras["n_out"].tolist() == [6] * n
    assert on.extras["sigma_in"][0] == pytest.approx(1.0, abs=0.03)  # se ≈ 0.011
    assert on.extras["sigma_out"][0] == pytest.approx(1.0, abs=0.03)  # se ≈ 0.005
    online, offline, sd_in, sd_out, _ = _reference_lira(target, shadow, mask, fixed_variance=True)
    np.testing.assert_allclose(on.scores, online, rtol=1e-9)
    np.testing.assert_allclose(LiRAOffline(fixed_variance=True).fit_score(x).scores, offline, rtol=1e-9)


def test_fixed_variance_one_side_without_degree_of_freedom():
    """1 IN and 2 OUT values per example (3 balanced shadow models): the online attack has no
    within-example spread for IN, so both of its σ are global (one kind on both sides of the
    ratio); the offline attack, OUT only, keeps the pooled OUT σ."""
    rng = np.random.default_rng(4)
    n = 60
    mask = np.zeros((3, n), bool)
    mask[rng.integers(0, 3, n), np.arange(n)] = True
    shadow = rng.gamma(2.0, 1.0, n) - 0.2 * mask + 0.1 * rng.normal(size=(3, n))
    target = rng.gamma(2.0, 1.0, n)
    x = AttackInputs(target, shadow, mask)
    on = LiRAOnline(fixed_variance=True).fit_score(x)
    np.testing.assert_allclose(on.extras["sigma_in"], np.std(shadow[mask]), rtol=1e-12)
    np.testing.assert_allclose(on.extras["sigma_out"], np.std(shadow[~mask]), rtol=1e-12)
    off = LiRAOffline(fixed_variance=True).fit_score(x)
    outs = [-shadow[~mask[:, i], i] for i in range(n)]
    np.testing.assert_allclose(off.extras["sigma_out"], _pooled_sd_by_least_squares(outs), rtol=1e-10)
    online, offline, *_ = _reference_lira(target, shadow, mask, fixed_variance=True)
    np.testing.assert_allclose(on.scores, online, rtol=1e-9)
    np.testing.assert_allclose(off.scores, offline, rtol=1e-9)


@pytest.mark.parametrize(
    "case",
    ["all values equal, one per example", "all values equal, pooled", "equal within every example"],
)
def test_fixed_variance_without_spread_is_one_clear_error(case):
    n = 5
    if case == "all values equal, one per example":
        shadow, mask = np.full((2, n), 0.25), np.stack([np.ones(n, bool), np.zeros(n, bool)])
    elif case == "all values equal, pooled":
        shadow, mask = np.full((4, n), 0.25), np.array([[1], [1], [0], [0]], bool).repeat(n, 1)
    else:  # identical shadow models: each example's values agree, examples differ
        shadow = np.tile(np.linspace(0.1, 0.5, n), (4, 1))
        mask = np.array([[1], [1], [0], [0]], bool).repeat(n, 1)
    x = AttackInputs(np.linspace(0.0, 1.0, n), shadow, mask, is_member=np.arange(n) % 2 == 0)
    for attack in (LiRAOnline(fixed_variance=True), LiRAOffline(fixed_variance=True)):
        with pytest.raises(InputError, match=r"σ = 0") as exc:
            attack.fit_score(x)
        assert "trained separately" in exc.value.hint
    # in a run, the attack is listed as skipped with that reason, never silently saturated
    done, skipped = run_attacks(
        "diffusion_loss", x.target_loss, x.is_member, shadow=shadow, shadow_in=mask,
        attacks=["loss", "lira_online_fixed", "lira_offline_fixed"],
    )  # fmt: skip
    assert [label for label, _ in done] == ["loss"]
    assert [s["attack"] for s in skipped] == ["lira_online_fixed", "lira_offline_fixed"]
    assert all("σ = 0" in s["reason"] for s in skipped)


def test_median_location_takes_sigma_around_the_mean():
    """location="median" as in Carlini et al.'s generate_ours: μ = np.median(dat, 1), σ =
    np.std(dat, 1) — around the mean, not the median. Worked by hand on s = −loss:

    IN ℓ = 1, 2, 6 → s = −1, −2, −6: μ_in = −2, mean −3, σ_in² = (4 + 1 + 9)/3 = 14/3
    (around the median it would be 17/3). OUT ℓ = 2, 4, 9 → μ_out = −4, mean −5,
    σ_out² = (9 + 1 + 16)/3 = 26/3. Target ℓ = 3 (s = −3):
    online = −½·1/(14/3) − ½ ln(14/3) + ½·1/(26/3) + ½ ln(26/3) = −3/28 + 3/52 + ½ ln(26/14);
    offline z = (s − μ_out)/σ_out = 1/√(26/3).
    """
    shadow = np.array([[1.0], [2.0], [6.0], [2.0], [4.0], [9.0]])
    mask = np.array([[1], [1], [1], [0], [0], [0]], dtype=bool)
    x = AttackInputs(target_loss=[3.0], shadow_loss=shadow, shadow_in=mask)
    on = LiRAOnline(location="median").fit_score(x)
    assert on.extras["mu_in"].tolist() == [-2.0] and on.extras["mu_out"].tolist() == [-4.0]
    np.testing.assert_allclose(on.extras["sigma_in"], [np.sqrt(14 / 3)], rtol=1e-14)
    np.testing.assert_allclose(on.extras["sigma_out"], [np.sqrt(26 / 3)], rtol=1e-14)
    np.testing.assert_allclose(on.scores, [-3 / 28 + 3 / 52 + 0.5 * np.log(26 / 14)], rtol=1e-13)
    off = LiRAOffline(location="median").fit_score(x)
    np.testing.assert_allclose(off.extras["z"], [1 / np.sqrt(26 / 3)], rtol=1e-14)
    # with fixed variance (pooled, one example): the same deviations, Σ(n_i − 1) = 2 dof
    fixed = LiRAOnline(fixed_variance=True, location="median").fit_score(x)
    np.testing.assert_allclose(fixed.extras["sigma_in"], [np.sqrt(14 / 2)], rtol=1e-14)
    np.testing.assert_allclose(fixed.extras["sigma_out"], [np.sqrt(26 / 2)], rtol=1e-14)


def _no_spread_case():
    """5 examples, 2 IN and 2 OUT shadow models each (rows 0–1 IN, 2–3 OUT). IN values equal in
    examples 1 and 3 (identical checkpoints), equal up to float32 rounding in example 4; OUT values
    equal in example 2 only."""
    shadow = np.array(
        [
            [1.0, 2.0, 3.0, 0.25, 0.3],
            [1.5, 2.0, 3.5, 0.25, float(np.float32(0.3))],
            [2.0, 3.0, 4.0, 0.5, 0.6],
            [2.5, 3.5, 4.0, 0.7, 0.8],
        ]
    )
    mask = np.array([[1], [1], [0], [0]], dtype=bool).repeat(5, 1)
    return AttackInputs([1.001, 2.0, 3.0, 0.3, 0.35], shadow, mask, is_member=[1, 0, 1, 0, 1]), shadow


def test_per_example_sigma_without_spread_is_one_clear_error():
    """Identical shadow checkpoints used to give σ = 1e-12 and scores like −5e17 whose sign came
    from rounding; now one error naming how many examples and which, with the fix."""
    x, shadow = _no_spread_case()
    # independently: which examples' IN / OUT values differ by at most float32 rounding
    in_flat = [i for i in range(5) if abs(shadow[0, i] - shadow[1, i]) <= 1e-7 * abs(shadow[0, i])]
    out_flat = [i for i in range(5) if shadow[2, i] == shadow[3, i]]
    assert in_flat == [1, 3, 4] and out_flat == [2]
    with pytest.raises(InputError, match=r"IN shadow statistics of 3 example\(s\) \(index 1, 3, 4\)") as exc:
        LiRAOnline().fit_score(x)
    assert "σ ≈ 0" in exc.value.message
    assert "fixed_variance=True" in exc.value.hint and "--attacks lira_online_fixed" in exc.value.hint
    with pytest.raises(InputError, match=r"OUT shadow statistics of 1 example\(s\) \(index 2\)"):
        LiRAOffline().fit_score(x)
    # many examples: the count, and the first five
    many = AttackInputs(np.zeros(8), np.tile([[1.0], [1.0], [2.0], [3.0]], (1, 8)), np.arange(32).reshape(4, 8) < 16)
    with pytest.raises(InputError, match=r"of 8 example\(s\) \(index 0, 1, 2, 3, 4, …\)"):
        LiRAOnline().fit_score(many)
    # in a run: the per-example attacks are skipped with that reason, the fixed ones still run
    done, skipped = run_attacks(
        "diffusion_loss", x.target_loss, x.is_member, shadow=shadow, shadow_in=x.shadow_in,
        attacks=["lira_online", "lira_offline", "lira_online_fixed", "lira_offline_fixed"],
    )  # fmt: skip
    assert [s["attack"] for s in skipped] == ["lira_online", "lira_offline"]
    assert all("σ ≈ 0" in s["reason"] for s in skipped)
    assert [label for label, _ in done] == ["lira_online_fixed", "lira_offline_fixed"]


def test_tiny_but_real_per_example_spread_is_used_as_it_is():
    """A spread far below the values but above float32 rounding (relative 2e-5 here) is a real
    spread: σ is np.std of the values, not floored or refused, and the scores are the Gaussians'."""
    shadow = np.array([[0.5, 1.0], [0.5 + 2e-5, 1.2], [0.6, 1.4], [0.7, 1.6]])
    mask = np.array([[1], [1], [0], [0]], dtype=bool).repeat(2, 1)
    target = np.array([0.5 + 1e-5, 1.3])
    r = LiRAOnline().fit_score(AttackInputs(target, shadow, mask))
    np.testing.assert_allclose(r.extras["sigma_in"], [1e-5, 0.1], rtol=1e-9)
    s = -target
    want = [
        norm.logpdf(s[i], -shadow[:2, i].mean(), np.std(shadow[:2, i]))
        - norm.logpdf(s[i], -shadow[2:, i].mean(), np.std(shadow[2:, i]))
        for i in range(2)
    ]
    np.testing.assert_allclose(r.scores, want, rtol=1e-9)
    assert r.scores[0] > 10  # the target sits in the middle of the narrow IN Gaussian


def test_lira_beats_global_threshold_on_heterogeneous_examples():
    """Simulated losses: per-example difficulty dominates, membership lowers loss by 0.3."""
    rng = np.random.default_rng(0)
    n, m = 2000, 32
    difficulty = rng.gamma(2.0, 1.0, n)

    def losses(member):
        return difficulty - 0.3 * member + 0.1 * rng.normal(size=member.shape)

    shadow_in = rng.random((m, n)) < 0.5
    shadow = losses(shadow_in.astype(float))
    is_member = rng.random(n) < 0.5
    target = losses(is_member.astype(float))
    inputs = AttackInputs(target, shadow, shadow_in, is_member=is_member, timestep=50)
    res = {name: make_attack(name).fit_score(inputs).roc for name in ATTACKS}
    assert 0.5 < res["loss"].auc < 0.7
    for name in ("lira_online", "lira_offline"):
        assert res[name].auc > 0.9, name
        assert res[name].tpr_at_fpr(0.01) > 5 * max(res["loss"].tpr_at_fpr(0.01), 0.02), name
    assert res["lira_online"].auc >= res["lira_offline"].auc - 0.02


def test_needs_enough_shadow_models():
    target, shadow, mask = _random_masked()
    mask[:, 0] = False
    mask[0, 0] = True  # example 0 has a single IN model
    with pytest.raises(InputError, match="fewer than 2 IN") as exc:
        LiRAOnline().fit_score(AttackInputs(target, shadow, mask))
    assert "fixed_variance" in exc.value.hint
    LiRAOnline(fixed_variance=True).fit_score(AttackInputs(target, shadow, mask))
    LiRAOffline().fit_score(AttackInputs(target, shadow, mask))
    with pytest.raises(InputError, match="fewer than 1 IN"):
        LiRAOnline(fixed_variance=True).fit_score(AttackInputs(target, shadow))  # all OUT
    with pytest.raises(InputError, match="location"):
        LiRAOnline(location="mode")
    with pytest.raises(InputError, match="unknown attack"):
        make_attack("lira")


def test_bad_attack_inputs_and_options_are_one_clear_error():
    """Each of these gave a bare ValueError or TypeError, or was silently misread."""
    target, shadow, mask = _random_masked()
    # timestep: int(nan) / int("abc") ran before the check
    for t in (float("nan"), "abc", float("inf"), 2.5, True):
        with pytest.raises(InputError, match="timestep: .* is not a non-negative integer"):
            AttackInputs(target, timestep=t).validate()
    assert AttackInputs(target, timestep=np.int64(7)).validate().timestep == 7
    assert AttackInputs(target, timestep=np.array(7.0)).validate().timestep == 7
    # shadow_loss not numbers (target_loss already went through as_scores)
    bad_shadow = np.full(shadow.shape, "x", dtype=object)
    with pytest.raises(InputError, match="shadow_loss: cannot be read as an M×") as exc:
        AttackInputs(target, bad_shadow, mask).validate()
    assert "one row of float losses per shadow model" in exc.value.hint
    with pytest.raises(InputError, match="shadow_loss: cannot be read"):
        AttackInputs(target, [[1.0, 2.0], [1.0]]).validate()  # ragged
    # fixed_variance must be a bool: bool("false") is True
    for value in ("false", "False", 0, 1, None):
        with pytest.raises(InputError, match=f"lira_online: fixed_variance={value!r} is not a bool"):
            make_attack("lira_online", fixed_variance=value)
    assert make_attack("lira_offline", fixed_variance=np.bool_(True)).fixed_variance is True
    # an option the attack does not take: named, with the attack's options
    with pytest.raises(InputError, match="attack 'loss': unknown option.* fixed_variance") as exc:
        make_attack("loss", fixed_variance=True)
    assert exc.value.hint == "loss takes no options"
    with pytest.raises(InputError, match="attack 'lira_online': unknown option.* fixed_varience") as exc:
        make_attack("lira_online", fixed_varience=True)
    assert "fixed_variance, location" in exc.value.hint
    with pytest.raises(InputError, match="unknown attack"):
        make_attack(["lira"])


def test_shadow_hint_fits_the_variance_setting():
    """The hint "use fixed_variance=True (needs only 1)" was shown even with fixed variance on."""
    target, shadow, mask = _random_masked()
    with pytest.raises(InputError, match="fewer than 1 IN") as exc:
        LiRAOnline(fixed_variance=True).fit_score(AttackInputs(target, shadow))  # all OUT
    assert "fixed_variance" not in exc.value.hint and "lira_offline" in exc.value.hint
    with pytest.raises(InputError, match="fewer than 1 OUT") as exc:
        LiRAOffline(fixed_variance=True).fit_score(AttackInputs(target, shadow, np.ones_like(mask)))  # all IN
    assert "fixed_variance" not in exc.value.hint and "at least one OUT model" in exc.value.hint
    with pytest.raises(InputError, match="fewer than 2 OUT") as exc:
        LiRAOffline().fit_score(AttackInputs(target, shadow[:1], mask[:1] & False))
    assert "fixed_variance=True (needs only 1)" in exc.value.hint


def test_loss_threshold_is_negative_loss():
    r = LossThreshold().fit_score(AttackInputs([0.3, 0.1, 0.2], is_member=[0, 1, 1]))
    np.testing.assert_array_equal(r.scores, [-0.3, -0.1, -0.2])
    assert r.roc.auc == 1.0


# --------------------------------------------------------------------------------------------
# conformance: every registered attack validates and reports the same way
# --------------------------------------------------------------------------------------------
def _valid(n=12, m=8, seed=0, **over):
    rng = np.random.default_rng(seed)
    mask = np.zeros((m, n), bool)
    mask[: m // 2] = True
    kw = dict(
        target_loss=rng.random(n),
        shadow_loss=rng.random((m, n)),
        shadow_in=mask,
        is_member=np.arange(n) % 2 == 0,
        timestep=10,
    )
    kw.update(over)
    return AttackInputs(**kw)


BAD_INPUTS = {
    "target NaN": dict(target_loss=np.r_[np.nan, np.ones(11)]),
    "target inf": dict(target_loss=np.r_[np.inf, np.ones(11)]),
    "target 2-D": dict(target_loss=np.ones((12, 1))),
    "labels length": dict(is_member=np.ones(11, bool)),
    "labels one class": dict(is_member=np.ones(12, bool)),
    "labels not 0/1": dict(is_member=np.full(12, 2)),
    "shadow wrong N": dict(shadow_loss=np.ones((8, 11)), shadow_in=np.ones((8, 11), bool)),
    "shadow 1-D": dict(shadow_loss=np.ones(12), shadow_in=None),
    "shadow NaN": dict(shadow_loss=np.where(np.eye(8, 12) > 0, np.nan, 1.0)),
    "mask shape": dict(shadow_in=np.ones((7, 12), bool)),
    "mask not bool": dict(shadow_in=np.full((8, 12), 0.5)),
    "mask without shadow": dict(shadow_loss=None),
    "timestep negative": dict(timestep=-1),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_conformance_result_schema(name):
    attack = make_attack(name)
    assert isinstance(attack, ATTACKS[name]) and attack.name == name
    r = attack.fit_score(_valid(), bootstrap=10, fprs=(0.1,))
    assert isinstance(r, AttackResult) and r.attack == name and r.timestep == 10
    assert r.scores.shape == (12,) and r.scores.dtype == np.float64 and np.isfinite(r.scores).all()
    assert isinstance(r.roc, RocResult) and r.roc.n_members == 6 and r.roc.fprs == (0.1,)
    assert set(r.roc.ci) == {"auc", "balanced_accuracy", "tpr@10%fpr"}
    d = json.loads(json.dumps(r.to_dict()))
    assert set(d) == {"attack", "timestep", "params", "n", "metrics"}
    assert set(d["metrics"]) >= {"auc", "balanced_accuracy", "tpr@10%fpr", "ci"}
    assert all(np.shape(v) == (12,) for v in r.extras.values())
    # without labels: scores only, identical
    r2 = attack.fit_score(_valid(is_member=None))
    assert r2.roc is None and r2.to_dict()["metrics"] is None
    np.testing.assert_array_equal(r2.scores, r.scores)


@pytest.mark.parametrize("name", sorted(ATTACKS))
@pytest.mark.parametrize("bad", sorted(BAD_INPUTS))
def test_conformance_validation_errors(name, bad):
    inputs = _valid(**BAD_INPUTS[bad])
    with pytest.raises(InputError):
        inputs.validate()
    with pytest.raises(InputError):
        make_attack(name).fit_score(inputs)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_conformance_shadow_requirement(name):
    attack = make_attack(name)
    no_shadow = _valid(shadow_loss=None, shadow_in=None)
    if attack.needs_in or attack.needs_out:
        with pytest.raises(InputError, match="needs shadow_loss"):
            attack.fit_score(no_shadow)
    else:
        assert attack.fit_score(no_shadow).scores.shape == (12,)
    with pytest.raises(InputError, match="AttackInputs"):
        attack.fit_score({"target_loss": [1.0]})
