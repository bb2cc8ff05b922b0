"""The device's own limits, measured once per run: dense-matmul throughput and copy bandwidth.

They turn a cell's counted FLOPs and latency into "how close to the hardware": achieved TFLOP/s
over the measured matmul peak of the same dtype. Measured, not looked up in a spec sheet: a
throttled, shared or power-capped device is judged against what it can do now.

- ``matmul_tflops[dtype]``: median over repeated square matmuls (n = 8192 on CUDA, 1024 on CPU),
  2 n^3 FLOPs each.
- ``copy_gb_s``: median over repeated ``dst.copy_(src)`` of 1 GiB on CUDA (128 MiB on CPU), counted
  as read + write (2 x bytes) per copy.

The *sentinel* is a small fixed matmul (bfloat16 4096^3 on CUDA, float32 512^3 on CPU) timed before
and after every cell's timed calls: its speed over the speed at the start of the run says whether the device itself got
slower or faster while the sweep ran (clocks, power, a neighbour on a shared machine), a drift the
within-cell ``noisy`` flag cannot see.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import timing

from ..device import TORCH_DTYPES as DTYPES


def _median_ms(fn, device: torch.device, repeats: int) -> float:
    fn()
    timing.time_calls(fn, device, 2)
    return float(np.median(timing.time_calls(fn, device, repeats)))


DRIFT_TOLERANCE = 0.10  # a cell measured while the sentinel ran >10% off its start speed is flagged
_sentinel_inputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def sentinel_tflops(device: torch.device, repeats: int = 5) -> float:
    """TFLOP/s of the sentinel matmul now: median of ``repeats`` timed calls after one warm-up."""
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
                           "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if cuda else None}
    gen = torch.Generator(device="cpu").manual_seed(0)
    for name in dtypes:
        try:
            a = torch.randn(n, n, generator=gen).to(device=device, dtype=DTYPES[name])
            b = torch.randn(n, n, generator=gen).to(device=device, dtype=DTYPES[name])
            ms = _median_ms(lambda: torch.mm(a, b), device, repeats if cuda else 3)
            out["matmul_tflops"][name] = 2 * n ** 3 / (ms / 1e3) / 1e12
            del a, b
        except RuntimeError as exc:
            out.setdefault("errors", []).append(f"matmul {name}: {exc}")
    try:
        nbytes = (1 << 30) if cuda else (128 << 20)
        # a copy's speed does not depend on the values; arange is not zeros (which a GPU may compress)
        # and fills 128 MiB in a quarter of the time normal_() takes on a CPU
        src = torch.arange(nbytes // 4, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        ms = _median_ms(lambda: dst.copy_(src), device, repeats if cuda else 5)
        out["copy_gb_s"] = 2 * nbytes / (ms / 1e3) / 1e9
        del src, dst
    except RuntimeError as exc:
        out.setdefault("errors", []).append(f"copy: {exc}")
    if cuda:
        torch.cuda.empty_cache()
    return out
