"""What the cells measured in one process share, and the columns read from it around each cell.

:class:`CellContext` holds the L2 flusher, the GPU telemetry reader, the device's measured peaks and
the sentinel's speed at the start of the run; :func:`telemetry_columns` and
:func:`device_speed_columns` turn its readings around a cell into row columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .job import CellSettings
from .measure import cpuload
from .measure import peaks as peaks_mod
from .measure import telemetry as telemetry_mod
from .measure import timing
from .measure.telemetry import Telemetry


@dataclass
class CellContext:
    """What the cells of one process share: the L2 flusher, the GPU telemetry, the peaks, the sentinel."""

    device: torch.device
    flush: Callable[[], object] | None = None
    telemetry: Telemetry | None = None
    peaks: Any = None
    sentinel_start: float | None = None  # the sentinel's reference TFLOP/s when the context was made (None: off)
    sentinel_best: float | None = None  # the fastest sentinel reading so far: the reference of device_speed
    load_summary: dict[str, Any] | None = None  # GPU state sampled during the current cell's timed calls

    def __post_init__(self) -> None:
        if self.sentinel_best is None:
            self.sentinel_best = self.sentinel_start

    @classmethod
    def create(cls, settings: CellSettings, device: torch.device, peaks: Any = None,
               sentinel_start: float | None = None) -> "CellContext":
        """``sentinel_start``: the run's reference speed when it is already known (isolated workers);
        otherwise the best of three readings now."""
        if not settings.timing.sentinel:
            sentinel_start = None
        elif sentinel_start is None:
            sentinel_start = peaks_mod.sentinel_reference(device)
        flush = timing.l2_flusher(device) if settings.timing.l2_flush else None
        index = uuid = None
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        return cls(device=device, flush=flush, telemetry=Telemetry(index, str(uuid) if uuid else None), peaks=peaks,
                   sentinel_start=sentinel_start)

    def snapshot(self) -> dict[str, Any]:
        """The GPU's state now (see :meth:`attnbench.measure.telemetry.Telemetry.snapshot`); never raises."""
        if not self.telemetry:
            return {"available": False}
        try:
            return self.telemetry.snapshot()
        except Exception as exc:
            return {"available": False, "reason": f"NVML snapshot failed: {type(exc).__name__}: {exc}"}

    def sentinel(self) -> float | None:
        """The sentinel's TFLOP/s now (None when off); a faster reading than any before becomes the reference."""
        if not self.sentinel_start:
            return None
        reading = peaks_mod.sentinel_tflops(self.device)
        self.note_sentinel(reading)
        return reading

    def note_sentinel(self, reading: float | None) -> None:
        """Take a reading made elsewhere (an isolated worker's) into the reference."""
        if reading and self.sentinel_best is not None:
            self.sentinel_best = max(self.sentinel_best, reading)

    def peak_tflops(self, dtype: str) -> float | None:
        peak = ((self.peaks or {}).get("matmul_tflops") or {}).get(dtype)
        return float(peak) if isinstance(peak, (int, float)) and peak > 0 else None

    def refresh_peak(self, dtype: str, at_least: float | None = None) -> float | None:
        """Measure the matmul peak of ``dtype`` again and keep the larger (or ``at_least``, a peak an
        isolated worker measured); the run's ``peaks`` record every refresh."""
        if self.peaks is None:
            return None
        old = self.peak_tflops(dtype)
        new = at_least if at_least is not None else peaks_mod.matmul_tflops(self.device, dtype)
        if old is None or new > old:
            self.peaks.setdefault("matmul_tflops", {})[dtype] = new
            self.peaks.setdefault("refreshed", []).append({"dtype": dtype, "from": old, "to": new})
        return self.peak_tflops(dtype)



def device_speed_columns(readings: list[float], best: float) -> dict[str, Any]:
    """The sentinel's readings before and after the timed calls (TFLOP/s) and over the run's fastest
    reading (``device_speed_before``, ``_after``, their geometric mean ``device_speed``, at most 1);
    ``sentinel_drift`` when every reading is more than the tolerance below it (a sustained slowdown,
    not a blip in one reading)."""
    tol = peaks_mod.DRIFT_TOLERANCE
    speeds = [r / best for r in readings]
    out: dict[str, Any] = {"sentinel_tflops_before": readings[0], "device_speed_before": speeds[0]}
    if len(readings) > 1:
        out.update(sentinel_tflops_after=readings[1], device_speed_after=speeds[1])
    out["device_speed"] = math.prod(speeds) ** (1 / len(speeds))
    out["sentinel_drift"] = all(s < 1 - tol for s in speeds)
    return out


def drift_columns(row: dict[str, Any]) -> dict[str, Any]:
    """``drift`` (the cell's latency is not the device's usual: it ran slowed) and ``drift_reason``,
    from the sentinel (``sentinel_drift``) and, on CPU, from other processes' CPU use during the timed
    calls (``cpu_others_cores`` above :data:`attnbench.measure.cpuload.CONTENDED_CORES`)."""
    reasons = []
    if row.get("sentinel_drift"):
        reasons.append(f"the device ran at {row['device_speed']:.2f}x its best speed in this run (sentinel matmul)")
    others = row.get("cpu_others_cores")
    if isinstance(others, float) and others > cpuload.CONTENDED_CORES:
        reasons.append(f"other processes took {others:.2f} CPU cores during the timed calls")
    return {"drift": bool(reasons), "drift_reason": "; ".join(reasons)}


def telemetry_columns(before: dict[str, Any], after: dict[str, Any],
                      under_load: dict[str, Any] | None = None) -> dict[str, Any]:
    """GPU state around the cell (``gpu_before_*``, ``gpu_after_*``), during its timed calls
    (``gpu_load_*``, from a :class:`attnbench.measure.telemetry.LoadSampler` summary; None when there
    was no sampler or it read nothing: ``gpu_load_samples`` 0), ``throttled`` and ``power_capped``.

    ``throttled``: the thermal and hardware slowdown reasons seen before, during or after the timed
    calls (``sw_thermal_slowdown``, ``hw_thermal_slowdown``, ``hw_slowdown``, ``hw_power_brake_slowdown``,
    and ``thermal_violation`` where NVML's thermal violation counter advanced during them), comma-joined;
    empty when none. ``power_capped``: the GPU held its clocks at its power limit (``sw_power_cap`` or the
    power violation counter) -- normal at full load on an H100, so it does not make a cell throttled.

    Where NVML could not read this cell's GPU: ``telemetry`` "absent", and ``telemetry_reason`` says why
    when a GPU was in use (a CPU cell has nothing to read and no reason).
    """
    if not before.get("available"):
        reason = before.get("reason")
        return {"telemetry": "absent", **({"telemetry_reason": reason} if reason and reason != telemetry_mod.NO_DEVICE
                                           else {})}
    return {"telemetry": "nvml", **telemetry_mod.flatten("gpu_before", before),
            **telemetry_mod.flatten("gpu_after", after), **telemetry_mod.flatten_load(under_load),
            "throttled": ",".join(telemetry_mod.slowdowns(before, under_load, after)),
            "power_capped": telemetry_mod.power_capped(before, under_load, after)}
