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
    sentinel_start: float | None = None  # the sentinel's TFLOP/s at the start of the run (None: off)

    @classmethod
    def create(cls, settings: CellSettings, device: torch.device, peaks: Any = None,
               sentinel_start: float | None = None) -> "CellContext":
        """``sentinel_start``: the run's reference speed when it is already known (isolated workers)."""
        if not settings.timing.sentinel:
            sentinel_start = None
        elif sentinel_start is None:
            sentinel_start = peaks_mod.sentinel_tflops(device)
        flush = timing.l2_flusher(device) if settings.timing.l2_flush else None
        index = uuid = None
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        return cls(device=device, flush=flush, telemetry=Telemetry(index, str(uuid) if uuid else None), peaks=peaks,
                   sentinel_start=sentinel_start)

    def snapshot(self) -> dict[str, Any]:
        return self.telemetry.snapshot() if self.telemetry else {"available": False}

    def speed(self) -> float | None:
        """The sentinel's speed now over its speed at the start of the run (None when off)."""
        if not self.sentinel_start:
            return None
        return peaks_mod.sentinel_tflops(self.device) / self.sentinel_start



def device_speed_columns(speeds: list[float]) -> dict[str, Any]:
    """``device_speed``: geometric mean of the sentinel ratios before and after the cell; ``drift`` when every
    ratio is off by more than the tolerance on the same side (a sustained change, not a blip in one reading)."""
    tol = peaks_mod.DRIFT_TOLERANCE
    out: dict[str, Any] = {"device_speed_before": speeds[0]}
    if len(speeds) > 1:
        out["device_speed_after"] = speeds[1]
    out["device_speed"] = math.prod(speeds) ** (1 / len(speeds))
    out["drift"] = all(s < 1 - tol for s in speeds) or all(s > 1 + tol for s in speeds)
    return out


def telemetry_columns(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """GPU state around the cell (``gpu_before_*``, ``gpu_after_*``) and the throttle reasons."""
    if not before.get("available"):
        return {"telemetry": "absent"}
    return {"telemetry": "nvml", **telemetry_mod.flatten("gpu_before", before),
            **telemetry_mod.flatten("gpu_after", after), "throttled": ",".join(telemetry_mod.throttled(before, after))}
