"""Latency of repeated calls, and the statistics reported from the raw samples.

GPU: one pair of CUDA events around each call, recorded back to back on the stream, the device
synchronised once after the batch of calls (no host sync inside the timed region). With
``l2_flush`` a buffer larger than the L2 cache is overwritten before each call, outside its
events, so every call starts cold, as triton's ``do_bench`` does. With a CUDA graph the call is
captured once (on a side stream made on the device; the current stream is put back however the
capture ends) and each sample times one graph replay (launch overhead removed).

A call that cannot be captured raises :class:`GraphCaptureError` from :func:`capture_graph`;
:func:`graph_or_events` falls back to timing the call itself with CUDA events and says why in the
timing method (``cuda_events (graph capture failed: <reason>)``).

CPU: ``time.perf_counter_ns`` around each call (CPU kernels are synchronous).

Steady state (:func:`time_steady`): the flushed per-call times above are the GPU's work on a cold
cache; the CPU has run ahead during each flush, so launch overhead never shows. A training loop or
timm's benchmark sees blocks of back-to-back calls, nothing between them: :func:`time_steady` times
such blocks (per call: the block's time over its calls). A steady time well above the flushed one
means the CPU cannot issue the calls as fast as the GPU runs them (:func:`launch_bound`).

How many calls: :func:`plan_repeats` picks the count from a latency estimate so that the timed
calls take about ``target_s``, within [min_repeats, max_repeats] and the time left in the cell's
budget (like ``torch.utils.benchmark``'s ``blocked_autorange`` and ``do_bench``'s ``rep``); calls so
fast that ``max_repeats`` of them span less than ``min_sample_s`` get more, up to
:data:`MAX_CALLS_HARD`.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Callable

import numpy as np
import torch

NOISY_IQR_OVER_MEDIAN = 0.10  # a cell whose IQR exceeds 10% of its median is flagged noisy
L2_FLUSH_BYTES_MIN = 256 * 2**20  # at least 256 MiB (do_bench's size), or twice the L2, whichever is larger
MAX_CALLS_HARD = 10_000  # timed calls of one cell, whatever min_sample_s asks: 10 us calls -> 0.1 s of samples
STEADY_BLOCKS = 5  # samples of the steady-state time: blocks of back-to-back calls, one sample per block
LAUNCH_BOUND_TOLERANCE = 0.2  # steady time more than 20% above the flushed time: launch-bound


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_s(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, the device synchronised before and after it."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


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


def time_steady(fn: Callable[[], object], device: torch.device, n: int,
                repeats: int = STEADY_BLOCKS) -> list[float]:
    """Steady-state latency: ``repeats`` blocks of ``n`` back-to-back calls; one sample per block, the
    block's time over ``n``, in milliseconds per call.

    Nothing runs between the calls: no flush (the cache stays warm) and, on GPU, no synchronisation;
    CUDA events are recorded only at the block boundaries (``repeats + 1`` events, the device
    synchronised before the first and after the last), so a GPU starved by slow launches shows it.
    CPU: ``time.perf_counter_ns`` around each block.
    """
    if device.type == "cuda":
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(repeats + 1)]
        synchronize(device)
        marks[0].record()
        for mark in marks[1:]:
            for _ in range(n):
                fn()
            mark.record()
        synchronize(device)
        return [start.elapsed_time(end) / n for start, end in itertools.pairwise(marks)]
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter_ns() - t0) / 1e6 / n)
    return samples


def steady_calls(estimate_s: float, total_s: float, repeats: int = STEADY_BLOCKS,
                 max_calls: int = MAX_CALLS_HARD) -> int | None:
    """Calls per block of :func:`time_steady` so that its ``repeats`` blocks take about ``total_s``
    (at most ``max_calls`` calls in all); None when one call per block would not fit in ``total_s``."""
    est = max(estimate_s, 1e-9)
    if est * repeats > total_s:
        return None
    return max(1, min(int(total_s / repeats / est), max_calls // repeats))


def launch_bound(flushed_median_ms: float, steady_median_ms: float,
                 tolerance: float = LAUNCH_BOUND_TOLERANCE) -> bool:
    """True when the steady-state time per call exceeds the flushed per-call GPU time by more than
    ``tolerance`` (20%): calls issued back to back take longer than the GPU needs for them, so the
    CPU (Python, dispatch, kernel launches) sets the pace; a CUDA graph or fewer kernels would help.

    One-sided on purpose: a steady time well *below* the flushed one is the warm L2 cache of
    back-to-back calls (the flushed calls start cold), not launch overhead. NaN in -> False.
    """
    return bool(steady_median_ms > flushed_median_ms * (1 + tolerance))


class GraphCaptureError(RuntimeError):
    """``fn`` could not be captured in a CUDA graph; ``reason`` says why (the first error raised)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _root_reason(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line`` of the error that started ``exc``'s chain (a failed capture's cleanup
    raises its own error with the original one as its context)."""
    root = exc
    for _ in range(10):
        if root.__cause__ is None and root.__context__ is None:
            break
        root = root.__cause__ or root.__context__
    text = str(root).strip().splitlines()[0] if str(root).strip() else ""
    return f"{type(root).__name__}: {text}"[:limit] if text else type(root).__name__


def capture_graph(fn: Callable[[], object], device: torch.device, warmup: int = 3) -> Callable[[], None]:
    """Capture ``fn`` in a CUDA graph (after warm-up calls on a side stream); return its replay.

    Raises :class:`GraphCaptureError` (a ``RuntimeError``) for whatever goes wrong: no CUDA device,
    an operation not allowed while capturing (a host sync, ``.item()``, a CPU tensor), ...
    """
    if device.type != "cuda":
        raise GraphCaptureError("CUDA graphs need a CUDA device")
    prev = None
    try:
        prev = torch.cuda.current_stream(device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(prev)
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn()
        prev.wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):  # captured on the side stream, made on ``device``
            fn()
        synchronize(device)
    except Exception as exc:  # any failure of the capture is the caller's fallback
        raise GraphCaptureError(_root_reason(exc)) from exc
    finally:
        # torch.cuda.graph leaves its stream current when the capture fails (capture_end raises before
        # the stream is put back, and a failed capture_begin never reaches __exit__)
        if prev is not None:
            torch.cuda.set_stream(prev)
    return graph.replay


def graph_or_events(call: Callable[[], object], device: torch.device) -> tuple[Callable[[], object], str]:
    """What to time and the timing method: a CUDA graph's replay, ``"cuda_graph_replay"``; when the
    call cannot be captured, the call itself, ``"cuda_events (graph capture failed: <reason>)"``.
    On a device other than CUDA: the call, ``"perf_counter"``. Never raises :class:`GraphCaptureError`;
    the device is synchronised after a failed capture (a broken device raises there)."""
    if device.type != "cuda":
        return call, "perf_counter"
    try:
        return capture_graph(call, device), "cuda_graph_replay"
    except GraphCaptureError as exc:
        synchronize(device)
        return call, f"cuda_events (graph capture failed: {exc.reason})"


def plan_repeats(estimate_s: float, target_s: float, min_repeats: int, max_repeats: int,
                 remaining_s: float, *, min_sample_s: float = 0.0, overhead_s: float = 0.0,
                 hard_cap: int = MAX_CALLS_HARD) -> int | None:
    """Timed calls for a cell: about ``target_s`` worth, within bounds and the time left.

    ``min_sample_s``: when ``max_repeats`` calls would span less than this (or than ``target_s``, if
    smaller), make enough calls to span it, up to ``hard_cap`` (never fewer than ``max_repeats``
    allows). ``overhead_s``: wall time each call costs outside its sample (the L2 flush), counted
    against ``remaining_s`` only. The defaults (0, 0) give the plan of old. Returns None when even ``min_repeats`` calls would not fit in
    ``remaining_s``.
    """
    est = max(estimate_s, 1e-9)
    wall_s = est + max(overhead_s, 0.0)  # one call, flush included
    if wall_s * min_repeats > remaining_s:
        return None
    n = min(max(math.ceil(target_s / est), min_repeats), max_repeats)
    span_s = min(min_sample_s, target_s)
    if n * est < span_s:  # fast calls: samples spanning at least span_s
        n = max(n, min(math.ceil(span_s / est), hard_cap))
    return max(min_repeats, min(n, int(remaining_s / wall_s + 1e-9)))  # 1e-9: 0.02 / 1e-5 is 1999.99...


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
