"""Latency of repeated calls, and the statistics reported from the raw samples.

GPU: one pair of CUDA events around each call, recorded back to back on the stream, the device
synchronised once after the batch of calls (no host sync inside the timed region). With
``l2_flush`` a buffer larger than the L2 cache is overwritten before each call, outside its
events, so every call starts cold, as triton's ``do_bench`` does. With a CUDA graph the call is
captured once and each sample times one graph replay (launch overhead removed).

CPU: ``time.perf_counter_ns`` around each call (CPU kernels are synchronous).

How many calls: :func:`plan_repeats` picks the count from a latency estimate so that the timed
calls take about ``target_s``, within [min_repeats, max_repeats] and the time left in the cell's
budget (like ``torch.utils.benchmark``'s ``blocked_autorange`` and ``do_bench``'s ``rep``).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch

NOISY_IQR_OVER_MEDIAN = 0.10  # a cell whose IQR exceeds 10% of its median is flagged noisy
L2_FLUSH_BYTES_MIN = 256 * 2**20  # at least 256 MiB (do_bench's size), or twice the L2, whichever is larger


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def l2_flusher(device: torch.device) -> Callable[[], None] | None:
    """A function that evicts the GPU's L2 cache by writing a buffer twice its size (None on CPU)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    l2 = int(getattr(props, "L2_cache_size", 0) or getattr(props, "l2_cache_size", 0) or 0)
    buf = torch.empty(max(L2_FLUSH_BYTES_MIN, 2 * l2) // 4, dtype=torch.int32, device=device)
    return buf.zero_


def time_calls(fn: Callable[[], object], device: torch.device, n: int,
               flush: Callable[[], object] | None = None) -> list[float]:
    """Call ``fn`` ``n`` times; return each call's latency in milliseconds.

    ``flush`` (GPU) runs before each call, outside the timed events.
    """
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        synchronize(device)
        for s, e in zip(starts, ends):
            if flush is not None:
                flush()
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


def capture_graph(fn: Callable[[], object], device: torch.device, warmup: int = 3) -> Callable[[], None]:
    """Capture ``fn`` in a CUDA graph (after warm-up calls on a side stream); return its replay."""
    if device.type != "cuda":
        raise RuntimeError("CUDA graphs need a CUDA device")
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    synchronize(device)
    return graph.replay


def plan_repeats(estimate_s: float, target_s: float, min_repeats: int, max_repeats: int,
                 remaining_s: float) -> int | None:
    """Timed calls for a cell: about ``target_s`` worth, within bounds and the time left.

    Returns None when even ``min_repeats`` calls would not fit in ``remaining_s``.
    """
    est = max(estimate_s, 1e-9)
    if est * min_repeats > remaining_s:
        return None
    n = min(max(math.ceil(target_s / est), min_repeats), max_repeats)
    return max(min_repeats, min(n, int(remaining_s / est)))


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
