"""The device side of a run: which device and dtypes, the process-wide settings, failure kinds.

:func:`apply_globals` is the one place torch's process-wide state is set from a suite (CPU threads,
TF32); the in-process runner and every isolated worker call it with the same settings.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import torch

from .errors import DeviceError
from .schema import DEVICE_PATTERN, DTYPE_BYTES

TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16,
                                        "bfloat16": torch.bfloat16}
assert set(TORCH_DTYPES) == set(DTYPE_BYTES)
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "math": "MATH"}


def resolve_device(requested: str) -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cuda`` without one is a DeviceError,
    and so is anything but auto, cpu, cuda or cuda:N (the suite's own rule for its ``device`` key)."""
    if not isinstance(requested, str) or not re.match(DEVICE_PATTERN, requested):
        raise DeviceError(f"device {requested!r} is not one of auto, cpu, cuda, cuda:N")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(requested)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {requested!r} was asked for, but torch sees no CUDA device "
                              f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {requested!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    return dev


def resolve_dtypes(names: list[str], device: torch.device) -> list[str]:
    """``auto`` -> bfloat16 on CUDA, float32 on CPU; duplicates dropped, order kept."""
    out = []
    for n in names:
        n = ("bfloat16" if device.type == "cuda" else "float32") if n == "auto" else n
        if n not in out:
            out.append(n)
    return out


_dtype_problems: dict[tuple[str, str], str | None] = {}


def dtype_problem(name: str, device: torch.device) -> str | None:
    """Why ``device`` cannot run dtype ``name`` (None when it can): a tiny matmul in that dtype decides."""
    key = (name, str(device))
    if key not in _dtype_problems:
        problem = None
        if device.type == "cuda" and name == "bfloat16" and not torch.cuda.is_bf16_supported():
            problem = f"bfloat16 is not supported by {torch.cuda.get_device_name(device)}"
        else:
            try:
                a = torch.ones(4, 4, device=device, dtype=TORCH_DTYPES[name])
                (a @ a).sum().item()
            except RuntimeError as exc:
                problem = f"{name} cannot run on {device}: {str(exc).splitlines()[0]}"
        _dtype_problems[key] = problem
    return _dtype_problems[key]


def _legacy_tf32(which: str):
    """The object holding the legacy ``allow_tf32`` flag of ``which`` ("matmul": cuBLAS, "cudnn")."""
    return torch.backends.cuda.matmul if which == "matmul" else torch.backends.cudnn


def _precision_chain(which: str) -> list[Any]:
    """Where torch's new API keeps the fp32 precision of ``which``, the most specific first (a level set
    to "none" inherits from the next); cuDNN: its convolutions', then cuDNN's, then torch's."""
    if which == "matmul":
        return [torch.backends.cuda.matmul, torch.backends]
    cudnn = torch.backends.cudnn
    return [getattr(cudnn, "conv", None), cudnn, torch.backends]


def tf32_enabled(which: str) -> bool:
    """TF32 for "matmul" (cuBLAS) or "cudnn" (convolutions). The legacy ``allow_tf32`` flag; where torch
    refuses to read it (torch >= 2.9 after the new ``fp32_precision`` API was used: "mix of the legacy and
    new APIs"), the new API's precision, "tf32" meaning on."""
    try:
        return bool(_legacy_tf32(which).allow_tf32)
    except RuntimeError:
        for level in _precision_chain(which):
            precision = getattr(level, "fp32_precision", "none")
            if precision != "none":
                return precision == "tf32"
        return False


def set_tf32(which: str, enabled: bool) -> None:
    """Turn TF32 on or off for "matmul" or "cudnn" (convolutions and RNNs): the legacy flag, or, where torch
    refuses it, the new ``fp32_precision`` API ("tf32" or "ieee")."""
    try:
        _legacy_tf32(which).allow_tf32 = enabled
    except RuntimeError:
        cudnn = torch.backends.cudnn
        levels = [torch.backends.cuda.matmul] if which == "matmul" else [getattr(cudnn, "conv", None),
                                                                       getattr(cudnn, "rnn", None)]
        if not all(hasattr(level, "fp32_precision") for level in levels):
            raise
        for level in levels:
            level.fp32_precision = "tf32" if enabled else "ieee"


def apply_globals(threads: int | None, tf32: bool | None, device: torch.device) -> dict[str, Any]:
    """Set torch's process-wide state for a run: CPU threads (fixed for the run) and, on CUDA, the
    current device (``cuda:N``) and TF32 for both matmuls and cuDNN convolutions.

    Returns what is in effect afterwards, as recorded in the rows.
    """
    torch.set_num_threads(threads or torch.get_num_threads())
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device.index)  # events, streams, graphs and caches of the run go to this GPU
    if tf32 is not None and device.type == "cuda":
        set_tf32("matmul", tf32)
        set_tf32("cudnn", tf32)
    cuda = device.type == "cuda"
    return {"cpu_threads": torch.get_num_threads(),
            "tf32": tf32_enabled("matmul") if cuda else None,
            "tf32_cudnn": tf32_enabled("cudnn") if cuda else None}


def saved_globals() -> tuple[int, bool, bool]:
    """torch's process-wide state that :func:`apply_globals` changes, to put back after a run."""
    return torch.get_num_threads(), tf32_enabled("matmul"), tf32_enabled("cudnn")


def restore_globals(saved: tuple[int, bool, bool]) -> None:
    threads, tf32_matmul, tf32_cudnn = saved
    torch.set_num_threads(threads)
    set_tf32("matmul", tf32_matmul)
    set_tf32("cudnn", tf32_cudnn)


def sdpa_context(name: str):
    """Pin F.scaled_dot_product_attention to one backend (``auto``: torch chooses)."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[name]))


OOM_TEXTS = ("out of memory", "can't allocate memory",
             "ALLOC_FAILED")  # CUBLAS_STATUS_ALLOC_FAILED, CUDNN_STATUS_ALLOC_FAILED: a library's workspace


def is_oom(exc: BaseException) -> bool:
    """An out-of-memory failure, on any device (a CUDA library that could not allocate its workspace too)."""
    if isinstance(exc, (torch.OutOfMemoryError, torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc) for t in OOM_TEXTS)


def is_backend_refusal(exc: BaseException) -> bool:
    """A pinned SDPA backend that cannot take the call."""
    return "No available kernel" in str(exc) or "No viable backend" in str(exc)


def empty_cache(device: torch.device) -> None:
    """Return cached blocks to the device and reset the allocator's peak statistics (CUDA)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
