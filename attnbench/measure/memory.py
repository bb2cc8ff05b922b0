"""Peak memory of one call, above the memory held just before it.

CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
``memory_allocated`` before the call (method ``cuda_allocator_peak_delta``).

CPU: the process's resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) minus the resident set before the call (method ``rss_hwm_delta``).
For the measured call only, glibc's mmap threshold is lowered to 4 KiB and free heap memory is
trimmed first, so every allocation of 4 KiB or more is fresh memory that the high-water mark sees
(not a reuse of heap already resident); afterwards the thresholds go back to glibc's steady state
(32 MiB mmap, 64 MiB trim), so timed calls run with ordinary allocator behaviour. Where /proc is
not writable the value is NaN and the method says ``unavailable``.
"""

from __future__ import annotations

import ctypes
import math
from typing import Callable

import torch

CUDA_METHOD = "cuda_allocator_peak_delta"
CPU_METHOD = "rss_hwm_delta"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _mallopt(mmap_threshold: int, trim_threshold: int, trim_now: bool = False) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
        if trim_now:
            libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the measurement is then coarser, not wrong
        pass


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def cpu_method() -> str:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_bytes("VmHWM")
        return CPU_METHOD
    except OSError:
        return "unavailable"


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> tuple[float, str]:
    """Run ``fn`` once and return (peak bytes above the pre-call level, method name)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - base), CUDA_METHOD
    if cpu_method() != CPU_METHOD:
        fn()
        return math.nan, "unavailable"
    _mallopt(4096, 64 * 1024, trim_now=True)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_bytes("VmRSS")
        fn()
        peak = _status_bytes("VmHWM")
    finally:
        _mallopt(32 * 2**20, 64 * 2**20)
    return float(max(peak - base, 0)), CPU_METHOD


def available_memory_bytes(device: torch.device) -> int:
    """Memory a cell may use: free device memory on CUDA, MemAvailable on CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30
