"""Memorization score (van den Burg & Williams 2021) against closed forms, and resumability."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from scipy.stats import norm

from memscan.errors import InputError
from memscan.mia.memscore import data_sha256, fold_assignment, logmeanexp, memorization_score


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


def test_store_refuses_other_data_of_the_same_size(tmp_path):
    """The store records the data's content digest: log-likelihoods of one data set were reused
    for another of the same size (n, folds and seed alone were checked)."""
    x = _data(n=12)
    memorization_score(x, fit_gaussian, gaussian_loglik, folds=3, seed=2, store=tmp_path)
    meta = json.loads((tmp_path / "memscore.json").read_text())
    assert meta["data_sha256"] == data_sha256(x) and len(meta["data_sha256"]) == 64
    with pytest.raises(InputError, match="made for other data of the same size") as exc:
        memorization_score(x * 10, fit_gaussian, gaussian_loglik, folds=3, seed=2, store=tmp_path)
    assert "data_sha256" in exc.value.message and str(tmp_path) in exc.value.message
    assert "new store directory" in exc.value.hint
    # the same values as a list are the same data (same dtype, shape and bytes)
    memorization_score(list(x), fit_gaussian, gaussian_loglik, folds=3, seed=2, store=tmp_path)
    # a store made before the digest was recorded cannot be checked: refused, saying why
    del meta["data_sha256"]
    (tmp_path / "memscore.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="older memscan") as exc:
        memorization_score(x, fit_gaussian, gaussian_loglik, folds=3, seed=2, store=tmp_path)
    assert "data_sha256" in exc.value.message and "new store directory" in exc.value.hint


def test_data_sha256_covers_dtype_shape_and_content():
    x = np.linspace(-1, 1, 6)
    assert data_sha256(x) == data_sha256(x.copy()) == data_sha256(tuple(x))
    assert data_sha256(x[::-1].copy()) != data_sha256(x)
    assert data_sha256(x.reshape(2, 3)) != data_sha256(x)
    assert data_sha256(x.astype(np.float32)) != data_sha256(x)
    assert data_sha256(np.asfortranarray(x.reshape(2, 3))) == data_sha256(x.reshape(2, 3))  # C order
    torch = pytest.importorskip("torch")
    assert data_sha256(torch.tensor(x)) == data_sha256(x)
    # not a numeric array: no digest (the store then checks the size only)
    assert data_sha256(["a", "b"]) is None and data_sha256([[1.0], [1.0, 2.0]]) is None
    assert data_sha256(object()) is None
    # same-size PIL images convert to one uint8 array: digested, by their pixels
    from PIL import Image

    imgs = [Image.fromarray(np.full((4, 4, 3), v, np.uint8)) for v in (0, 9)]
    assert data_sha256(imgs) == data_sha256(np.stack([np.asarray(i) for i in imgs]))
    assert data_sha256(imgs) != data_sha256(imgs[::-1])


def test_memscore_run_refuses_data_whose_content_changed(tmp_path):
    """A finished ``memscan memscore`` run is resumed by rerunning it; the run identity covered
    the data's path and size only, so a rewritten file of the same size reused the old
    log-likelihoods (the outlier's score of the old data instead of that of the new)."""
    from memscan.errors import MemscanError
    from memscan.mia.memscore_run import run_memscore

    train, loglik = _train_gaussian, _loglik_gaussian  # module-level: a rerun finds them by name
    data, out = tmp_path / "d.npy", tmp_path / "run"
    np.save(data, np.r_[np.linspace(-1, 1, 9), 6.0])
    first = run_memscore(out, data, train, loglik, folds=3, progress=False)
    np.testing.assert_array_equal(first.result.score, memorization_score(np.load(data), train, loglik, folds=3).score)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data_sha256"] == data_sha256(np.load(data))

    np.save(data, np.r_[np.linspace(-1, 1, 9), -6.0] * 10)  # same path, same n, other content
    with pytest.raises(MemscanError, match="data_sha256 differs") as exc:
        run_memscore(out, data, train, loglik, folds=3, progress=False)
    assert "another --out" in exc.value.hint
    fresh = run_memscore(tmp_path / "run2", data, train, loglik, folds=3, progress=False)
    np.testing.assert_array_equal(fresh.result.score, memorization_score(np.load(data), train, loglik, folds=3).score)
    assert abs(fresh.result.score[9] - first.result.score[9]) > 1

    # a run made before the digest was recorded cannot be checked: refused, saying so
    del manifest["data_sha256"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    np.save(data, np.r_[np.linspace(-1, 1, 9), 6.0])
    with pytest.raises(MemscanError, match="records no data_sha256.*older memscan"):
        run_memscore(out, data, train, loglik, folds=3, progress=False)


def test_compare_checks_memscore_data_by_content(tmp_path):
    """``memscan compare`` compared memscore runs' data by their example ids (``0..n−1`` for an
    array) and fold setup only: runs on other data of the same size passed as comparable."""
    from memscan.compare.checks import data_mismatches

    def manifest(digest):
        m = {"folds_of": {"n": 10, "folds": 3, "seed": 0}, "counts": {"examples": 10}}
        return m if digest is None else {**m, "data_sha256": digest}

    a, b = "a" * 64, "b" * 64
    found = data_mismatches("memscore", [(str(tmp_path / "r1"), manifest(a)), (str(tmp_path / "r2"), manifest(b))])
    assert [m.key for m in found] == ["data_sha256"]
    assert not data_mismatches("memscore", [(str(tmp_path / "r1"), manifest(a)), (str(tmp_path / "r2"), manifest(a))])
    # a run made before the digest: nothing to compare it by (as for the other kinds' digests)
    assert not data_mismatches(
        "memscore", [(str(tmp_path / "r1"), manifest(a)), (str(tmp_path / "r2"), manifest(None))]
    )
    assert not data_mismatches("memscore", [(str(tmp_path / "r1"), manifest(a)), (str(tmp_path / "r2"), manifest(b))],
                               by="train_size")  # fmt: skip


def _train_gaussian(d):
    return float(d.mean()), float(d.var())


def _loglik_gaussian(model, d):
    mu, var = model
    return -0.5 * np.log(2 * np.pi * var) - 0.5 * (d - mu) ** 2 / var


def test_memscore_run_reruns_with_module_functions_and_refuses_closures(tmp_path):
    """The run identity named library callables by ``repr()``, which holds their memory address:
    rerunning a finished run with the same module-level functions from a new process was
    refused. Now they are named ``module:qualname``; a closure, a lambda or a partial cannot be
    known to be the same from its name (two closures of one factory share it whatever they
    captured), so it keeps its address and a rerun with another object is refused, never
    silently given the old run's scores."""
    import functools

    from memscan.errors import MemscanError
    from memscan.mia.memscore_run import run_memscore
    from memscan.user_code import callable_name

    data, out = tmp_path / "d.npy", tmp_path / "run"
    np.save(data, np.r_[np.linspace(-1, 1, 9), 6.0])
    first = run_memscore(out, data, _train_gaussian, _loglik_gaussian, folds=3, progress=False)
    sources = json.loads((out / "manifest.json").read_text())["sources"]
    assert sources["train_fn"] == f"{__name__}:_train_gaussian" and "0x" not in sources["log_likelihood_fn"]
    # a new process imports the same functions: the same names (simulated by new function objects
    # bound to the module's names)
    mod = sys.modules[__name__]
    old = mod._train_gaussian
    try:
        mod._train_gaussian = type(old)(old.__code__, old.__globals__, old.__name__)
        mod._train_gaussian.__qualname__ = old.__qualname__
        again = run_memscore(out, data, mod._train_gaussian, _loglik_gaussian, folds=3, progress=False)
    finally:
        mod._train_gaussian = old
    np.testing.assert_array_equal(again.result.score, first.result.score)

    def factory(scale):
        return lambda m, d: _loglik_gaussian(m, d) * scale

    closure_run = tmp_path / "closure"
    run_memscore(closure_run, data, _train_gaussian, factory(1.0), folds=3, progress=False)
    with pytest.raises(MemscanError, match="log_likelihood_fn|sources"):  # another closure: refused
        run_memscore(closure_run, data, _train_gaussian, factory(100.0), folds=3, progress=False)
    assert "0x" in callable_name(factory(1.0)) and "0x" in callable_name(functools.partial(_train_gaussian))
    assert callable_name("py:m:f") == "py:m:f" and callable_name(np.mean) == "numpy:mean"
