"""Membership inference attacks: LiRA against hand computation, and one conformance test for all."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import norm

from memscan.errors import InputError
from memscan.mia.attacks import (
    ATTACKS,
    AttackInputs,
    LiRAOffline,
    LiRAOnline,
    LossThreshold,
    make_attack,
)
from memscan.mia.metrics import AttackResult, RocResult


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


@pytest.mark.parametrize("location", ["mean", "median"])
@pytest.mark.parametrize("fixed_variance", [False, True])
def test_lira_vs_loop_reference(fixed_variance, location):
    target, shadow, mask = _random_masked()
    center = np.mean if location == "mean" else np.median
    s_shadow, s = -shadow, -target
    mu_in = np.array([center(s_shadow[mask[:, i], i]) for i in range(s.size)])
    mu_out = np.array([center(s_shadow[~mask[:, i], i]) for i in range(s.size)])
    if fixed_variance:  # pooled within-example deviation
        res_in = np.concatenate([s_shadow[mask[:, i], i] - mu_in[i] for i in range(s.size)])
        res_out = np.concatenate([s_shadow[~mask[:, i], i] - mu_out[i] for i in range(s.size)])
        sd_in = np.full(s.size, np.sqrt(np.mean(res_in**2)))
        sd_out = np.full(s.size, np.sqrt(np.mean(res_out**2)))
    else:
        sd_in = np.array([np.sqrt(np.mean((s_shadow[mask[:, i], i] - mu_in[i]) ** 2)) for i in range(s.size)])
        sd_out = np.array([np.sqrt(np.mean((s_shadow[~mask[:, i], i] - mu_out[i]) ** 2)) for i in range(s.size)])
    inputs = AttackInputs(target, shadow, mask)
    on = LiRAOnline(fixed_variance=fixed_variance, location=location).fit_score(inputs)
    off = LiRAOffline(fixed_variance=fixed_variance, location=location).fit_score(inputs)
    np.testing.assert_allclose(on.scores, norm.logpdf(s, mu_in, sd_in) - norm.logpdf(s, mu_out, sd_out), rtol=1e-9)
    np.testing.assert_allclose(off.scores, -norm.logsf(s, mu_out, sd_out), rtol=1e-9)
    assert on.params == {"fixed_variance": fixed_variance, "location": location}


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
