"""A latency measurement: the raw samples and how they were taken, statistics computed on demand.

In the manner of ``torch.utils.benchmark``'s ``Measurement``: the timed calls' samples (ms), the
timing method (``perf_counter``, ``cuda_events``, ``cuda_graph_replay``) and whether the L2 cache
was flushed before each call; median, IQR, quantiles and the noisy flag are computed lazily from the
samples. :meth:`Latency.columns` is the one way it becomes row columns; :meth:`Latency.from_row`
reads it back, so compare and plots use the same numbers the runner wrote. No torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Mapping, Sequence

import numpy as np

NOISY_IQR_OVER_MEDIAN = 0.10  # a cell whose IQR exceeds 10% of its median is flagged noisy


@dataclass(frozen=True)
class Latency:
    """Latencies of timed calls, ms. ``samples_ms`` is never empty."""

    samples_ms: tuple[float, ...]
    method: str = "perf_counter"
    l2_flush: bool = False

    def __post_init__(self) -> None:
        if not self.samples_ms:
            raise ValueError("a latency measurement needs at least one sample")

    @cached_property
    def _array(self) -> np.ndarray:
        return np.asarray(self.samples_ms, dtype=float)

    def quantile(self, q: float) -> float:
        """The q-quantile (0..1) of the samples, linear interpolation (numpy's default)."""
        return float(np.percentile(self._array, 100 * q))

    @cached_property
    def median(self) -> float:
        return self.quantile(0.5)

    @cached_property
    def iqr(self) -> float:
        return self.quantile(0.75) - self.quantile(0.25)

    @property
    def min(self) -> float:
        return float(self._array.min())

    @property
    def n(self) -> int:
        return int(self._array.size)

    @property
    def cv(self) -> float:
        """Coefficient of variation: standard deviation over mean of the samples (0 for one sample)."""
        mean = float(self._array.mean())
        return float(self._array.std()) / mean if mean > 0 else math.nan

    @property
    def noisy(self) -> bool:
        return bool(self.median > 0 and self.iqr / self.median > NOISY_IQR_OVER_MEDIAN)

    def columns(self) -> dict[str, Any]:
        """The row columns of this measurement (declared in :mod:`attnbench.schema`, group latency)."""
        return {
            "latency_ms_median": self.median,
            "latency_ms_iqr": self.iqr,
            "latency_ms_min": self.min,
            "latency_ms_p10": self.quantile(0.10),
            "latency_ms_p90": self.quantile(0.90),
            "latency_n": self.n,
            "noisy": self.noisy,
            "latency_cv": self.cv,
            "latency_ms_samples": list(self.samples_ms),
            "timing_method": self.method,
            "l2_flush": self.l2_flush,
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "Latency | None":
        """The measurement a row holds (its raw samples), or None when it has no finite sample."""
        finite = _finite(row.get("latency_ms_samples"))
        if not finite:
            return None
        return cls(tuple(finite), str(row.get("timing_method") or "perf_counter"), bool(row.get("l2_flush")))


def _finite(samples: Sequence[Any] | None) -> list[float]:
    out = []
    for s in samples or ():
        if isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s):
            out.append(float(s))
    return out


def median_ms(row: Mapping[str, Any]) -> float | None:
    """Median latency (ms) of a row: from its raw samples, else its recorded median, else None."""
    lat = Latency.from_row(row)
    if lat is not None:
        return lat.median
    v = row.get("latency_ms_median")
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None
