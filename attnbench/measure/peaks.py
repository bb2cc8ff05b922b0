"""The device's own limits, measured once per run: dense-matmul throughput and copy bandwidth.

They turn a cell's counted FLOPs and latency into "how close to the hardware": achieved TFLOP/s
over the measured matmul peak of the same dtype. Measured, not looked up in a spec sheet: a
throttled, shared or power-capped device is judged against what it can do now.

- ``matmul_tflops[dtype]``: the best of repeated square matmuls (n = 8192 on CUDA, 1024 on CPU), 2 n^3
  FLOPs each: a peak is what the device can do, so its fastest call, not its typical one. A cell that
  achieves more than the peak makes the run measure it again (:func:`matmul_tflops`) and keep the
  larger value; ``env.json`` ends the run with the peaks it finally used.
- ``copy_gb_s``: the best of repeated ``dst.copy_(src)`` of 1 GiB on CUDA (128 MiB on CPU), counted as
  read + write (2 x bytes) per copy.

The *sentinel* is a small fixed matmul (bfloat16 4096^3 on CUDA, float32 512^3 on CPU) timed before
and after every cell's timed calls. Its reference is the fastest reading of the run so far (the best
of three at the start, then every reading), so one slow moment at the start cannot make every later
cell look fast: a cell's ``device_speed`` is its readings over that reference, at most 1, and it is
flagged ``drift`` when both readings are more than 10% below it (clocks, power, a neighbour).

Warm-up by time (:func:`_warm`): before any of these is timed, its operation runs for at least
:data:`WARMUP_S` of wall time on CUDA, synchronised: an idle H100 sits at 345 MHz and needs tens of
milliseconds of work to reach its clocks, far more than a few calls (1.4 ms of the sentinel). On CPU
a few calls, :data:`CPU_WARMUP_S` and at least two calls: the sentinel runs twice a cell, and on CPU
its time is the harness's own time.
"""

from __future__ import annotations

from time import perf_counter
from typing import Any, Callable

import numpy as np
import torch

from . import timing

from ..device import TORCH_DTYPES as DTYPES
from ..device import tf32_enabled


WARMUP_S = 0.1  # CUDA: wall time of work before a peak or the sentinel is timed (clocks ramp up)
CPU_WARMUP_S = 0.005  # CPU: a few calls (4 of the 1.2 ms sentinel on 2 cores; 0.02 s would add 35 ms a cell)
WARMUP_MIN_CALLS = 2


def warmup_s(device: torch.device) -> float:
    """The warm-up time before timing on ``device``: :data:`WARMUP_S` on CUDA, else :data:`CPU_WARMUP_S`."""
    return WARMUP_S if device.type == "cuda" else CPU_WARMUP_S


def _warm(fn: Callable[[], object], device: torch.device, seconds: float,
          min_calls: int = WARMUP_MIN_CALLS) -> int:
    """Call ``fn`` until ``seconds`` of wall time have passed and at least ``min_calls`` calls were
    made, the device synchronised after each call (the time counted is the device's work, not queued
    launches). Returns the number of calls."""
    timing.synchronize(device)
    t0_s = perf_counter()
    calls = 0
    while calls < min_calls or perf_counter() - t0_s < seconds:
        fn()
        timing.synchronize(device)
        calls += 1
    return calls


def _median_ms(fn, device: torch.device, repeats: int) -> float:
    _warm(fn, device, warmup_s(device))
    return float(np.median(timing.time_calls(fn, device, repeats)))


def _best_ms(fn, device: torch.device, repeats: int) -> float:
    _warm(fn, device, warmup_s(device))
    return float(np.min(timing.time_calls(fn, device, repeats)))


def matmul_tflops(device: torch.device, dtype: str, repeats: int | None = None) -> float:
    """The device's dense-matmul TFLOP/s in ``dtype`` now: the best of ``repeats`` square matmuls."""
    cuda = device.type == "cuda"
    n = 8192 if cuda else 1024
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=DTYPES[dtype])
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=DTYPES[dtype])
    ms = _best_ms(lambda: torch.mm(a, b), device, repeats or (10 if cuda else 5))
    return 2 * n ** 3 / (ms / 1e3) / 1e12


DRIFT_TOLERANCE = 0.10  # a cell measured while the sentinel ran >10% below its best speed is flagged
_sentinel_inputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def sentinel_reference(device: torch.device, readings: int = 3) -> float:
    """The sentinel's reference speed at the start of a run: the best of ``readings`` readings."""
    return max(sentinel_tflops(device) for _ in range(readings))


def sentinel_tflops(device: torch.device, repeats: int = 5) -> float:
    """TFLOP/s of the sentinel matmul now: median of ``repeats`` timed calls after the warm-up by time."""
    key = str(device)
    if key not in _sentinel_inputs:
        n, dtype = (4096, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
        gen = torch.Generator(device="cpu").manual_seed(1)
        _sentinel_inputs[key] = tuple(torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
                                      for _ in range(2))
    a, b = _sentinel_inputs[key]
    ms = _median_ms(lambda: torch.mm(a, b), device, repeats)
    return 2 * a.shape[0] ** 3 / (ms / 1e3) / 1e12


def measure_peaks(device: torch.device, dtypes: list[str], repeats: int = 10) -> dict[str, Any]:
    """Measure matmul TFLOP/s per dtype and copy bandwidth on ``device``; failures are recorded, not raised."""
    cuda = device.type == "cuda"
    n = 8192 if cuda else 1024
    out: dict[str, Any] = {"device": str(device), "matmul_n": n, "matmul_tflops": {}, "copy_gb_s": None,
                           "tf32_matmul": tf32_enabled("matmul") if cuda else None}
    for name in dtypes:
        try:
            out["matmul_tflops"][name] = matmul_tflops(device, name, repeats if cuda else 5)
        except RuntimeError as exc:
            out.setdefault("errors", []).append(f"matmul {name}: {exc}")
    try:
        nbytes = (1 << 30) if cuda else (128 << 20)
        # a copy's speed does not depend on the values; arange is not zeros (which a GPU may compress)
        # and fills 128 MiB in a quarter of the time normal_() takes on a CPU
        src = torch.arange(nbytes // 4, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        ms = _best_ms(lambda: dst.copy_(src), device, repeats if cuda else 5)
        out["copy_gb_s"] = 2 * nbytes / (ms / 1e3) / 1e9
        del src, dst
    except RuntimeError as exc:
        out.setdefault("errors", []).append(f"copy: {exc}")
    if cuda:
        torch.cuda.empty_cache()
    return out
