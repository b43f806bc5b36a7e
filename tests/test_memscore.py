"""Memorization score (van den Burg & Williams 2021) against closed forms, and resumability."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import norm

from memscan.errors import InputError
from memscan.mia.memscore import fold_assignment, logmeanexp, memorization_score


def fit_gaussian(x):
    """Maximum-likelihood 1-D Gaussian: (mean, variance with ddof=0)."""
    x = np.asarray(x, dtype=float)
    return x.mean(), x.var()


def gaussian_loglik(model, x):
    mu, var = model
    return norm.logpdf(np.asarray(x, dtype=float), mu, np.sqrt(var))


def _data(n=25, outlier=7.0, seed=0):
    x = np.random.default_rng(seed).normal(size=n)
    x[n // 2] = outlier  # planted in the middle, not at an end
    return x


def test_leave_one_out_equals_direct_computation():
    x = _data()
    n = x.size
    r = memorization_score(x, fit_gaussian, gaussian_loglik, folds=n, repeats=1, seed=3)
    # direct: model j is fitted on all examples but j
    models = [fit_gaussian(np.delete(x, j)) for j in range(n)]
    u = np.empty(n)
    v = np.empty(n)
    for i in range(n):
        with_i = [norm.logpdf(x[i], mu, np.sqrt(var)) for j, (mu, var) in enumerate(models) if j != i]
        u[i] = np.log(np.mean(np.exp(with_i)))  # n − 1 models contain x_i
        mu, var = models[i]
        v[i] = norm.logpdf(x[i], mu, np.sqrt(var))  # the one model without x_i
    np.testing.assert_allclose(r.u, u, rtol=0, atol=1e-6)
    np.testing.assert_allclose(r.v, v, rtol=0, atol=1e-6)
    np.testing.assert_allclose(r.score, u - v, rtol=0, atol=1e-6)
    assert r.n_in.tolist() == [n - 1] * n and r.n_out.tolist() == [1] * n
    assert r.top(1).tolist() == [n // 2]  # the planted outlier
    assert r.score[n // 2] > 1.0 and np.median(r.score) < 0.2


@pytest.mark.parametrize("folds, repeats", [(2, 1), (5, 3), (10, 2)])
def test_k_fold_repeats_vs_loop_reference(folds, repeats):
    x = _data(n=40, seed=1)
    r = memorization_score(x, fit_gaussian, gaussian_loglik, folds=folds, repeats=repeats, seed=11)
    ins = [[] for _ in x]
    outs = [[] for _ in x]
    for rep in range(repeats):
        a = fold_assignment(x.size, folds, 11, rep)
        np.testing.assert_array_equal(r.assignment[rep], a)
        for k in range(folds):
            model = fit_gaussian(x[a != k])
            for i in range(x.size):
                (outs if a[i] == k else ins)[i].append(gaussian_loglik(model, x[i]))
    u = np.array([np.log(np.mean(np.exp(v))) for v in ins])
    v = np.array([np.log(np.mean(np.exp(v))) for v in outs])
    np.testing.assert_allclose(r.score, u - v, atol=1e-9)
    assert set(r.n_in) == {repeats * (folds - 1)} and set(r.n_out) == {repeats}
    assert r.log_likelihood.shape == (repeats * folds, x.size)
    assert r.top(1).tolist() == [20]
    np.testing.assert_allclose([r.quantiles[0.95], r.quantiles[0.999]], np.quantile(r.score, [0.95, 0.999]))
    assert r.top(5).tolist() == np.argsort(-r.score, kind="stable")[:5].tolist()
    assert json.loads(json.dumps(r.to_dict()))["folds"] == folds


def test_fold_assignment_is_balanced_and_stable():
    a = fold_assignment(103, 10, seed=5, repeat=2)
    assert sorted(np.bincount(a).tolist()) == [10] * 7 + [11] * 3
    np.testing.assert_array_equal(a, fold_assignment(103, 10, seed=5, repeat=2))
    assert not np.array_equal(a, fold_assignment(103, 10, seed=5, repeat=3))
    assert not np.array_equal(a, fold_assignment(103, 10, seed=6, repeat=2))


def test_logmeanexp_is_stable():
    assert logmeanexp(np.array([-1000.0, -1000.0])) == pytest.approx(-1000.0)
    np.testing.assert_allclose(logmeanexp(np.log([[1.0, 2.0], [3.0, 6.0]]), axis=0), np.log([2.0, 4.0]))


class CountingTrainer:
    def __init__(self, fail_at: int | None = None):
        self.calls = 0
        self.fail_at = fail_at
        self.sizes = []

    def __call__(self, data):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("simulated crash")
        self.sizes.append(len(data))
        return fit_gaussian(data)


def test_store_resumes_without_retraining(tmp_path):
    x = _data(n=30)
    store = tmp_path / "ms"
    reference = memorization_score(x, fit_gaussian, gaussian_loglik, folds=5, repeats=2, seed=4)

    crashing = CountingTrainer(fail_at=7)
    with pytest.raises(RuntimeError, match="simulated crash"):
        memorization_score(x, crashing, gaussian_loglik, folds=5, repeats=2, seed=4, store=store)
    assert len(list(store.glob("*_loglik.npy"))) == 6  # the 6 finished (repeat, fold) pairs

    resumed = CountingTrainer()
    r = memorization_score(x, resumed, gaussian_loglik, folds=5, repeats=2, seed=4, store=store)
    assert resumed.calls == 4  # only the unfinished models
    np.testing.assert_array_equal(r.score, reference.score)

    again = CountingTrainer()
    r2 = memorization_score(x, again, gaussian_loglik, folds=5, repeats=2, seed=4, store=store)
    assert again.calls == 0
    np.testing.assert_array_equal(r2.score, reference.score)

    # one file lost → exactly that model is retrained
    (store / "r0001_k0003_loglik.npy").unlink()
    one = CountingTrainer()
    memorization_score(x, one, gaussian_loglik, folds=5, repeats=2, seed=4, store=store)
    assert one.calls == 1 and one.sizes == [24]

    # more repeats later: only the new repeat's models are trained
    more = CountingTrainer()
    r3 = memorization_score(x, more, gaussian_loglik, folds=5, repeats=3, seed=4, store=store)
    assert more.calls == 5 and set(r3.n_out) == {3}

    # plain .npy files (no pickle), no temporary files left behind
    files = sorted(p.name for p in store.iterdir())
    assert not [f for f in files if "tmp" in f]
    assert "memscore.json" in files and "r0000_assignment.npy" in files
    for p in store.glob("*.npy"):
        np.load(p, allow_pickle=False)
    np.testing.assert_array_equal(np.load(store / "r0002_assignment.npy"), r3.assignment[2])


def test_store_refuses_other_settings(tmp_path):
    x = _data(n=20)
    memorization_score(x, fit_gaussian, gaussian_loglik, folds=4, seed=1, store=tmp_path)
    for kw in (dict(folds=5, seed=1), dict(folds=4, seed=2)):
        with pytest.raises(InputError, match="different settings"):
            memorization_score(x, fit_gaussian, gaussian_loglik, store=tmp_path, **kw)
    with pytest.raises(InputError, match="different settings"):
        memorization_score(x[:-1], fit_gaussian, gaussian_loglik, folds=4, seed=1, store=tmp_path)


def test_list_data_and_validation():
    x = list(_data(n=12))
    seen = []

    def train(d):
        seen.append(type(d))
        return fit_gaussian(d)

    r = memorization_score(x, train, gaussian_loglik, folds=3)
    assert set(seen) == {list} and r.score.shape == (12,)
    with pytest.raises(InputError, match="folds"):
        memorization_score(x, fit_gaussian, gaussian_loglik, folds=13)
    with pytest.raises(InputError, match="folds"):
        memorization_score(x, fit_gaussian, gaussian_loglik, folds=1)
    with pytest.raises(InputError, match="repeats"):
        memorization_score(x, fit_gaussian, gaussian_loglik, folds=3, repeats=0)
    with pytest.raises(InputError, match="shape"):
        memorization_score(x, fit_gaussian, lambda m, d: np.zeros(3), folds=3)
    with pytest.raises(InputError, match="non-finite"):
        memorization_score(x, fit_gaussian, lambda m, d: np.full(12, np.nan), folds=3)
    with pytest.raises(InputError, match="negative"):
        r.top(-1)


def test_store_refuses_a_non_finite_stored_row(tmp_path):
    """A stored row is checked like a fresh one: a NaN (e.g. a damaged file) used to flow into
    U_i, V_i and M_i silently."""
    x = _data(n=12)
    reference = memorization_score(x, fit_gaussian, gaussian_loglik, folds=3, seed=2, store=tmp_path)
    path = tmp_path / "r0000_k0001_loglik.npy"
    row = np.load(path)
    row[5] = np.nan
    np.save(path, row)
    with pytest.raises(
        InputError, match=r"r0000_k0001_loglik.npy: 1 non-finite log-likelihood\(s\), first at example 5"
    ) as exc:
        memorization_score(x, fit_gaussian, gaussian_loglik, folds=3, seed=2, store=tmp_path)
    assert "delete it" in exc.value.hint
    path.unlink()  # as the hint says: that model alone is recomputed
    again = memorization_score(x, fit_gaussian, gaussian_loglik, folds=3, seed=2, store=tmp_path)
    np.testing.assert_array_equal(again.score, reference.score)
