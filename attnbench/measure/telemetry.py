"""GPU state around each cell, from nvidia-ml-py: clocks, power, temperature, clock-event reasons.

A snapshot is a flat dict. Where NVML is absent (a CPU machine, no driver, no pynvml) the snapshot
is ``{"available": False, "reason": ...}`` and nothing raises.
"""

from __future__ import annotations

from typing import Any

# NVML clock-event ("throttle") reason bits, as documented for nvmlDeviceGetCurrentClocksEventReasons.
CLOCK_EVENT_BITS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
# Reasons that mean the clocks were held down while working (idle and user clock settings are not).
THROTTLE_REASONS = {"sw_power_cap", "hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown",
                    "hw_power_brake_slowdown"}


def decode_reasons(mask: int | None) -> list[str]:
    """Names of the set bits of an NVML clock-event reason mask."""
    if not mask:
        return []
    names = [name for bit, name in CLOCK_EVENT_BITS.items() if mask & bit]
    rest = mask & ~sum(CLOCK_EVENT_BITS)
    return names + ([f"other_0x{rest:x}"] if rest else [])


class Telemetry:
    """Reads one GPU's state through NVML; ``snapshot()`` never raises.

    ``uuid`` (torch's ``get_device_properties(i).uuid``) finds the GPU that torch uses even when
    ``CUDA_VISIBLE_DEVICES`` renumbers devices (NVML's indices are the driver's, not torch's); without
    it, or if NVML does not know it, ``index`` is used.
    """

    def __init__(self, index: int | None, uuid: str | None = None):
        self.handle = None
        self.reason = "no CUDA device in use" if index is None else ""
        self.matched_by = None
        if index is None:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
        except Exception as exc:
            self.reason = f"NVML unavailable: {type(exc).__name__}: {exc}"
            return
        if uuid:
            try:
                name = uuid if str(uuid).startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
                self.handle, self.matched_by = pynvml.nvmlDeviceGetHandleByUUID(name), "uuid"
            except Exception:
                self.handle = None
        if self.handle is None:
            try:
                self.handle, self.matched_by = pynvml.nvmlDeviceGetHandleByIndex(index), "index"
            except Exception as exc:
                self.reason = f"NVML has no device {index}: {type(exc).__name__}: {exc}"

    @property
    def available(self) -> bool:
        return self.handle is not None

    def query(self, name: str, *args: Any) -> Any:
        """NVML function ``name`` called on this GPU's handle; None when it is missing or fails."""
        fn = getattr(self.nvml, name, None)
        if fn is None:
            return None
        try:
            return fn(self.handle, *args)
        except Exception:
            return None

    def snapshot(self) -> dict[str, Any]:
        if not self.available:
            return {"available": False, "reason": self.reason}
        n = self.nvml
        mask = self.query("nvmlDeviceGetCurrentClocksEventReasons")
        if mask is None:
            mask = self.query("nvmlDeviceGetCurrentClocksThrottleReasons")
        power = self.query("nvmlDeviceGetPowerUsage")
        return {
            "available": True,
            "sm_clock_mhz": self.query("nvmlDeviceGetClockInfo", n.NVML_CLOCK_SM),
            "mem_clock_mhz": self.query("nvmlDeviceGetClockInfo", n.NVML_CLOCK_MEM),
            "power_w": power / 1000 if power is not None else None,
            "temperature_c": self.query("nvmlDeviceGetTemperature", n.NVML_TEMPERATURE_GPU),
            "clock_event_mask": mask,
            "clock_event_reasons": decode_reasons(mask),
        }


def throttled(*snapshots: dict[str, Any]) -> list[str]:
    """The throttle reasons (power, thermal, hardware slowdown) present in any of the snapshots."""
    found: set[str] = set()
    for s in snapshots:
        found |= THROTTLE_REASONS & set(s.get("clock_event_reasons") or [])
    return sorted(found)


def flatten(prefix: str, snapshot: dict[str, Any]) -> dict[str, Any]:
    """{'sm_clock_mhz': 1980, ...} -> {'gpu_before_sm_clock_mhz': 1980, ...} for a results row."""
    keys = ("sm_clock_mhz", "mem_clock_mhz", "power_w", "temperature_c", "clock_event_mask")
    out = {f"{prefix}_{k}": snapshot.get(k) for k in keys}
    out[f"{prefix}_clock_event_reasons"] = ",".join(snapshot.get("clock_event_reasons") or [])
    return out
