"""What a worker process (a ``gpus`` worker or a Ray worker) does with a job: measure it with this
process's own :class:`attnbench.context.CellContext`, made once per device (its matmul and copy
peaks, its sentinel reference), and describe where it ran.

A worker's environment (:func:`attnbench.measure.env.collect_env` of its device: host, GPU, driver,
torch, clocks) is reported with every row; the driver lists each worker once in ``env.json``.
"""

from __future__ import annotations

import gc
import os
import socket
from typing import Any

_STATE: dict[str, Any] = {"plugins": set(), "contexts": {}}


def worker_id(host: str, gpu_uuid: str | None, pid: int) -> str:
    """A worker's key in ``env.json``: its host and GPU (CPU workers: host and process)."""
    return f"{host}/{gpu_uuid}" if gpu_uuid else f"{host}/cpu/pid{pid}"


def where_columns(worker_env: dict[str, Any]) -> dict[str, Any]:
    """The row columns that say where a cell ran, from its worker's environment."""
    gpu = worker_env.get("gpu") or {}
    nvml = worker_env.get("nvml") or {}
    return {"worker": worker_env.get("worker"), "worker_host": worker_env.get("hostname"),
            "worker_gpu_uuid": gpu.get("uuid"), "worker_gpu_name": gpu.get("name"),
            "worker_driver": nvml.get("driver"), "worker_torch": (worker_env.get("torch") or {}).get("version"),
            "worker_sm_clock_max_mhz": nvml.get("sm_clock_max_mhz")}


def _context(job: Any, measure_peaks: bool, known: dict[str, Any]):
    import torch

    from ..context import CellContext
    from ..measure import peaks as peaks_mod
    from ..measure.env import collect_env

    device = torch.device(job.case.device)
    uuid = None
    if device.type == "cuda":
        uuid = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "uuid", None)
        uuid = str(uuid) if uuid else None
    host = socket.gethostname()
    key = worker_id(host, uuid, os.getpid())
    if key not in _STATE["contexts"]:
        env = collect_env(device)
        env.update(worker=key, pid=os.getpid(), cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
        mine = known.get(key) or {}  # measured by an earlier process on this GPU: not measured again
        peaks = mine.get("peaks") or (peaks_mod.measure_peaks(device, [job.case.dtype]) if measure_peaks else None)
        ctx = CellContext.create(job.settings, device, peaks, mine.get("sentinel_tflops_start"))
        env.update(peaks=peaks, sentinel_tflops_start=ctx.sentinel_start)
        _STATE["contexts"][key] = (ctx, env)
    ctx, env = _STATE["contexts"][key]
    dtype = job.case.dtype
    if ctx.peaks is not None and ctx.peak_tflops(dtype) is None:  # a dtype this worker has not seen yet
        ctx.peaks.setdefault("matmul_tflops", {})[dtype] = peaks_mod.matmul_tflops(device, dtype)
    return ctx, env


def measure(job: Any, measure_peaks: bool = True, known: dict[str, Any] | None = None,
            on_start: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Measure ``job`` in this process; return its row (with the where-columns) and this worker's environment.
    ``on_start`` is called when the cell itself starts (after this worker's start-up and its peaks)."""
    from ..cell import measure_cell, prepare_process

    prepare_process(job, _STATE["plugins"])
    ctx, env = _context(job, measure_peaks, known or {})
    if not _STATE.get("frozen"):
        gc.freeze()  # as in the in-process runner: a cell's gc.collect() scans only its own objects
        _STATE["frozen"] = True
    job = _with_reference(job, ctx)
    if on_start is not None:
        on_start()
    row = measure_cell(job, ctx)
    row.update(where_columns(env))
    env = {**env, "sentinel_tflops_best": ctx.sentinel_best}
    return row, env


def _with_reference(job: Any, ctx: Any) -> Any:
    """The job with this worker's own peaks and sentinel reference (the driver's are another device's)."""
    import dataclasses

    return dataclasses.replace(job, peaks=ctx.peaks, sentinel_start=ctx.sentinel_start)
