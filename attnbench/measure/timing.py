"""Latency of repeated calls, and the statistics reported from the raw samples.

GPU: one pair of CUDA events around each call, the device synchronised once after the batch of
calls (no host sync inside the timed region). CPU: ``time.perf_counter_ns`` around each call (CPU
kernels are synchronous).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

NOISY_IQR_OVER_MEDIAN = 0.10  # a cell whose IQR exceeds 10% of its median is flagged noisy


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, n: int) -> list[float]:
    """Call ``fn`` ``n`` times; return each call's latency in milliseconds."""
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        synchronize(device)
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        synchronize(device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t0) / 1e6)
    return samples


def summarize(samples_ms: list[float]) -> dict[str, float | int | bool]:
    """Median, IQR (p75 - p25), min, p10, p90, count and the noisy flag of latency samples (ms)."""
    a = np.asarray(samples_ms, dtype=float)
    p10, p25, p50, p75, p90 = np.percentile(a, [10, 25, 50, 75, 90])
    iqr = float(p75 - p25)
    return {
        "latency_ms_median": float(p50),
        "latency_ms_iqr": iqr,
        "latency_ms_min": float(a.min()),
        "latency_ms_p10": float(p10),
        "latency_ms_p90": float(p90),
        "latency_n": int(a.size),
        "noisy": bool(p50 > 0 and iqr / p50 > NOISY_IQR_OVER_MEDIAN),
    }
