"""Membership inference attacks on per-example losses: global loss threshold and LiRA.

Inputs are plain arrays in an :class:`AttackInputs` (no models here): the target model's loss on
each candidate example — for diffusion models the loss ``L_t(x)`` of DESIGN.md at one timestep —
and, for LiRA, the same loss under ``M`` shadow models together with which examples each shadow
model was trained on.

Orientation. Every attack returns **scores where higher = more likely a member**. Members have
*lower* loss, so the statistic the attacks model is ``s = −loss`` (the counterpart of the
logit-scaled confidence ``φ`` of Carlini et al. 2022, which is also higher for members).

Attacks (registry :data:`ATTACKS`, name → class):

- ``"loss"`` — :class:`LossThreshold`: ``score = −loss`` (Yeom et al. 2018); sweeping the
  threshold over the ROC curve is the global-threshold attack.
- ``"lira_online"`` — :class:`LiRAOnline`: per-example Gaussians fitted to IN and OUT shadow
  statistics, score = log-likelihood ratio (Carlini et al. 2022, §IV, Algorithm 1).
- ``"lira_offline"`` — :class:`LiRAOffline`: OUT Gaussians only, one-sided test (§IV-C).
"""

from __future__ import annotations

import inspect
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
from scipy.special import log_ndtr

from memscan.errors import InputError
from memscan.mia.metrics import (
    DEFAULT_FPRS,
    AttackResult,
    as_labels,
    as_scores,
    check_two_classes,
    roc_metrics,
)

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackInputs",
    "LiRAOffline",
    "LiRAOnline",
    "LossThreshold",
    "make_attack",
]

#: Relative tolerance of "no spread" for per-example standard deviations (LiRA without
#: ``fixed_variance``): a side's σ_i ≤ ``SIGMA_RTOL · max_m |s_mi|`` (over that example's values on
#: that side) is an error, not a Gaussian. Such a spread is zero (identical shadow checkpoints) or
#: within a few float32 roundings of the values (float32 ε ≈ 1.2e-7; losses are usually computed
#: in float32), and dividing by it would give a huge score whose sign comes from rounding. Any
#: larger spread, however small, is used as it is. σ is never floored.
SIGMA_RTOL = 1e-6

#: How a LiRA fit estimates σ: one per example, or one global value (``fixed_variance``) as the
#: pooled within-example deviation or, without a degree of freedom for it, the global deviation.
SIGMA_ESTIMATORS = ("per_example", "pooled", "global")


@dataclass(frozen=True, eq=False)
class AttackInputs:
    """Data for a membership inference attack on ``N`` target examples (arrays only).

    Attributes
    ----------
    target_loss : array_like, shape (N,)
        Loss of the target model on each example (lower = better fit).
    shadow_loss : array_like, shape (M, N), optional
        Loss of each of ``M`` shadow models on each example.
    shadow_in : array_like of bool, shape (M, N), optional
        ``shadow_in[m, i]`` is True when shadow model ``m`` was trained on example ``i`` (an
        "IN" model for ``i``). Omitted while ``shadow_loss`` is given: every shadow model is OUT
        for every example (the offline setting with disjoint shadow data).
    is_member : array_like of bool, shape (N,), optional
        Ground truth for the target model; when given, results carry ROC metrics.
    timestep : int, optional
        Diffusion timestep ``t`` at which the losses were computed; recorded in results.

    Examples
    --------
    >>> x = AttackInputs(target_loss=[0.1, 0.5], is_member=[True, False]).validate()
    >>> x.target_loss.dtype, x.is_member.tolist()
    (dtype('float64'), [True, False])
    """

    target_loss: Any
    shadow_loss: Any = None
    shadow_in: Any = None
    is_member: Any = None
    timestep: int | None = None

    @property
    def n(self) -> int:
        """Number of target examples."""
        return int(np.shape(self.target_loss)[0])

    def validate(self) -> AttackInputs:
        """Check shapes, values and types; return a normalised copy.

        The copy holds ``float64`` losses, ``bool`` masks and labels, and ``shadow_in`` filled
        with all-False when it was omitted.

        Raises
        ------
        memscan.errors.InputError
            Target or shadow losses that are not numbers; target losses not 1-D, empty, NaN or
            infinite; shadow losses not ``M×N`` or not finite; a mask without losses or of
            another shape or not boolean; labels of another length, not boolean, or of one class
            only; a timestep that is not a non-negative integer (NaN, a string, 2.5, −1).
        """
        loss = as_scores(self.target_loss, "target_loss")
        n = loss.size
        shadow = mask = labels = None
        if self.shadow_loss is not None:
            try:
                shadow = np.asarray(self.shadow_loss, dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise InputError(
                    f"shadow_loss: cannot be read as an M×{n} array of numbers ({exc})",
                    "pass one row of float losses per shadow model, one column per target example",
                ) from None
            if shadow.ndim != 2 or shadow.shape[1] != n or shadow.shape[0] == 0:
                raise InputError(
                    f"shadow_loss: expected shape (M, {n}) with M ≥ 1, got {shadow.shape}",
                    "one row per shadow model, one column per target example",
                )
            bad = ~np.isfinite(shadow)
            if bad.any():
                m, i = np.argwhere(bad)[0]
                raise InputError(
                    f"shadow_loss: {int(bad.sum())} value(s) are NaN or infinite (first at model {m}, example {i})",
                    "recompute those losses; examples are never dropped silently",
                )
        if self.shadow_in is not None:
            if shadow is None:
                raise InputError("shadow_in: given without shadow_loss", "pass both or neither")
            mask = np.asarray(self.shadow_in)
            if mask.shape != shadow.shape:
                raise InputError(
                    f"shadow_in: shape {mask.shape} differs from shadow_loss {shadow.shape}",
                    "one flag per (shadow model, example)",
                )
            if mask.dtype != np.bool_:
                if not np.issubdtype(mask.dtype, np.number) or not np.isin(mask, (0, 1)).all():
                    raise InputError(f"shadow_in: dtype {mask.dtype} is not boolean", "pass bool or 0/1")
                mask = mask.astype(bool)
        elif shadow is not None:
            mask = np.zeros(shadow.shape, dtype=bool)
        if self.is_member is not None:
            labels = as_labels(self.is_member, n)
            check_two_classes(labels)
        t = self.timestep
        if t is not None:
            if isinstance(t, np.ndarray) and t.ndim == 0:
                t = t.item()
            ok = isinstance(t, numbers.Real) and not isinstance(t, (bool, np.bool_))
            if not (ok and math.isfinite(t) and t >= 0 and int(t) == t):
                raise InputError(
                    f"timestep: {t!r} is not a non-negative integer",
                    "pass the diffusion timestep t of the losses (e.g. 100), or None",
                )
            t = int(t)
        return replace(self, target_loss=loss, shadow_loss=shadow, shadow_in=mask, is_member=labels, timestep=t)


# --------------------------------------------------------------------------------------------
# attacks
# --------------------------------------------------------------------------------------------
class Attack(ABC):
    """Base class: ``fit_score(inputs) → AttackResult``.

    Subclasses set :attr:`name`, declare what they need (``needs_in`` / ``needs_out``: minimum
    IN / OUT shadow statistics per example; 0 = shadow models not needed) and implement
    :meth:`_score` on validated inputs.
    """

    name: ClassVar[str]
    needs_in: ClassVar[int] = 0
    needs_out: ClassVar[int] = 0

    def params(self) -> dict[str, Any]:
        """The attack's options, recorded in each result."""
        return {}

    def fitted(self, x: AttackInputs) -> dict[str, Any]:
        """Choices the fit made from the data (recorded in each result beside :meth:`params`)."""
        return {}

    def fit_score(
        self,
        inputs: AttackInputs,
        *,
        fprs: Iterable[float] = DEFAULT_FPRS,
        bootstrap: int = 0,
        seed: int = 0,
    ) -> AttackResult:
        """Validate ``inputs``, fit the attack, and score every target example.

        Parameters
        ----------
        inputs : AttackInputs
        fprs, bootstrap, seed
            Passed to :func:`memscan.mia.metrics.roc_metrics` when ``inputs.is_member`` is set.

        Returns
        -------
        AttackResult
            ``scores`` (higher = member), ``roc`` when labels were given, ``params``, and
            ``extras`` with the fitted per-example statistics.
        """
        if not isinstance(inputs, AttackInputs):
            raise InputError(f"inputs: expected AttackInputs, got {type(inputs).__name__}")
        x = inputs.validate()
        self._check_shadow(x)
        scores, extras = self._score(x)
        roc = None
        if x.is_member is not None:
            roc = roc_metrics(scores, x.is_member, fprs=fprs, bootstrap=bootstrap, seed=seed)
        return AttackResult(
            attack=self.name,
            scores=scores,
            roc=roc,
            timestep=x.timestep,
            params={**self.params(), **self.fitted(x)},
            extras=extras,
        )

    def _check_shadow(self, x: AttackInputs) -> None:
        if not (self.needs_in or self.needs_out):
            return
        if x.shadow_loss is None:
            raise InputError(
                f"{self.name}: needs shadow_loss (and shadow_in) from shadow models",
                "train shadow models and compute their losses on the target examples",
            )
        for what, need, counts in (
            ("IN", self.needs_in, x.shadow_in.sum(0)),
            ("OUT", self.needs_out, (~x.shadow_in).sum(0)),
        ):
            short = np.flatnonzero(counts < need)
            if need and short.size:
                raise InputError(
                    f"{self.name}: {short.size} example(s) have fewer than {need} {what} shadow "
                    f"model(s) (first: example {short[0]} with {counts[short[0]]})",
                    self._shadow_hint(what),
                )

    def _shadow_hint(self, what: str) -> str:
        """What to do when examples lack ``what`` (IN/OUT) shadow models."""
        if getattr(self, "fixed_variance", None) is False:
            return "train more shadow models, or use fixed_variance=True (needs only 1)"
        hint = f"train more shadow models, so that every example has at least one {what} model"
        if what == "IN":
            hint += " (e.g. each on a random half of the data), or use lira_offline, which needs no IN models"
        return hint

    @abstractmethod
    def _score(self, x: AttackInputs) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Scores and extras for validated inputs."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


#: Registry of attacks: name → class. Construct with :func:`make_attack`.
ATTACKS: dict[str, type[Attack]] = {}


def _register(cls: type[Attack]) -> type[Attack]:
    ATTACKS[cls.name] = cls
    return cls


def make_attack(name: str, **options: Any) -> Attack:
    """Construct a registered attack by name.

    Parameters
    ----------
    name : str
        A key of :data:`ATTACKS`.
    **options
        The attack's options (``fixed_variance`` and ``location`` for the LiRA attacks; ``loss``
        takes none).

    Raises
    ------
    memscan.errors.InputError
        An unknown attack, an option the attack does not take, or a bad option value.

    Examples
    --------
    >>> make_attack("lira_online", fixed_variance=True)
    LiRAOnline(fixed_variance=True, location='mean')
    """
    try:
        cls = ATTACKS[name]
    except (KeyError, TypeError):
        raise InputError(f"unknown attack {name!r}", f"choose one of {', '.join(sorted(ATTACKS))}") from None
    params = inspect.signature(cls).parameters.values()
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        takes = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        unknown = sorted(set(options) - set(takes))
        if unknown:
            raise InputError(
                f"attack {name!r}: unknown option(s) {', '.join(unknown)}",
                f"{name} takes {', '.join(takes)}" if takes else f"{name} takes no options",
            )
    return cls(**options)


@_register
class LossThreshold(Attack):
    """Global loss threshold (Yeom et al. 2018, "Privacy Risk in Machine Learning", §3.2).

    ``score_i = −loss_i``: an example is called a member when its loss is below a threshold
    that is the same for every example. The ROC curve sweeps that threshold. Shadow inputs, if
    present, are validated but unused.

    Examples
    --------
    >>> r = LossThreshold().fit_score(AttackInputs([0.1, 0.9, 0.2, 0.8], is_member=[1, 0, 1, 0]))
    >>> r.scores.tolist(), r.roc.auc
    ([-0.1, -0.9, -0.2, -0.8], 1.0)
    """

    name = "loss"

    def _score(self, x: AttackInputs) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return -x.target_loss, {}


def _fit_gaussians(
    s: np.ndarray, mask: np.ndarray, *, sigma: str, location: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian fit of ``s[mask]`` per example (column): returns (mu, sigma, count).

    ``mu_i`` is the mean (or median) of column ``i``'s selected entries, ``n_i = count_i`` their
    number. ``location`` chooses ``mu`` only: every σ is a deviation around **means** (``m_i``,
    the mean of column ``i``'s entries), as in Carlini et al.'s released code
    (``research/mi_lira_2021/plot.py``: ``np.median`` for μ, ``np.std`` for σ). ``sigma`` (one of
    :data:`SIGMA_ESTIMATORS`) chooses the deviation:

    - ``"per_example"``: ``σ_i = sqrt(Σ_m∈sel(i) (s_mi − m_i)² / n_i)``, the maximum-likelihood
      (``ddof = 0``) deviation of each column, ``np.std(dat, 1)`` in that code. Never floored: a
      column with ``σ_i ≤`` :data:`SIGMA_RTOL` ``· max |s_mi|`` has no spread.
    - ``"pooled"``: one value for every column, the pooled within-example deviation
      ``σ = sqrt(Σ_i Σ_m∈sel(i) (s_mi − m_i)² / Σ_i (n_i − 1))`` — the unbiased estimate of a
      variance shared by all examples around their own means. Needs ``Σ_i (n_i − 1) ≥ 1``.
    - ``"global"``: one value, the deviation of all selected entries around their overall mean,
      ``np.std(s[mask])`` (``ddof = 0``), as the fixed-variance code of Carlini et al. (see
      :class:`LiRAOnline`). Used when no example has two values, so ``"pooled"`` is undefined.

    Raises
    ------
    _NoSpread
        When the selected entries have no spread (σ would be 0): some column's values equal among
        themselves up to :data:`SIGMA_RTOL` (per example; ``examples`` lists those columns), every
        example's values equal among themselves (pooled), or all values equal (global).
        :meth:`_LiRA._fit` turns it into a :class:`~memscan.errors.InputError`.
    """
    if sigma not in SIGMA_ESTIMATORS:
        raise ValueError(f"sigma: {sigma!r} is not one of {SIGMA_ESTIMATORS}")
    count = mask.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(mask, s, 0.0).sum(0) / count
        mu = np.nanmedian(np.where(mask, s, np.nan), axis=0) if location == "median" else mean
        sq = np.where(mask, (s - mean) ** 2, 0.0)
        if sigma == "per_example":
            sd = np.sqrt(sq.sum(0) / count)
            flat = np.flatnonzero((count >= 2) & (sd <= SIGMA_RTOL * np.where(mask, np.abs(s), 0.0).max(0)))
            if flat.size:
                raise _NoSpread("have no spread across shadow models", examples=flat)
            return mu, sd, count
    if sigma == "pooled":
        dof = _dof(mask)
        if dof < 1:
            raise ValueError("pooled σ needs an example with at least 2 values")
        # exact test for "no spread": float rounding of mu can leave residuals of ~1e-17
        spread = np.where(mask, s, -np.inf).max(0) > np.where(mask, s, np.inf).min(0)
        if not spread.any():
            raise _NoSpread("do not vary between shadow models for any example")
        value = np.sqrt(sq.sum() / dof)
    else:
        sel = s[mask]
        if sel.size == 0 or sel.max() == sel.min():
            raise _NoSpread("are all equal")
        value = float(np.std(sel))
    return mu, np.full(s.shape[1], value), count


class _NoSpread(Exception):
    """Internal: the shadow statistics of one side have no spread (σ = 0); ``examples``: the
    columns without spread (per-example σ only)."""

    def __init__(self, message: str, examples: np.ndarray | None = None):
        super().__init__(message)
        self.examples = examples


def _dof(mask: np.ndarray) -> int:
    """Degrees of freedom of a pooled within-example variance: ``Σ_i (n_i − 1)`` over examples."""
    return int(np.maximum(mask.sum(0) - 1, 0).sum())


class _LiRA(Attack):
    """Shared options of the two LiRA variants."""

    def __init__(self, *, fixed_variance: bool = False, location: str = "mean"):
        if not isinstance(fixed_variance, (bool, np.bool_)):
            # bool("false") is True: a string or a number is refused, not converted
            raise InputError(
                f"{self.name}: fixed_variance={fixed_variance!r} is not a bool",
                "pass True (one σ for all examples) or False (one per example)",
            )
        if not isinstance(location, str) or location not in ("mean", "median"):
            raise InputError(f"location: {location!r} is not 'mean' or 'median'")
        self.fixed_variance = bool(fixed_variance)
        self.location = location
        # a per-example variance needs two draws per example; a global one needs one (with a
        # single value per example it falls back to the global deviation, see _sigma_estimator)
        need = 1 if self.fixed_variance else 2
        if type(self).needs_in:
            self.needs_in = need
        self.needs_out = need

    def params(self) -> dict[str, Any]:
        return {"fixed_variance": self.fixed_variance, "location": self.location}

    def _sides(self, x: AttackInputs) -> tuple[np.ndarray, ...]:
        """The shadow masks of the fitted sides: IN and OUT (online), OUT (offline)."""
        return (x.shadow_in, ~x.shadow_in)

    def _sigma_estimator(self, x: AttackInputs) -> str:
        """``per_example``; with ``fixed_variance`` ``pooled`` when every fitted side has a degree
        of freedom, else ``global`` for all of them (both σ of a ratio of the same kind)."""
        if not self.fixed_variance:
            return "per_example"
        return "pooled" if all(_dof(m) >= 1 for m in self._sides(x)) else "global"

    def fitted(self, x: AttackInputs) -> dict[str, Any]:
        """``sigma``: the estimator of σ the data allowed (:data:`SIGMA_ESTIMATORS`)."""
        return {"sigma": self._sigma_estimator(x)}

    def _fit(self, x: AttackInputs, member_side: bool, sigma: str):
        mask = x.shadow_in if member_side else ~x.shadow_in
        try:
            return _fit_gaussians(-x.shadow_loss, mask, sigma=sigma, location=self.location)
        except _NoSpread as exc:
            side = "IN" if member_side else "OUT"
            if exc.examples is not None:
                k = exc.examples.size
                first = ", ".join(str(int(i)) for i in exc.examples[:5]) + (", …" if k > 5 else "")
                raise InputError(
                    f"{self.name}: the {side} shadow statistics of {k} example(s) (index {first}) {exc} "
                    f"(per-example σ ≤ {SIGMA_RTOL:g} × their magnitude), so σ ≈ 0 and no Gaussian "
                    "can be fitted",
                    "use a fixed variance (fixed_variance=True; in a run --attacks lira_online_fixed,"
                    "lira_offline_fixed), or shadow models trained separately (own seeds and data): "
                    "identical shadow checkpoints give identical statistics",
                ) from None
            raise InputError(
                f"{self.name} (fixed variance, {sigma} σ): the {side} shadow statistics {exc}, so σ = 0 "
                "and no Gaussian can be fitted",
                "check that the shadow models were trained separately (own seeds and data) and that "
                "their losses were computed on the right examples",
            ) from None


@_register
class LiRAOnline(_LiRA):
    """Online Likelihood Ratio Attack (Carlini et al. 2022, §IV-B, Algorithm 1).

    With the statistic ``s = −loss``, for each target example ``i`` fit ``N(μ_in,i, σ_in,i²)`` to
    ``s`` under the shadow models trained on ``i`` (IN) and ``N(μ_out,i, σ_out,i²)`` under those
    not trained on it (OUT). The score is the log-likelihood ratio of Algorithm 1, line 12
    (``Λ = p(s | N_in) / p(s | N_out)``), in logs::

        score_i = log N(s_i; μ_in,i, σ_in,i²) − log N(s_i; μ_out,i, σ_out,i²)

    A Gaussian log-density ratio is unchanged when every value is negated, so this score is the
    same whether the loss or ``−loss`` is modelled.

    Parameters
    ----------
    fixed_variance : bool
        Use one global ``σ_in`` and one global ``σ_out`` for all examples (§IV-C: better with
        few shadow models); the means stay per example. A ``bool`` (a string such as
        ``"false"`` is refused, not converted). Each σ is, with ``n_i`` the example's
        number of IN (resp. OUT) values:

        - the **pooled within-example** deviation
          ``σ² = Σ_i Σ_m (s_mi − m_i)² / Σ_i (n_i − 1)`` (``m_i``: the mean of example ``i``'s
          values, whatever ``location``), when ``Σ_i (n_i − 1) ≥ 1`` for IN and
          for OUT (some example has two values of each). It estimates the model's σ — the spread
          of one example's statistic across shadow models — without bias: dividing by
          ``Σ_i n_i`` instead would shrink σ² by ``1 − N/Σ_i n_i``, by different amounts for IN
          and OUT when their counts differ, and to 0 with one value per example;
        - otherwise (every example has exactly one IN, or exactly one OUT, value: no spread
          around an example's own mean can be measured) the **global** deviation of all IN
          (resp. OUT) values around their overall mean, ``np.std`` (``ddof = 0``), for *both*
          sides so that the ratio compares σ of one kind. This is the estimator of the authors'
          released code (``research/mi_lira_2021/plot.py`` in tensorflow/privacy, which uses it
          for fixed variance throughout: ``np.std(dat_in)`` over all examples' values). It also
          holds the spread of the per-example means, so it overstates the within-example spread.

        That code's online function uses the IN deviation for OUT too (``std_out =
        np.std(dat_in)``); here each side has its own, as in its offline function and in
        tensorflow_privacy's ``compute_score_lira``. Statistics without spread (all equal, or
        equal within every example) raise :class:`~memscan.errors.InputError`.
    location : {"mean", "median"}
        Estimator of ``μ``: the maximum-likelihood mean (default), or the median (as in the
        authors' released code). σ does not depend on it: it is always the deviation around the
        mean (``np.std`` in that code, which also takes the median for μ).

    Notes
    -----
    Each example needs at least 2 IN and 2 OUT shadow statistics (1 with ``fixed_variance``).
    Per-example ``σ`` is the ``ddof = 0`` deviation around the mean (``np.std(dat, 1)`` in the
    authors' code), never floored: an example whose IN or OUT statistics have no spread
    (``σ ≤`` :data:`SIGMA_RTOL` times their magnitude, e.g. two identical shadow checkpoints)
    raises :class:`~memscan.errors.InputError` naming how many and which examples, with the hint
    to use ``fixed_variance``. ``extras`` hold ``mu_in``, ``sigma_in``, ``n_in``, ``mu_out``,
    ``sigma_out``, ``n_out`` (all on the ``−loss`` scale).

    Examples
    --------
    Four shadow models, two examples; models 0 and 1 were trained on both examples:

    >>> shadow_loss = np.array([[1.0, 3.0], [2.0, 4.0], [5.0, 1.0], [7.0, 3.0]])
    >>> shadow_in = np.array([[1, 1], [1, 1], [0, 0], [0, 0]], dtype=bool)
    >>> x = AttackInputs(target_loss=[1.5, 2.0], shadow_loss=shadow_loss, shadow_in=shadow_in)
    >>> r = LiRAOnline().fit_score(x)
    >>> r.extras["mu_in"].tolist(), r.extras["sigma_in"].tolist()  # of s = −loss
    ([-1.5, -3.5], [0.5, 0.5])
    >>> [round(float(v), 4) for v in r.scores]
    [10.8181, -3.8069]
    """

    name = "lira_online"
    needs_in = 2
    needs_out = 2

    def _score(self, x: AttackInputs) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        s = -x.target_loss
        sigma = self._sigma_estimator(x)
        mu_in, sd_in, n_in = self._fit(x, True, sigma)
        mu_out, sd_out, n_out = self._fit(x, False, sigma)
        # log N(s; μ, σ²) = −½((s − μ)/σ)² − log σ − ½ log 2π; the constant cancels.
        ll_in = -0.5 * ((s - mu_in) / sd_in) ** 2 - np.log(sd_in)
        ll_out = -0.5 * ((s - mu_out) / sd_out) ** 2 - np.log(sd_out)
        extras = {
            "mu_in": mu_in,
            "sigma_in": sd_in,
            "n_in": n_in,
            "mu_out": mu_out,
            "sigma_out": sd_out,
            "n_out": n_out,
        }
        return ll_in - ll_out, extras


@_register
class LiRAOffline(_LiRA):
    """Offline Likelihood Ratio Attack: OUT shadow models only (Carlini et al. 2022, §IV-C).

    With ``s = −loss`` (higher = member) and ``N(μ_out,i, σ_out,i²)`` fitted to ``s`` under the
    shadow models not trained on example ``i``, the paper's one-sided test is::

        Λ_i = 1 − Pr[Z > s_i] = Φ(z_i),  z_i = (s_i − μ_out,i) / σ_out,i,  Z ~ N(μ_out,i, σ_out,i²)

    In terms of the loss ``ℓ`` (members have *lower* loss), ``z_i = (μ_out,i(ℓ) − ℓ_i) / σ_out,i``:
    a target loss far *below* the OUT losses means member.

    ``Λ`` rounds to exactly 1.0 for ``z ≳ 8.3``, which would tie the most confident examples —
    exactly the ones that decide TPR at low FPR. The returned score is therefore the strictly
    increasing transform ::

        score_i = −log Pr[Z ≥ s_i] = −log Φ(−z_i)

    (the negative log p-value of "``s_i`` comes from OUT", computed with ``log_ndtr`` so it does
    not saturate). It ranks examples exactly as ``Λ`` does, so every ROC metric is the paper's.
    ``extras["lambda"]`` holds ``Λ`` itself.

    Parameters
    ----------
    fixed_variance, location
        As for :class:`LiRAOnline`, applied to the OUT fit: with ``fixed_variance`` ``σ_out`` is
        the pooled within-example deviation (``Σ_i (n_i − 1)`` degrees of freedom), or, when
        every example has a single OUT value (e.g. one reference model), the global ``np.std``
        of all OUT values. A single σ for all examples does not change the ranking
        (``z_i ∝ s_i − μ_out,i``), only ``z`` and ``Λ``.

    Notes
    -----
    Each example needs at least 2 OUT shadow statistics (1 with ``fixed_variance``); OUT
    statistics without spread are an error, as for :class:`LiRAOnline`. ``extras`` hold
    ``mu_out``, ``sigma_out``, ``n_out``, ``z`` and ``lambda``.

    Examples
    --------
    >>> x = AttackInputs(target_loss=[0.0, 2.0], shadow_loss=[[1.0, 1.0], [3.0, 3.0]])
    >>> r = LiRAOffline().fit_score(x)  # OUT losses ~ N(2, 1) for both examples
    >>> r.extras["z"].tolist(), [round(float(v), 4) for v in r.extras["lambda"]]
    ([2.0, 0.0], [0.9772, 0.5])
    >>> [round(float(v), 4) for v in r.scores]
    [3.7832, 0.6931]
    """

    name = "lira_offline"
    needs_in = 0
    needs_out = 2

    def _sides(self, x: AttackInputs) -> tuple[np.ndarray, ...]:
        return (~x.shadow_in,)

    def _score(self, x: AttackInputs) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        s = -x.target_loss
        mu_out, sd_out, n_out = self._fit(x, False, self._sigma_estimator(x))
        z = (s - mu_out) / sd_out
        extras = {
            "mu_out": mu_out,
            "sigma_out": sd_out,
            "n_out": n_out,
            "z": z,
            "lambda": np.exp(log_ndtr(z)),
        }
        return -log_ndtr(-z), extras
