"""The environment record stored beside every run: software, hardware, GPU state, git commit."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import socket
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from ..device import tf32_enabled
from . import memory


def _matmul_precision() -> str:
    """torch.get_float32_matmul_precision(), or, where torch refuses it (the legacy and new TF32 APIs both
    used), the new API's ``fp32_precision`` of matmuls."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return f"fp32_precision={getattr(torch.backends.cuda.matmul, 'fp32_precision', '?')}"


def _pkg(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(repo: Path) -> dict[str, Any]:
    def run(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def nvml_state(index: int = 0, uuid: str | None = None) -> dict[str, Any]:
    """GPU name, driver, clocks (current and maximum), power (and limit), temperature, clock-event
    reasons and persistence mode from nvidia-ml-py, for the GPU torch calls ``index`` (matched by
    ``uuid`` where given).

    Returns ``{"available": False, "reason": ...}`` where NVML cannot be used (no GPU, no driver).
    """
    from .telemetry import Telemetry

    t = Telemetry(index, uuid)
    if not t.available:
        return {"available": False, "reason": t.reason}

    def text(v):
        return v.decode() if isinstance(v, bytes) else v

    snap = t.snapshot()
    power_limit = t.query("nvmlDeviceGetEnforcedPowerLimit")
    try:
        driver = text(t.nvml.nvmlSystemGetDriverVersion())
    except Exception:
        driver = None
    return {
        **snap,
        "matched_by": t.matched_by,
        "name": text(t.query("nvmlDeviceGetName")),
        "driver": driver,
        "sm_clock_max_mhz": t.query("nvmlDeviceGetMaxClockInfo", t.nvml.NVML_CLOCK_SM),
        "mem_clock_max_mhz": t.query("nvmlDeviceGetMaxClockInfo", t.nvml.NVML_CLOCK_MEM),
        "power_limit_w": power_limit / 1000 if power_limit is not None else None,
        "persistence_mode": t.query("nvmlDeviceGetPersistenceMode"),
    }


def collect_env(device: torch.device, repo: Path | None = None) -> dict[str, Any]:
    """Everything needed to interpret a run's numbers later."""
    repo = repo or Path(__file__).resolve().parents[2]
    env: dict[str, Any] = {
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {n: _pkg(n) for n in ("attnbench", "torch", "timm", "fvcore", "numpy", "pandas",
                                          "nvidia-ml-py", "triton")},
        "torch": {
            "version": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "tf32_matmul": tf32_enabled("matmul"),
            "tf32_cudnn": tf32_enabled("cudnn"),
            "float32_matmul_precision": _matmul_precision(),
            "num_threads": torch.get_num_threads(),
            "num_interop_threads": torch.get_num_interop_threads(),
        },
        "cpu": {"model": _cpu_model(), "logical_cores": os.cpu_count(),
                "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None},
        "device": str(device),
        "memory_method": memory.CUDA_METHOD if device.type == "cuda" else memory.cpu_method(),
        "git": _git(repo),
    }
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        uuid = getattr(props, "uuid", None)
        env["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                      "total_memory_bytes": props.total_memory, "multiprocessors": props.multi_processor_count,
                      "l2_cache_bytes": getattr(props, "L2_cache_size", None),
                      "uuid": str(uuid) if uuid else None, "index": idx,
                      "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
        env["nvml"] = nvml_state(idx, str(uuid) if uuid else None)
    else:
        env["gpu"] = None
        env["nvml"] = nvml_state(0) if torch.cuda.is_available() else {"available": False,
                                                                       "reason": "no CUDA device in use"}
    return env
