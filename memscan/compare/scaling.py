"""Memorization against an attribute: the log-linear fit of the papers' scaling figures.

``y = a + b · log10(x)`` by ordinary least squares over the runs (x: parameters, training step,
training-set size or a numeric label; y: the runs' ``memorization``). With n ≥ 3 runs the slope's
standard error is ``se(b) = sqrt(s² / Σ(u_i − ū)²)``, ``s² = RSS / (n − 2)``, ``u = log10 x``, and
its 95 % confidence interval ``b ± t_{0.975, n−2} · se(b)`` (the textbook OLS interval, e.g.
Montgomery, Peck & Vining, *Introduction to Linear Regression Analysis*, §2.3).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class LogLinearFit:
    """``y = intercept + slope · log10(x)``.

    Attributes
    ----------
    n : runs in the fit
    slope, intercept : least-squares estimates
    slope_se : standard error of the slope (NaN when n < 3)
    slope_ci : 95 % confidence interval of the slope (NaN bounds when n < 3)
    r2 : coefficient of determination
    """

    n: int
    slope: float
    intercept: float
    slope_se: float
    slope_ci: tuple[float, float]
    r2: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["slope_ci"] = list(self.slope_ci)
        return d


def log_linear_fit(x, y, level: float = 0.95) -> LogLinearFit:
    """Fit ``y = a + b · log10(x)`` (see the module); ``x`` must be > 0, n ≥ 2."""
    from scipy import stats

    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("x and y must be 1-D of the same length")
    if len(x) < 2 or (x <= 0).any() or not np.isfinite(x).all() or not np.isfinite(y).all():
        raise ValueError("need ≥ 2 runs with finite memorization and a positive attribute")
    # 1. centre u = log10 x
    u = np.log10(x)
    ub, yb = u.mean(), y.mean()
    sxx = float(((u - ub) ** 2).sum())
    if sxx == 0:
        raise ValueError("every run has the same attribute value: no slope to fit")
    # 2. least-squares slope and intercept
    b = float(((u - ub) * (y - yb)).sum() / sxx)
    a = float(yb - b * ub)
    # 3. residual variance and the slope's standard error (n − 2 degrees of freedom)
    resid = y - (a + b * u)
    rss = float((resid**2).sum())
    tss = float(((y - yb) ** 2).sum())
    n = len(x)
    if n >= 3:
        se = math.sqrt(rss / (n - 2) / sxx)
        q = float(stats.t.ppf(0.5 + level / 2, n - 2))
        ci = (b - q * se, b + q * se)
    else:
        se, ci = math.nan, (math.nan, math.nan)
    r2 = 1.0 - rss / tss if tss > 0 else math.nan
    return LogLinearFit(n, b, a, se, ci, r2)
