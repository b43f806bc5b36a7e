"""ROC metrics of memscan.mia.metrics against scikit-learn and brute force."""

from __future__ import annotations

import json

import matplotlib
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from memscan.errors import InputError
from memscan.mia.metrics import (
    AttackResult,
    AttackResultsTable,
    RocResult,
    plot_roc,
    roc_metrics,
    tpr_key,
)


def _random_case(seed: int, n: int, frac: float, shift: float, decimals: int | None):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < frac
    s = rng.normal(size=n) + shift * y
    if decimals is not None:
        s = np.round(s, decimals)
    return s, y


CASES = [
    # (seed, n, member fraction, separation, rounding decimals → ties)
    (0, 200, 0.5, 1.0, None),
    (1, 3000, 0.3, 0.5, None),
    (2, 5000, 0.5, 2.0, None),
    (3, 2000, 0.5, 1.0, 1),  # heavily tied: ~60 distinct values
    (4, 4000, 0.1, 0.8, 1),
    (5, 500, 0.5, 0.3, 0),  # extremely tied: ~7 distinct values
]


def _brute_points(s, y):
    """(fpr, tpr) of 'member iff score ≥ τ' for every τ in {+inf} ∪ distinct scores ∪ {−inf}."""
    taus = np.r_[np.inf, np.unique(s), -np.inf]
    pred = s[None, :] >= taus[:, None]
    tpr = (pred & y).sum(1) / y.sum()
    fpr = (pred & ~y).sum(1) / (~y).sum()
    return fpr, tpr


@pytest.mark.parametrize("case", CASES)
def test_curve_and_auc_match_sklearn(case):
    s, y = _random_case(*case)
    r = roc_metrics(s, y)
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(r.fpr, fpr, rtol=0, atol=1e-15)
    np.testing.assert_allclose(r.tpr, tpr, rtol=0, atol=1e-15)
    assert r.thresholds[0] == np.inf
    np.testing.assert_array_equal(r.thresholds[1:], thr[1:])
    assert r.auc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    # one point per distinct score: tied scores move together
    assert r.fpr.size == np.unique(s).size + 1
    assert r.n_members == y.sum() and r.n_nonmembers == (~y).sum()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("max_fpr", [0.0, 0.001, 0.01, 0.1, 0.5, 1.0])
def test_tpr_at_fpr_matches_brute_force_and_sklearn_curve(case, max_fpr):
    s, y = _random_case(*case)
    r = roc_metrics(s, y)
    bf_fpr, bf_tpr = _brute_points(s, y)
    expected = bf_tpr[bf_fpr <= max_fpr].max()
    assert r.tpr_at_fpr(max_fpr) == expected
    sk_fpr, sk_tpr, _ = roc_curve(y, s)  # default drop_intermediate=True keeps the corners
    assert r.tpr_at_fpr(max_fpr) == pytest.approx(sk_tpr[sk_fpr <= max_fpr].max(), abs=1e-15)


@pytest.mark.parametrize("case", CASES)
def test_balanced_accuracy_matches_brute_force(case):
    s, y = _random_case(*case)
    r = roc_metrics(s, y)
    taus = np.r_[np.inf, np.unique(s), -np.inf]
    best = 0.0
    for tau in taus:  # accuracy on a balanced set = mean of per-class accuracies
        pred = s >= tau
        best = max(best, 0.5 * (pred[y].mean() + (~pred[~y]).mean()))
    assert r.balanced_accuracy == pytest.approx(best, abs=1e-12)


def test_hand_example():
    # sorted: 0.9(M) 0.8(M) 0.8(N) 0.5(N) 0.4(M) 0.1(N)
    s = [0.8, 0.1, 0.9, 0.5, 0.8, 0.4]
    y = [True, False, True, False, False, True]
    r = roc_metrics(s, y)
    third = 1 / 3
    np.testing.assert_allclose(r.fpr, [0, 0, third, 2 * third, 2 * third, 1])
    np.testing.assert_allclose(r.tpr, [0, third, 2 * third, 2 * third, 1, 1])
    # AUC: pairs (M, N) with M > N: 0.9 beats 3, 0.8 beats 2 and ties 1, 0.4 beats 1 → 6.5/9
    assert r.auc == pytest.approx(6.5 / 9)
    assert r.balanced_accuracy == pytest.approx(max(0.5 * (t + 1 - f) for f, t in zip(r.fpr, r.tpr)))
    assert r.tpr_at_fpr(0.0) == pytest.approx(third)  # 0.9 alone; 0.8 brings a non-member
    assert r.tpr_at_fpr(0.34) == pytest.approx(2 * third)
    assert r.tpr_at_fpr(2 / 3) == 1.0


def test_all_tied_scores_cannot_separate_at_low_fpr():
    # A naive per-example sweep would credit some members at FPR 0; tied scores move together.
    y = np.r_[np.ones(50, bool), np.zeros(50, bool)]
    r = roc_metrics(np.zeros(100), y)
    np.testing.assert_array_equal(r.fpr, [0, 1])
    np.testing.assert_array_equal(r.tpr, [0, 1])
    assert r.auc == 0.5 and r.balanced_accuracy == 0.5
    assert r.tpr_at_fpr(0.01) == 0.0 and r.tpr_at_fpr(0.999) == 0.0 and r.tpr_at_fpr(1.0) == 1.0


def test_tied_block_at_top_is_taken_whole():
    # 10 members and 1 non-member share the top score: TPR at FPR 1 % must be 0 (99 non-members)
    y = np.r_[np.ones(10, bool), False, np.ones(10, bool), np.zeros(98, bool)]
    s = np.r_[np.full(11, 5.0), np.linspace(4, 3, 10), np.linspace(2, 0, 98)]
    r = roc_metrics(s, y)
    assert r.tpr_at_fpr(1 / 99) == 1.0 and r.tpr_at_fpr(0.0102) == 1.0
    assert r.tpr_at_fpr(0.01) == 0.0


def test_labels_as_ints_and_perfect_attack():
    r = roc_metrics(np.arange(10.0), np.r_[np.zeros(5, int), np.ones(5, int)])
    assert r.auc == 1.0 and r.balanced_accuracy == 1.0 and r.tpr_at_fpr(0.001) == 1.0
    r = roc_metrics(-np.arange(10.0), np.r_[np.zeros(5, int), np.ones(5, int)])
    assert r.auc == 0.0 and r.tpr_at_fpr(0.5) == 0.0


def test_result_is_read_only_and_serialisable():
    s, y = _random_case(0, 300, 0.5, 1.0, 1)
    r = roc_metrics(s, y, bootstrap=50)
    with pytest.raises(ValueError):
        r.fpr[0] = 1.0
    d = json.loads(json.dumps(r.to_dict(curve=True)))
    assert set(d) >= {"auc", "balanced_accuracy", "tpr@1%fpr", "tpr@0.1%fpr", "ci", "fpr"}
    assert d["auc"] == r.auc and d["thresholds"][0] is None
    assert d["tpr@1%fpr"] == r.tpr_at_fpr(0.01)
    assert set(d["ci"]) == {"auc", "balanced_accuracy", "tpr@1%fpr", "tpr@0.1%fpr"}
    assert tpr_key(0.05) == "tpr@5%fpr"


def test_bootstrap_equals_explicit_resampling():
    s, y = _random_case(7, 400, 0.4, 0.7, 1)
    b, seed = 200, 123
    r = roc_metrics(s, y, bootstrap=b, seed=seed, fprs=(0.05,))
    # reference: resample examples explicitly (documented draw order) and use sklearn
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    aucs, tprs, bals = [], [], []
    for _ in range(b):
        idx = np.r_[pos[rng.integers(0, pos.size, pos.size)], neg[rng.integers(0, neg.size, neg.size)]]
        fpr, tpr, _ = roc_curve(y[idx], s[idx])
        aucs.append(roc_auc_score(y[idx], s[idx]))
        tprs.append(tpr[fpr <= 0.05].max())
        bals.append(np.max((tpr + 1 - fpr) / 2))
    for key, vals in (("auc", aucs), ("tpr@5%fpr", tprs), ("balanced_accuracy", bals)):
        np.testing.assert_allclose(r.ci[key], np.quantile(vals, [0.025, 0.975]), atol=1e-12)
    assert r.ci["auc"][0] < r.auc < r.ci["auc"][1]
    # deterministic in the seed, and narrower with more data
    assert roc_metrics(s, y, bootstrap=b, seed=seed, fprs=(0.05,)).ci == r.ci
    s2, y2 = _random_case(7, 4000, 0.4, 0.7, 1)
    wide = np.diff(r.ci["auc"])[0]
    assert np.diff(roc_metrics(s2, y2, bootstrap=b).ci["auc"])[0] < wide / 2


@pytest.mark.parametrize(
    "scores, labels, kwargs, match",
    [
        ([0.1, 0.2, 0.3], [True, False], {}, "length 2 differs"),
        ([0.1, np.nan, 0.3], [True, False, True], {}, "NaN"),
        ([0.1, np.inf, 0.3], [True, False, True], {}, "infinite"),
        ([0.1, 0.2, 0.3], [True, True, True], {}, "only one class"),
        ([0.1, 0.2, 0.3], [0, 0, 0], {}, "only one class"),
        ([[0.1, 0.2]], [[True, False]], {}, "1-D"),
        ([], [], {}, "empty"),
        ([0.1, 0.2], [0, 2], {}, "0/1"),
        ([0.1, 0.2], ["a", "b"], {}, "not boolean"),
        ([0.1, 0.2], [0, 1], {"fprs": (0.0,)}, "not in"),
        ([0.1, 0.2], [0, 1], {"bootstrap": -1}, "bootstrap"),
    ],
)
def test_validation_errors(scores, labels, kwargs, match):
    with pytest.raises(InputError, match=match) as exc:
        roc_metrics(scores, labels, **kwargs)
    assert exc.value.hint or exc.value.message


def test_plot_roc_writes_png_without_touching_backend(tmp_path):
    backend = matplotlib.get_backend()
    s, y = _random_case(2, 3000, 0.5, 2.0, None)
    results = {
        "strong": roc_metrics(s, y),
        "weak": roc_metrics(s + 3 * np.random.default_rng(0).normal(size=s.size), y),
    }
    out = plot_roc(results, tmp_path / "sub" / "roc.png", title="test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.get_backend() == backend
    with pytest.raises(InputError):
        plot_roc({}, tmp_path / "x.png")


def test_results_table():
    s, y = _random_case(1, 3000, 0.3, 0.5, None)
    r1 = AttackResult("loss", s, roc_metrics(s, y), timestep=100)
    r2 = AttackResult("lira_online", 2 * s, roc_metrics(s**3, y, bootstrap=20), timestep=None)
    table = AttackResultsTable([r1, r2])
    assert len(table) == 2 and table[0] is r1
    df = table.to_dataframe()
    assert list(df.columns) == [
        "attack",
        "timestep",
        "auc",
        "balanced_accuracy",
        "tpr@1%fpr",
        "tpr@0.1%fpr",
    ]
    assert df["attack"].tolist() == ["loss", "lira_online"]
    assert df["timestep"].iloc[0] == 100 and df["timestep"].isna().iloc[1]
    assert df["auc"].tolist() == [r1.roc.auc, r2.roc.auc]
    assert df["tpr@0.1%fpr"].tolist() == [r1.roc.tpr_at_fpr(0.001), r2.roc.tpr_at_fpr(0.001)]
    dfc = table.to_dataframe(ci=True)
    assert np.isnan(dfc["auc_lo"].iloc[0]) and dfc["auc_lo"].iloc[1] == r2.roc.ci["auc"][0]
    with pytest.raises(InputError, match="no metrics"):
        AttackResultsTable([AttackResult("loss", s)])
    assert isinstance(r1.roc, RocResult)
    assert json.loads(json.dumps(r1.to_dict()))["metrics"]["auc"] == r1.roc.auc
