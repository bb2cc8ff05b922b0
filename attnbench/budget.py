"""The budget rule: predicting a cell from the last measured cell of its series. No torch.

The runner uses it to mark a cell ``over_budget`` before running it; the plots use the same rule to
draw such cells where they would have landed.

- latency: the prior's median latency scaled by the FLOP ratio;
- CPU memory: the prior's peak scaled by the square of the token ratio (attention's worst case).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class Prior:
    """The last measured (``ok``) cell of a series: the basis for predicting the next one."""

    resolution: int
    tokens: int
    flops: float
    latency_ms: float
    peak_mem_bytes: float

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "Prior":
        return cls(int(row["resolution"]), int(row["tokens"]), _num(cell_flops(row)),
                   float(row["latency_ms_median"]), _num(row.get("peak_mem_bytes")))


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def cell_flops(row: Mapping[str, Any]) -> float | None:
    """The FLOP count the rule scales by: analytic, else torch's."""
    v = row.get("flops_analytic")
    if v is None or (isinstance(v, float) and math.isnan(v)):
        v = row.get("flops_torch")
    return v


def predict_latency_ms(prior_latency_ms: float, prior_flops: float, flops: float) -> float:
    """Latency of a cell with ``flops`` from a measured one (latency scaled by the FLOP ratio)."""
    return prior_latency_ms * (flops / prior_flops if prior_flops else 1.0)  # NaN FLOPs predict NaN: no verdict


def predict_memory_bytes(prior_peak_bytes: float, prior_tokens: float, tokens: float) -> float:
    """Peak memory of a cell with ``tokens`` from a measured one (scaled by tokens squared)."""
    return prior_peak_bytes * (tokens / prior_tokens) ** 2


def time_text(seconds: float, unit: str = "ms") -> str:
    """A duration for a message in ``unit`` (ms or s), without scientific notation: a time of a second
    or more is written in s (``1.6 s``, not ``1.6e+03 ms``), one under a millisecond in ms (``0.85 ms``)."""
    if seconds >= 0.9995 or (unit == "s" and seconds >= 1e-3):
        return f"{seconds:.3g} s" if seconds < 999.5 else f"{seconds:.0f} s"
    return f"{seconds * 1e3:.3g} ms"


def time_problem(prior: Prior, flops: float, calls: int, budget_s: float) -> str | None:
    """Why ``calls`` calls of the next cell would not fit ``budget_s`` (None when they would)."""
    predicted_s = predict_latency_ms(prior.latency_ms, prior.flops, flops) / 1e3
    if predicted_s * calls > budget_s:
        return (f"predicted {time_text(predicted_s, 's')} per call (resolution {prior.resolution}: "
                f"{time_text(prior.latency_ms / 1e3)}, scaled by FLOPs) x {calls} calls exceeds the cell budget "
                f"of {budget_s:g} s")
    return None


def memory_problem(prior: Prior, tokens: int, limit_bytes: float) -> str | None:
    """Why the next cell's predicted peak memory would exceed ``limit_bytes`` (None when it would not)."""
    if prior.peak_mem_bytes != prior.peak_mem_bytes:
        return None
    predicted = predict_memory_bytes(prior.peak_mem_bytes, prior.tokens, tokens)
    if predicted > limit_bytes:
        return (f"predicted peak memory {predicted / 2**30:.3g} GiB (resolution {prior.resolution} scaled by "
                f"tokens^2) exceeds the memory budget {limit_bytes / 2**30:.3g} GiB")
    return None
