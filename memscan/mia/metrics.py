"""ROC metrics for membership inference: curve → single attack result → table.

The hierarchy follows tensorflow-privacy's ``data_structures`` (``RocCurve`` →
``SingleAttackResult`` → ``AttackResults``):

- :class:`RocResult` — the empirical ROC curve of one score vector against membership labels,
  with ROC AUC, balanced accuracy, TPR at fixed low FPRs and optional bootstrap intervals
  (:func:`roc_metrics` makes one);
- :class:`AttackResult` — one attack's per-example scores, its parameters, the timestep it was
  run at, and its :class:`RocResult` when labels were known;
- :class:`AttackResultsTable` — many results as a :class:`pandas.DataFrame`.

Convention everywhere: a **higher score means "more likely a member"**, and an example is
predicted a member at threshold ``τ`` when ``score ≥ τ``.

The metrics are those of Carlini et al. 2022, "Membership Inference Attacks From First
Principles" (IEEE S&P, arXiv 2112.03570), §III-B / Fig. 1: the full ROC curve on log-log axes,
the TPR at a low FPR (0.1 % and 1 %) as the primary number, and AUC and balanced accuracy as
secondary, average-case numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memscan.errors import InputError
from memscan.generators.seeds import numpy_seed

__all__ = [
    "AttackResult",
    "AttackResultsTable",
    "RocResult",
    "plot_roc",
    "roc_metrics",
    "tpr_key",
]

#: FPRs at which :func:`roc_metrics` reports the TPR by default (Carlini et al. 2022, Table 1).
DEFAULT_FPRS: tuple[float, ...] = (0.01, 0.001)

#: Two-sided coverage of the bootstrap percentile intervals.
CI_LEVEL = 0.95


def tpr_key(fpr: float) -> str:
    """Name of the "TPR at this FPR" metric, as used in dicts and tables.

    Examples
    --------
    >>> tpr_key(0.01), tpr_key(0.001)
    ('tpr@1%fpr', 'tpr@0.1%fpr')
    """
    return f"tpr@{float(fpr) * 100:g}%fpr"


# --------------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------------
def as_scores(scores: Any, name: str = "scores") -> np.ndarray:
    try:
        s = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name}: cannot be read as numbers ({exc})", "pass a 1-D float array") from exc
    if s.ndim != 1:
        raise InputError(f"{name}: expected a 1-D array, got shape {s.shape}", "flatten it")
    if s.size == 0:
        raise InputError(f"{name}: is empty", "pass at least one member and one non-member")
    bad = ~np.isfinite(s)
    if bad.any():
        idx = np.flatnonzero(bad)
        raise InputError(
            f"{name}: {idx.size} value(s) are NaN or infinite (first at index {idx[0]})",
            "fix the attack's statistic; memscan never drops examples silently",
        )
    return s


def as_labels(is_member: Any, n: int | None = None, name: str = "is_member") -> np.ndarray:
    y = np.asarray(is_member)
    if y.ndim != 1:
        raise InputError(f"{name}: expected a 1-D array, got shape {y.shape}", "flatten it")
    if n is not None and y.shape[0] != n:
        raise InputError(
            f"{name}: length {y.shape[0]} differs from the {n} scores",
            "pass one membership label per score, in the same order",
        )
    if y.dtype != np.bool_:
        if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
            raise InputError(f"{name}: dtype {y.dtype} is not boolean", "pass bool or 0/1 labels")
        if not np.isin(y, (0, 1)).all():
            raise InputError(f"{name}: labels must be 0/1 or bool", "pass True for members")
        y = y.astype(bool)
    return y


def check_two_classes(y: np.ndarray, name: str = "is_member") -> None:
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        present = "members" if n_pos else "non-members"
        raise InputError(
            f"{name}: only one class present ({y.size} {present})",
            "ROC metrics need both members and non-members",
        )


def _check_fprs(fprs: Iterable[float]) -> tuple[float, ...]:
    out = tuple(float(f) for f in fprs)
    for f in out:
        if not (0.0 < f <= 1.0):
            raise InputError(f"fprs: {f} is not in (0, 1]", "pass FPRs such as 0.01 and 0.001")
    return out


# --------------------------------------------------------------------------------------------
# the curve
# --------------------------------------------------------------------------------------------
def _groups(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort descending; return (order, ends) with ``ends`` the last sorted index of each run of
    equal scores. Tied scores form one group, so they cross the threshold together."""
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    ends = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
    return order, ends


def _curve_from_counts(tp: np.ndarray, fp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative positive/negative counts per group → (fpr, tpr) with the (0, 0) point first."""
    fpr = np.r_[0.0, fp / fp[-1]]
    tpr = np.r_[0.0, tp / tp[-1]]
    return fpr, tpr


def _auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    # Trapezoids: a group of tied scores that holds both classes is a diagonal segment, which
    # gives ties half credit — the Mann–Whitney U statistic, U / (n_pos · n_neg).
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2.0)


def _balanced_accuracy(fpr: np.ndarray, tpr: np.ndarray) -> float:
    return float(np.max((tpr + 1.0 - fpr) / 2.0))


def _tpr_at(fpr: np.ndarray, tpr: np.ndarray, max_fpr: float) -> float:
    # Both arrays are non-decreasing, so the largest TPR among points with FPR ≤ max_fpr is the
    # TPR of the last such point. The (0, 0) point always qualifies.
    i = int(np.searchsorted(fpr, max_fpr, side="right")) - 1
    return float(tpr[i])


def _freeze(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class RocResult:
    """Empirical ROC curve of a membership score, with its summary metrics.

    Made by :func:`roc_metrics`; see there for the definitions. The curve arrays are read-only.

    Attributes
    ----------
    fpr, tpr : numpy.ndarray
        False- and true-positive rates, non-decreasing, from ``(0, 0)`` to ``(1, 1)``. Point
        ``j`` is the classifier "member iff ``score ≥ thresholds[j]``".
    thresholds : numpy.ndarray
        Decreasing; ``thresholds[0] = +inf`` (nobody is a member), then each distinct score.
    auc : float
        Area under the curve (trapezoidal; ties count one half).
    balanced_accuracy : float
        ``max_j (tpr[j] + 1 − fpr[j]) / 2``.
    n_members, n_nonmembers : int
        Class sizes.
    fprs : tuple of float
        The FPRs whose TPR is reported by :meth:`to_dict` and bootstrapped into :attr:`ci`.
    ci : dict
        ``metric name → (lo, hi)``, the 95 % bootstrap percentile interval; empty without
        bootstrap. Names: ``"auc"``, ``"balanced_accuracy"`` and :func:`tpr_key` of each FPR.
    bootstrap : int
        Number of bootstrap replicates (0: none).
    seed : int
        Seed of the bootstrap.
    """

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    auc: float
    balanced_accuracy: float
    n_members: int
    n_nonmembers: int
    fprs: tuple[float, ...] = DEFAULT_FPRS
    ci: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    bootstrap: int = 0
    seed: int = 0

    def tpr_at_fpr(self, fpr: float) -> float:
        """Largest TPR on the empirical curve whose FPR is at most ``fpr``.

        Precisely: ``max {tpr[j] : fpr[j] ≤ fpr}`` over the points of the curve, i.e. over the
        deterministic classifiers "member iff ``score ≥ τ``" for every threshold ``τ``
        (including ``τ = +inf``, so the value is 0 when no threshold reaches the budget). No
        interpolation between points: a group of tied scores is taken whole or not at all. The
        comparison is ``≤`` (Carlini et al. 2022's released code uses ``<``; the two differ
        only when ``fpr · n_nonmembers`` is a whole number).

        This is the low-FPR metric of Carlini et al. 2022, §III-B ("TPR at 0.1 % FPR"). With
        ``n_nonmembers`` non-members the smallest non-zero FPR is ``1 / n_nonmembers``, so
        ``tpr_at_fpr(0.001)`` needs more than 1000 non-members to be anything but the TPR at
        FPR 0.

        Examples
        --------
        >>> r = roc_metrics([0.9, 0.8, 0.7, 0.6], [True, False, True, False])
        >>> r.tpr_at_fpr(0.0), r.tpr_at_fpr(0.5), r.tpr_at_fpr(1.0)
        (0.5, 1.0, 1.0)
        """
        f = float(fpr)
        if not (0.0 <= f <= 1.0) or math.isnan(f):
            raise InputError(f"fpr: {fpr} is not in [0, 1]", "pass a rate such as 0.001")
        return _tpr_at(self.fpr, self.tpr, f)

    def metrics(self) -> dict[str, float]:
        """Scalar metrics: ``auc``, ``balanced_accuracy`` and the TPR at each of :attr:`fprs`."""
        out = {"auc": self.auc, "balanced_accuracy": self.balanced_accuracy}
        for f in self.fprs:
            out[tpr_key(f)] = self.tpr_at_fpr(f)
        return out

    def to_dict(self, *, curve: bool = False) -> dict[str, Any]:
        """JSON-ready summary (plain floats, ints, lists).

        Parameters
        ----------
        curve : bool
            Also include the ``fpr``, ``tpr`` and ``thresholds`` lists (``+inf`` becomes
            ``None``).

        Examples
        --------
        >>> d = roc_metrics([3, 2, 1, 0], [1, 1, 0, 0]).to_dict()
        >>> d["auc"], d["tpr@1%fpr"], d["n_members"]
        (1.0, 1.0, 2)
        """
        d: dict[str, Any] = dict(self.metrics())
        d.update(
            n_members=self.n_members,
            n_nonmembers=self.n_nonmembers,
            fprs=list(self.fprs),
            bootstrap=self.bootstrap,
            seed=self.seed,
            ci={k: [float(lo), float(hi)] for k, (lo, hi) in self.ci.items()},
        )
        if curve:
            d["fpr"] = self.fpr.tolist()
            d["tpr"] = self.tpr.tolist()
            d["thresholds"] = [None if math.isinf(t) else float(t) for t in self.thresholds]
        return d


def roc_metrics(
    scores: Any,
    is_member: Any,
    *,
    fprs: Iterable[float] = DEFAULT_FPRS,
    bootstrap: int = 0,
    seed: int = 0,
) -> RocResult:
    """ROC curve, AUC, balanced accuracy and TPR at low FPR of a membership score.

    A higher score means "more likely a member"; the classifier at threshold ``τ`` predicts
    member iff ``score ≥ τ``. The curve has one point per distinct score (plus ``(0, 0)`` at
    ``τ = +inf``): **tied scores move together**, so a run of ties holding both classes is a
    diagonal segment. This is the curve of ``sklearn.metrics.roc_curve(...,
    drop_intermediate=False)``, computed here independently.

    Metrics (Carlini et al. 2022, "Membership Inference Attacks From First Principles", §III-B):

    - ``auc = Σ_j (fpr[j+1] − fpr[j]) · (tpr[j+1] + tpr[j]) / 2`` — equal to
      ``P(score_member > score_nonmember) + ½ P(tie)`` (Mann–Whitney);
    - ``balanced_accuracy = max_j (tpr[j] + 1 − fpr[j]) / 2`` — the best threshold's accuracy on
      a balanced set (the paper's "accuracy"; ``1 − (fpr + (1 − tpr))/2`` in its code and in
      tensorflow-privacy);
    - ``tpr_at_fpr(f) = max {tpr[j] : fpr[j] ≤ f}`` — see :meth:`RocResult.tpr_at_fpr`.

    Parameters
    ----------
    scores : array_like, shape (n,)
        Finite membership scores.
    is_member : array_like of bool or 0/1, shape (n,)
        Ground-truth membership. Both classes must be present.
    fprs : iterable of float
        FPRs in (0, 1] whose TPR is reported (by :meth:`RocResult.to_dict`) and bootstrapped.
    bootstrap : int
        Number of bootstrap replicates for 95 % percentile intervals (0: none). Resampling is
        stratified — members and non-members are each resampled with replacement at their own
        size — so every replicate has both classes and the same class sizes.
    seed : int
        Seed of the bootstrap's ``numpy.random.default_rng``.

    Returns
    -------
    RocResult

    Raises
    ------
    memscan.errors.InputError
        Lengths differ, scores are NaN/infinite or not 1-D, labels are not boolean, only one
        class is present, an FPR is outside (0, 1], or ``bootstrap`` is negative.

    Examples
    --------
    >>> r = roc_metrics([0.9, 0.8, 0.8, 0.1], [True, True, False, False])
    >>> r.fpr.tolist(), r.tpr.tolist()
    ([0.0, 0.0, 0.5, 1.0], [0.0, 0.5, 1.0, 1.0])
    >>> r.thresholds.tolist()
    [inf, 0.9, 0.8, 0.1]
    >>> r.auc, r.balanced_accuracy, r.tpr_at_fpr(0.01)
    (0.875, 0.75, 0.5)
    >>> r = roc_metrics([0.9, 0.8, 0.8, 0.1], [1, 1, 0, 0], bootstrap=200, seed=1)
    >>> lo, hi = r.ci["auc"]
    >>> bool(lo <= r.auc <= hi)
    True
    """
    s = as_scores(scores)
    y = as_labels(is_member, s.size)
    check_two_classes(y)
    fprs_t = _check_fprs(fprs)
    if int(bootstrap) != bootstrap or bootstrap < 0:
        raise InputError(f"bootstrap: {bootstrap} is not a non-negative integer", "pass e.g. 1000")
    bootstrap = int(bootstrap)

    order, ends = _groups(s)
    ys = y[order]
    tp = np.cumsum(ys)[ends].astype(np.float64)
    fp = (ends + 1) - tp
    fpr, tpr = _curve_from_counts(tp, fp)
    thresholds = np.r_[np.inf, s[order][ends]]

    ci: dict[str, tuple[float, float]] = {}
    if bootstrap:
        ci = _bootstrap_ci(y, order, ends, fprs_t, bootstrap, seed)

    return RocResult(
        fpr=_freeze(fpr),
        tpr=_freeze(tpr),
        thresholds=_freeze(thresholds),
        auc=_auc(fpr, tpr),
        balanced_accuracy=_balanced_accuracy(fpr, tpr),
        n_members=int(y.sum()),
        n_nonmembers=int((~y).sum()),
        fprs=fprs_t,
        ci=ci,
        bootstrap=bootstrap,
        seed=int(seed),
    )


def _bootstrap_ci(
    y: np.ndarray,
    order: np.ndarray,
    ends: np.ndarray,
    fprs: tuple[float, ...],
    b: int,
    seed: int,
) -> dict[str, tuple[float, float]]:
    """Stratified percentile bootstrap.

    Replicate ``r`` draws, with ``rng = numpy.random.default_rng(seed)``, first
    ``pos[rng.integers(0, n_pos, n_pos)]`` then ``neg[rng.integers(0, n_neg, n_neg)]``, where
    ``pos``/``neg`` are the indices of members/non-members in input order. The replicate is held
    as multiplicities (how often each example was drawn); its curve is the weighted curve over
    the same groups of tied scores, so the sort is done once and each replicate costs O(n).
    """
    rng = np.random.default_rng(numpy_seed(seed))
    pos = np.flatnonzero(y)
    neg = np.flatnonzero(~y)
    ys = y[order]
    names = ["auc", "balanced_accuracy", *[tpr_key(f) for f in fprs]]
    values = np.empty((b, len(names)))
    w = np.zeros(y.size)
    for r in range(b):
        w[pos] = np.bincount(rng.integers(0, pos.size, pos.size), minlength=pos.size)
        w[neg] = np.bincount(rng.integers(0, neg.size, neg.size), minlength=neg.size)
        ws = w[order]
        tp = np.cumsum(ws * ys)[ends]
        fp = np.cumsum(ws * ~ys)[ends]
        fpr, tpr = _curve_from_counts(tp, fp)
        values[r, 0] = _auc(fpr, tpr)
        values[r, 1] = _balanced_accuracy(fpr, tpr)
        for j, f in enumerate(fprs):
            values[r, 2 + j] = _tpr_at(fpr, tpr, f)
    alpha = (1.0 - CI_LEVEL) / 2.0
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha], axis=0)
    return {k: (float(lo[j]), float(hi[j])) for j, k in enumerate(names)}


# --------------------------------------------------------------------------------------------
# single result and table
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class AttackResult:
    """One attack's output on one set of target examples (tensorflow-privacy's
    ``SingleAttackResult``).

    Attributes
    ----------
    attack : str
        Registry name of the attack (see :data:`memscan.mia.attacks.ATTACKS`).
    scores : numpy.ndarray, shape (n,)
        Per-example membership scores; higher = more likely a member.
    roc : RocResult or None
        Metrics of ``scores`` against the membership labels, when labels were given.
    timestep : int or None
        Diffusion timestep ``t`` of the loss ``L_t`` the attack used, if any.
    params : dict
        The attack's options (e.g. ``fixed_variance``), recorded so a number can be traced.
    extras : dict of numpy.ndarray
        Per-example intermediate statistics (e.g. LiRA's fitted means and standard deviations).
    """

    attack: str
    scores: np.ndarray
    roc: RocResult | None = None
    timestep: int | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    extras: Mapping[str, np.ndarray] = field(default_factory=dict)

    def to_dict(self, *, curve: bool = False) -> dict[str, Any]:
        """JSON-ready summary: attack, timestep, params, ``n`` and metrics (no per-example
        arrays; ``curve=True`` adds the ROC curve)."""
        return {
            "attack": self.attack,
            "timestep": self.timestep,
            "params": dict(self.params),
            "n": int(self.scores.size),
            "metrics": None if self.roc is None else self.roc.to_dict(curve=curve),
        }


#: Columns of :meth:`AttackResultsTable.to_dataframe`, in order.
TABLE_COLUMNS = ("attack", "timestep", "auc", "balanced_accuracy", "tpr@1%fpr", "tpr@0.1%fpr")


class AttackResultsTable(Sequence[AttackResult]):
    """Several :class:`AttackResult` s (attacks × timesteps) as one table (tensorflow-privacy's
    ``AttackResults``).

    Every result must carry a :class:`RocResult` (i.e. was scored with membership labels).

    Examples
    --------
    >>> r1 = AttackResult("loss", np.array([2.0, 1.0, 0.0]), roc_metrics([2, 1, 0], [1, 0, 0]))
    >>> r2 = AttackResult("loss", np.array([0.0, 1.0, 2.0]), roc_metrics([0, 1, 2], [1, 0, 0]),
    ...                   timestep=100)
    >>> df = AttackResultsTable([r1, r2]).to_dataframe()
    >>> list(df.columns)
    ['attack', 'timestep', 'auc', 'balanced_accuracy', 'tpr@1%fpr', 'tpr@0.1%fpr']
    >>> df["auc"].tolist()
    [1.0, 0.0]
    """

    def __init__(self, results: Iterable[AttackResult]):
        self._results = list(results)
        for i, r in enumerate(self._results):
            if not isinstance(r, AttackResult):
                raise InputError(f"results[{i}]: expected an AttackResult, got {type(r).__name__}")
            if r.roc is None:
                raise InputError(
                    f"results[{i}] ({r.attack}): has no metrics",
                    "score it with membership labels (AttackInputs.is_member)",
                )

    def __getitem__(self, i):  # type: ignore[override]
        return self._results[i]

    def __len__(self) -> int:
        return len(self._results)

    def __iter__(self) -> Iterator[AttackResult]:
        return iter(self._results)

    def to_dataframe(self, *, ci: bool = False):
        """One row per result with columns :data:`TABLE_COLUMNS`.

        Parameters
        ----------
        ci : bool
            Also add ``<metric>_lo`` / ``<metric>_hi`` columns from the bootstrap intervals
            (NaN where a result was not bootstrapped or lacks that metric).
        """
        import pandas as pd

        rows = []
        for r in self._results:
            roc = r.roc
            assert roc is not None
            row: dict[str, Any] = {
                "attack": r.attack,
                "timestep": r.timestep,
                "auc": roc.auc,
                "balanced_accuracy": roc.balanced_accuracy,
                "tpr@1%fpr": roc.tpr_at_fpr(0.01),
                "tpr@0.1%fpr": roc.tpr_at_fpr(0.001),
            }
            if ci:
                for k in TABLE_COLUMNS[2:]:
                    lo, hi = roc.ci.get(k, (math.nan, math.nan))
                    row[f"{k}_lo"], row[f"{k}_hi"] = lo, hi
            rows.append(row)
        cols = list(TABLE_COLUMNS)
        if ci:
            cols += [f"{k}_{e}" for k in TABLE_COLUMNS[2:] for e in ("lo", "hi")]
        df = pd.DataFrame(rows, columns=cols)
        df["timestep"] = df["timestep"].astype("Int64")
        return df


# --------------------------------------------------------------------------------------------
# plot
# --------------------------------------------------------------------------------------------
def plot_roc(
    results: Mapping[str, RocResult],
    path: str | Path,
    *,
    title: str | None = None,
    dpi: int = 150,
) -> Path:
    """Log-log ROC plot of several curves, with the chance diagonal (Carlini et al. 2022, Fig. 1).

    Log axes make the low-FPR regime, where membership inference matters, visible. Points at
    FPR = 0 or TPR = 0 cannot be drawn on log axes; the axes start at ``1 / (2 · n)`` for the
    largest class size ``n`` among the curves, so the first non-zero points show.

    Drawn with matplotlib's Agg canvas directly (no pyplot, no change to the global backend).

    Parameters
    ----------
    results : mapping of str to RocResult
        Legend label → curve. The legend also shows each curve's AUC and TPR at 0.1 % FPR.
    path : str or Path
        Output image; the format follows the suffix (``.png``, ``.pdf``, ``.svg``).
    title : str, optional
    dpi : int

    Returns
    -------
    pathlib.Path
        ``path``.

    Examples
    --------
    >>> import tempfile, os
    >>> r = roc_metrics([0.9, 0.2, 0.8, 0.1], [1, 0, 1, 0])
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = plot_roc({"loss": r}, os.path.join(d, "roc.png"))
    ...     p.stat().st_size > 0
    True
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not results:
        raise InputError("results: no curves to plot", "pass {label: RocResult}")
    for label, r in results.items():
        if not isinstance(r, RocResult):
            raise InputError(f"results[{label!r}]: expected a RocResult, got {type(r).__name__}")
    path = Path(path)
    n = max(max(r.n_members, r.n_nonmembers) for r in results.values())
    lo = 1.0 / (2.0 * n)

    fig = Figure(figsize=(5, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([lo, 1], [lo, 1], ls="--", color="gray", lw=1, label="chance")
    for label, r in results.items():
        ax.plot(
            r.fpr,
            r.tpr,
            lw=1.5,
            label=f"{label} (AUC {r.auc:.3f}, TPR@0.1% {r.tpr_at_fpr(0.001):.3f})",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, 1)
    ax.set_ylim(lo, 1)
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    if title:
        ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
