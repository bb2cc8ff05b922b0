"""Growth exponents: cost ~ c * N^k over the large-token part of a curve, fitted, not asserted.

The fit is ordinary least squares of log(value) on log(tokens) (numpy only). Its range is the
*large-token part* of the curve: the usable points (finite, positive; for measured quantities only
cells with status ``ok``) whose token count is at or above the median token count of those points;
when that leaves fewer than :data:`MIN_POINTS`, the :data:`MIN_POINTS` largest token counts are used
instead. With fewer than :data:`MIN_POINTS` distinct token counts there is no fit (``None``).

``k``'s uncertainty is the standard error of the slope, sqrt(s^2 / Sxx), with s^2 the residual
variance on n - 2 degrees of freedom (0 when three points lie exactly on a line).

:data:`THEORY` is the one table of theoretical exponents (latency and FLOPs ~ N^k for large N).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

MIN_POINTS = 3

# Theoretical growth exponents for large N (token count); the one place they are written down.
# Patterns are matched against the registered implementation name, first match wins.
THEORY: list[tuple[str, float, str]] = [
    ("mha.*", 2.0, "global attention: N x N scores"),
    ("sra.conv", 2.0, "quadratic term divided by sr_ratio^2"),
    ("sra.linear", 1.0, "keys/values pooled to a fixed grid"),
    ("swin.*", 1.0, "attention inside fixed-size windows"),
    ("local.*", 1.0, "fixed-size neighbourhood per query"),
    ("mvit.pool", 2.0, "quadratic term divided by stride_kv^2"),
]


def theoretical_exponent(impl: str) -> float | None:
    """The theoretical large-N exponent of an implementation, or None for one not in :data:`THEORY`."""
    for pattern, k, _why in THEORY:
        if fnmatch.fnmatchcase(str(impl), pattern):
            return k
    return None


def theory_note(impl: str) -> str:
    for pattern, _k, why in THEORY:
        if fnmatch.fnmatchcase(str(impl), pattern):
            return why
    return ""


@dataclass(frozen=True)
class Fit:
    """value ~ exp(intercept) * tokens^k over tokens in [n_min, n_max] (n_points points)."""

    k: float
    stderr: float
    intercept: float
    n_points: int
    n_min: float
    n_max: float

    def predict(self, tokens: Iterable[float] | float) -> np.ndarray:
        return np.exp(self.intercept) * np.asarray(tokens, dtype=float) ** self.k

    def text(self) -> str:
        return f"k={self.k:.2f}±{self.stderr:.2f}"


def fit_range(tokens: Iterable[float], values: Iterable[float]) -> tuple[np.ndarray, np.ndarray]:
    """The (tokens, values) points a fit uses: usable points of the large-token part (see module doc)."""
    n = np.asarray(list(tokens), dtype=float)
    v = np.asarray(list(values), dtype=float)
    keep = np.isfinite(n) & np.isfinite(v) & (n > 0) & (v > 0)
    n, v = n[keep], v[keep]
    if len(n) == 0:
        return n, v
    order = np.argsort(n, kind="stable")
    n, v = n[order], v[order]
    large = n >= np.median(n)
    if len(np.unique(n[large])) < MIN_POINTS:
        distinct = np.unique(n)
        cut = distinct[-MIN_POINTS] if len(distinct) >= MIN_POINTS else distinct[0]
        large = n >= cut
    return n[large], v[large]


def fit_exponent(tokens: Iterable[float], values: Iterable[float]) -> Fit | None:
    """Fit value ~ c * tokens^k over the large-token part; None with fewer than MIN_POINTS token counts.

    Pass only the points that are measurements (status ok) for measured quantities; NaN, zero and
    negative values are ignored.
    """
    n, v = fit_range(tokens, values)
    if len(np.unique(n)) < MIN_POINTS:
        return None
    x, y = np.log(n), np.log(v)
    xm = x.mean()
    sxx = float(((x - xm) ** 2).sum())
    k = float(((x - xm) * (y - y.mean())).sum() / sxx)
    intercept = float(y.mean() - k * xm)
    resid = y - (intercept + k * x)
    dof = len(x) - 2
    s2 = float((resid ** 2).sum() / dof) if dof > 0 else math.nan
    return Fit(k=k, stderr=math.sqrt(s2 / sxx), intercept=intercept, n_points=len(x), n_min=float(n[0]),
               n_max=float(n[-1]))
