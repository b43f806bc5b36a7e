"""Memorization score of van den Burg & Williams (NeurIPS 2021), estimated by K-fold × L repeats.

"On Memorization in Probabilistic Deep Generative Models" (arXiv 2106.03216) defines, for a
training example ``x_i`` and a training algorithm ``A`` (eq. 3 and §3),

    M_i = log p(x_i | A, D) − log p(x_i | A, D \\ {x_i})

— how much more likely the model finds ``x_i`` when ``x_i`` was in its training set — with the
expectations over training randomness estimated by cross-validation (§3.1, eq. 4–5): for each of
``L`` repeats, split the data at random into ``K`` folds and train one model per fold on the
other ``K − 1`` folds. Each example is then IN ``L(K − 1)`` models and OUT of ``L`` models, and

    U_i = logmeanexp { log p_m(x_i) : models m trained WITH x_i }
    V_i = logmeanexp { log p_m(x_i) : models m trained WITHOUT x_i }
    M_i = U_i − V_i

where ``logmeanexp(a_1..a_J) = log((1/J) Σ_j exp a_j)`` (the log of the Monte Carlo mean of the
densities, computed stably). A large ``M_i`` marks an example that the model fits only because
it saw it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import logsumexp

from memscan.errors import InputError
from memscan.generators.seeds import numpy_seed
from memscan.store import replacing

__all__ = ["MemorizationResult", "data_sha256", "fold_assignment", "logmeanexp", "memorization_score"]

#: Quantiles of the score distribution reported in :attr:`MemorizationResult.quantiles`.
QUANTILES: tuple[float, ...] = (0.95, 0.999)

_META = "memscore.json"
_STORE_VERSION = 1


def logmeanexp(a: np.ndarray, axis: int | None = None) -> np.ndarray:
    """``log(mean(exp(a)))`` along ``axis``, without overflow.

    Examples
    --------
    >>> bool(np.isclose(logmeanexp(np.log([1.0, 3.0])), np.log(2.0)))  # log mean(1, 3)
    True
    >>> float(logmeanexp([1000.0, 1000.0]))  # exp(1000) would overflow
    1000.0
    """
    a = np.asarray(a, dtype=np.float64)
    n = a.size if axis is None else a.shape[axis]
    return logsumexp(a, axis=axis) - np.log(n)


def data_sha256(data: Any) -> str | None:
    """Content digest of a data set: sha256 over the dtype, the shape and the C-contiguous bytes
    of ``data`` as a numeric numpy array (``None`` when it is not one).

    Recorded as ``data_sha256`` in a ``memscan memscore`` run's manifest and in a
    :func:`memorization_score` store, so that log-likelihoods computed on one data set are never
    reused for another of the same size. Numpy arrays, lists and tuples of numbers or of
    same-size images (PIL images convert to uint8 arrays; the list is copied to digest it), and
    objects that convert to arrays (``__array__``; torch tensors, also on a GPU) are digested;
    anything else (a dataset object, strings, ragged lists, images of different sizes) gives
    ``None``: it cannot be checked.

    Examples
    --------
    >>> data_sha256(np.arange(3.0)) == data_sha256([0.0, 1.0, 2.0])
    True
    >>> data_sha256(np.arange(3.0)) == data_sha256(np.arange(3.0).astype(np.float32))  # dtype counts
    False
    >>> data_sha256(["a", "b"]) is None
    True
    """
    if hasattr(data, "detach") and hasattr(data, "cpu"):  # a torch tensor
        data = data.detach().cpu()
    if not isinstance(data, (np.ndarray, list, tuple)) and not hasattr(data, "__array__"):
        return None
    try:
        arr = np.asarray(data)
    except (TypeError, ValueError):  # ragged, or refuses conversion
        return None
    if arr.dtype.kind not in "biufc":
        return None
    arr = np.ascontiguousarray(arr)
    h = hashlib.sha256()
    h.update(f"{arr.dtype.str}\0{arr.shape}\0".encode())
    h.update(arr.data)
    return h.hexdigest()


def fold_assignment(n: int, folds: int, seed: int, repeat: int) -> np.ndarray:
    """Fold index (``0..folds-1``) of each of ``n`` examples in repeat ``repeat``.

    A uniformly random permutation, cut into ``folds`` contiguous parts of sizes differing by
    at most one. Repeat ``r`` draws from ``SeedSequence(seed, spawn_key=(r,))``, so it does not
    depend on how many repeats are run (a store can be extended with more repeats later).

    Examples
    --------
    >>> np.bincount(fold_assignment(10, 3, seed=0, repeat=0)).tolist()
    [4, 3, 3]
    """
    rng = np.random.default_rng(np.random.SeedSequence(numpy_seed(seed), spawn_key=(repeat,)))
    perm = rng.permutation(n)
    out = np.empty(n, dtype=np.int64)
    for k, part in enumerate(np.array_split(perm, folds)):
        out[part] = k
    return out


@dataclass(frozen=True, eq=False)
class MemorizationResult:
    """Per-example memorization scores ``M = U − V`` and their parts.

    Attributes
    ----------
    score : numpy.ndarray, shape (n,)
        ``M_i = U_i − V_i`` (nats).
    u : numpy.ndarray, shape (n,)
        ``U_i``, logmeanexp of ``log p(x_i)`` over the models trained with ``x_i``.
    v : numpy.ndarray, shape (n,)
        ``V_i``, logmeanexp of ``log p(x_i)`` over the models trained without ``x_i``.
    n_in, n_out : numpy.ndarray of int, shape (n,)
        Number of models behind ``U_i`` and ``V_i`` (``L(K − 1)`` and ``L``).
    log_likelihood : numpy.ndarray, shape (L·K, n)
        ``log p(x_i)`` under each model; row ``r·K + k`` is repeat ``r``, fold ``k``.
    assignment : numpy.ndarray of int, shape (L, n)
        Fold of each example in each repeat; model ``(r, k)`` was trained on
        ``assignment[r] != k``.
    quantiles : dict
        ``q → quantile of score`` for ``q`` in :data:`QUANTILES` (0.95 and 0.999; the
        summaries of van den Burg & Williams 2021, §4).
    folds, repeats, seed : int
        Settings of the estimate.
    """

    score: np.ndarray
    u: np.ndarray
    v: np.ndarray
    n_in: np.ndarray
    n_out: np.ndarray
    log_likelihood: np.ndarray
    assignment: np.ndarray
    folds: int
    repeats: int
    seed: int
    quantiles: dict[float, float] = field(default_factory=dict)

    def top(self, n: int = 10) -> np.ndarray:
        """Indices of the ``n`` highest scores, highest first (ties: lower index first).

        Examples
        --------
        >>> x = np.array([0.1, -0.2, 0.3, -0.1, 0.0, 4.0])
        >>> fit = lambda d: (d.mean(), d.var())
        >>> ll = lambda m, d: -0.5 * np.log(2 * np.pi * m[1]) - 0.5 * (d - m[0]) ** 2 / m[1]
        >>> memorization_score(x, fit, ll, folds=3).top(1).tolist()
        [5]
        """
        n = int(n)
        if n < 0:
            raise InputError(f"top: n = {n} is negative")
        order = np.argsort(-self.score, kind="stable")
        return order[:n]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (settings, quantiles, size; no per-example arrays)."""
        return {
            "n": int(self.score.size),
            "folds": self.folds,
            "repeats": self.repeats,
            "seed": self.seed,
            "quantiles": {str(q): v for q, v in self.quantiles.items()},
            "max": float(self.score.max()),
        }


def _result_from(ll, assignment, folds: int, repeats: int, seed: int) -> MemorizationResult:
    """Combine the ``(L·K, n)`` log-likelihoods and ``(L, n)`` fold assignments."""
    ll = np.asarray(ll, dtype=np.float64)
    assignment = np.asarray(assignment)
    # trained_on[r·K + k, i]: model (r, k) saw example i
    model_fold = np.tile(np.arange(folds), repeats)
    trained_on = np.repeat(assignment, folds, axis=0) != model_fold[:, None]
    n_in = trained_on.sum(0)
    n_out = (~trained_on).sum(0)
    u = logsumexp(np.where(trained_on, ll, -np.inf), axis=0) - np.log(n_in)
    v = logsumexp(np.where(trained_on, -np.inf, ll), axis=0) - np.log(n_out)
    score = u - v
    qs = np.quantile(score, QUANTILES)
    return MemorizationResult(
        score=score,
        u=u,
        v=v,
        n_in=n_in,
        n_out=n_out,
        log_likelihood=ll,
        assignment=assignment,
        folds=folds,
        repeats=repeats,
        seed=seed,
        quantiles={q: float(x) for q, x in zip(QUANTILES, qs, strict=True)},
    )


def _take(data: Any, idx: np.ndarray) -> Any:
    """The examples ``idx`` of ``data``: fancy indexing for arrays (numpy, torch, …), else a
    list."""
    if hasattr(data, "shape") and hasattr(data, "__getitem__"):
        return data[idx]
    return [data[int(i)] for i in idx]


def _save_atomic(path: Path, array: np.ndarray) -> None:
    with replacing(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)


def _load(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


class _Store:
    """Directory of finished (repeat, fold) log-likelihood vectors.

    Layout: ``memscore.json`` (n, folds, seed, and ``data_sha256``: :func:`data_sha256` of the
    data, ``None`` when it cannot be digested), ``r{r:04d}_assignment.npy`` (fold of each
    example in repeat ``r``), ``r{r:04d}_k{k:04d}_loglik.npy`` (``log p(x_i)`` under model
    ``(r, k)``). Every ``.npy`` is written to a temporary name and renamed into place, so a file
    that exists is complete; no pickle is used.
    """

    def __init__(self, root: str | os.PathLike, n: int, folds: int, seed: int, data_sha256: str | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        meta = {"version": _STORE_VERSION, "n": n, "folds": folds, "seed": seed, "data_sha256": data_sha256}
        path = self.root / _META
        if path.exists():
            old = json.loads(path.read_text())
            settings = [k for k in meta if k != "data_sha256"]
            diff = {k: (old.get(k), meta[k]) for k in settings if old.get(k) != meta[k]}
            if diff:
                raise InputError(
                    f"store {self.root}: made with different settings {diff} (stored, requested)",
                    "use a new store directory, or the settings it was made with",
                )
            if "data_sha256" not in old and data_sha256 is not None:
                raise InputError(
                    f"store {self.root}: made by an older memscan that did not record a digest of the data "
                    "(data_sha256), so its log-likelihoods cannot be checked to be of this data",
                    "use a new store directory (or delete this one) to recompute them",
                )
            if old.get("data_sha256") != data_sha256:
                stored, now = (v[:12] + "…" if v else v for v in (old.get("data_sha256"), data_sha256))
                raise InputError(
                    f"store {self.root}: made for other data of the same size (data_sha256 {stored} stored, "
                    f"{now} for this data); its log-likelihoods are not of these examples",
                    "use a new store directory for this data, or pass the data the store was made for",
                )
        else:
            with replacing(path) as tmp:
                tmp.write_text(json.dumps(meta, indent=1))

    def assignment(self, r: int, expected: np.ndarray) -> None:
        path = self.root / f"r{r:04d}_assignment.npy"
        if path.exists():
            if not np.array_equal(_load(path), expected):
                raise InputError(
                    f"store {self.root}: fold assignment of repeat {r} differs from the stored one",
                    "the seeding changed; use a new store directory",
                )
        else:
            _save_atomic(path, expected)

    def ll_path(self, r: int, k: int) -> Path:
        return self.root / f"r{r:04d}_k{k:04d}_loglik.npy"


def memorization_score(
    data: Any,
    train_fn: Callable[[Any], Any],
    log_likelihood_fn: Callable[[Any, Any], Any],
    *,
    folds: int = 10,
    repeats: int = 1,
    seed: int = 0,
    store: str | os.PathLike | None = None,
    progress: bool = False,
) -> MemorizationResult:
    """Memorization score ``M_i = U_i − V_i`` of every example (van den Burg & Williams 2021).

    For each repeat ``r`` (of ``L = repeats``), the examples are split at random into ``K =
    folds`` folds (:func:`fold_assignment`); for each fold ``k`` a model is trained on all other
    folds, and the log-likelihood of **every** example is computed under it. Then, per example
    (paper, eq. 4–5)::

        U_i = logmeanexp_{models trained with x_i} log p(x_i)      (L·(K−1) models)
        V_i = logmeanexp_{models trained without x_i} log p(x_i)   (L models)
        M_i = U_i − V_i

    Parameters
    ----------
    data : sequence or array
        The ``n`` training examples; must support ``len``. Arrays (anything with ``shape``) are
        subset by fancy indexing, other sequences into a list.
    train_fn : callable
        ``train_fn(train_data) → model``: trains a fresh model on the given subset.
    log_likelihood_fn : callable
        ``log_likelihood_fn(model, data) → array (n,)``: ``log p(x_i)`` of every example under
        ``model`` (in nats, or any fixed base; ``M`` is then in that base's units).
    folds : int
        ``K``, 2 ≤ K ≤ n. ``K = n`` is leave-one-out.
    repeats : int
        ``L`` ≥ 1 random re-partitions.
    seed : int
        Seed of the partitions. Training randomness is ``train_fn``'s own.
    store : path, optional
        Directory that makes the estimate resumable: each finished ``(repeat, fold)``
        log-likelihood vector is saved as ``.npy`` (atomically: temp name, then rename) next to
        the repeat's fold assignment, and a rerun with the same data, ``folds`` and ``seed``
        loads finished pairs instead of training them again. More repeats can be added later.
        The store records the data's content digest (:func:`data_sha256`) and refuses other
        data, even of the same size; data that does not convert to a numeric array (a dataset
        object, images of different sizes) has no digest (``None``), and then only its size is
        checked.
    progress : bool
        Show a rich progress bar over the ``L·K`` models.

    Returns
    -------
    MemorizationResult

    Raises
    ------
    memscan.errors.InputError
        Bad ``folds``/``repeats``; ``log_likelihood_fn`` output not of shape ``(n,)`` or not
        finite; a store made with other settings, for other data, or by a memscan that did not
        record the data's digest.

    Examples
    --------
    A Gaussian fitted by maximum likelihood; the planted outlier is memorized most:

    >>> x = np.r_[np.linspace(-1, 1, 9), 6.0]
    >>> train = lambda d: (d.mean(), d.var())
    >>> def loglik(model, d):
    ...     mu, var = model
    ...     return -0.5 * np.log(2 * np.pi * var) - 0.5 * (d - mu) ** 2 / var
    >>> r = memorization_score(x, train, loglik, folds=5, repeats=2, seed=0)
    >>> int(r.top(1)[0]), int(r.n_in[0]), int(r.n_out[0])
    (9, 8, 2)
    >>> bool(r.score[9] > r.quantiles[0.95] >= r.score[:9].max())
    True
    """
    try:
        n = len(data)
    except TypeError as exc:
        raise InputError("data: has no len()", "pass an array or a sequence") from exc
    if isinstance(folds, bool) or int(folds) != folds or not (2 <= folds <= n):
        raise InputError(
            f"folds: {folds!r} must be an integer with 2 ≤ folds ≤ n = {n}",
            "K = n is leave-one-out; the paper uses K = 10",
        )
    if isinstance(repeats, bool) or int(repeats) != repeats or repeats < 1:
        raise InputError(f"repeats: {repeats!r} must be a positive integer", "e.g. --repeats 2 (L in the paper)")
    folds, repeats, seed = int(folds), int(repeats), int(seed)
    st = _Store(store, n, folds, seed, data_sha256(data)) if store is not None else None

    assignments = np.stack([fold_assignment(n, folds, seed, r) for r in range(repeats)])
    ll = np.empty((repeats * folds, n))
    tasks = [(r, k) for r in range(repeats) for k in range(folds)]

    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=False)
        bar.start()
        task_id = bar.add_task("memorization score: models", total=len(tasks))
    try:
        for r, k in tasks:
            if st is not None and k == 0:
                st.assignment(r, assignments[r])
            path = st.ll_path(r, k) if st is not None else None
            if path is not None and path.exists():
                row = _load(path)
                if row.shape != (n,):
                    raise InputError(
                        f"store {path}: shape {row.shape}, expected ({n},)",
                        "delete the file to recompute it",
                    )
                bad = ~np.isfinite(row)
                if bad.any():  # as _check_ll checks a fresh row
                    raise InputError(
                        f"store {path}: {int(bad.sum())} non-finite log-likelihood(s), first at example "
                        f"{int(np.flatnonzero(bad)[0])}",
                        "the file is damaged (M_i is undefined where log p(x_i) is NaN or ±inf); delete it to "
                        "recompute it",
                    )
            else:
                train_idx = np.flatnonzero(assignments[r] != k)
                model = train_fn(_take(data, train_idx))
                row = _check_ll(log_likelihood_fn(model, data), n, r, k)
                del model
                if path is not None:
                    _save_atomic(path, row)
            ll[r * folds + k] = row
            if bar is not None:
                bar.advance(task_id)
    finally:
        if bar is not None:
            bar.stop()
    return _result_from(ll, assignments, folds, repeats, seed)


def _check_ll(values: Any, n: int, r: int, k: int) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().numpy()
    row = np.asarray(values, dtype=np.float64)
    if row.shape != (n,):
        raise InputError(
            f"log_likelihood_fn: returned shape {row.shape} for model (repeat {r}, fold {k}), expected ({n},)",
            "return log p(x_i) for every example of the full data set",
        )
    bad = ~np.isfinite(row)
    if bad.any():
        raise InputError(
            f"log_likelihood_fn: {int(bad.sum())} non-finite value(s) for model (repeat {r}, "
            f"fold {k}), first at example {int(np.flatnonzero(bad)[0])}",
            "M_i is undefined where log p(x_i) is NaN or ±inf",
        )
    return row
