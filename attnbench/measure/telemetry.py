"""GPU state around and during each cell, from nvidia-ml-py: clocks, power, temperature, clock-event reasons.

A snapshot is a flat dict. Where NVML is absent (a CPU machine, no driver, no pynvml) the snapshot
is ``{"available": False, "reason": ...}`` and nothing raises.

A snapshot before the module is built and one after teardown both see a GPU at rest; what the GPU did
while the timed calls ran is read by :class:`LoadSampler` (``with sampling(telemetry) as s: ...``): a
background thread that reads the clocks, power, temperature and clock-event reasons every interval,
plus NVML's cumulative power and thermal violation counters read at both ends of the window.

What counts as *throttled* (:func:`slowdowns`, the ``throttled`` column): the thermal and hardware
slowdowns (:data:`SLOWDOWN_REASONS`), which mean the GPU ran slower than it would on a healthy, cool
machine. ``sw_power_cap`` is not one: at full load an H100 sits at its power limit and lowers its
clocks to stay there, which is how the part is meant to run and what every heavy cell will see. It is
kept visible apart (:func:`power_capped`, the ``power_capped`` column).
"""

from __future__ import annotations

import os
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
# Of those, the ones that flag a cell as throttled: thermal and hardware slowdowns. sw_power_cap, the
# normal state of a GPU at full load, is reported apart (power_capped).
SLOWDOWN_REASONS = {"hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown"}
POWER_CAP_REASON = "sw_power_cap"
# A thermal violation counted by NVML during the window that no sample caught as a reason bit.
THERMAL_VIOLATION = "thermal_violation"
NO_DEVICE = "no CUDA device in use"


def decode_reasons(mask: int | None) -> list[str]:
    """Names of the set bits of an NVML clock-event reason mask."""
    if not mask:
        return []
    names = [name for bit, name in CLOCK_EVENT_BITS.items() if mask & bit]
    rest = mask & ~sum(CLOCK_EVENT_BITS)
    return names + ([f"other_0x{rest:x}"] if rest else [])


def _looks_like_mig(index: int | None, uuid: str | None) -> bool:
    """Whether torch's device ``index`` is a MIG instance: its uuid says so, ``CUDA_VISIBLE_DEVICES``
    names MIG instances, or torch's device name says MIG (e.g. "NVIDIA A100-SXM4-40GB MIG 3g.20gb")."""
    if uuid and str(uuid).startswith("MIG-"):
        return True
    if "MIG-" in os.environ.get("CUDA_VISIBLE_DEVICES", ""):
        return True
    try:
        import torch

        if index is not None and torch.cuda.is_available():
            return "MIG" in torch.cuda.get_device_properties(index).name
    except Exception:
        pass
    return False


def uuid_candidates(uuid: str, mig: bool) -> list[tuple[str, str]]:
    """(NVML UUID to try, how it matched) for torch's ``uuid``: as it is when it carries a prefix,
    otherwise ``MIG-`` first for a MIG instance and ``GPU-`` first for a whole GPU, then the other."""
    uuid = str(uuid)
    if uuid.startswith("GPU-"):
        return [(uuid, "uuid")]
    if uuid.startswith("MIG-"):
        return [(uuid, "mig_uuid")]
    whole, part = (f"GPU-{uuid}", "uuid"), (f"MIG-{uuid}", "mig_uuid")
    return [part, whole] if mig else [whole, part]


class Telemetry:
    """Reads one GPU's state through NVML; ``snapshot()`` never raises.

    ``uuid`` (torch's ``get_device_properties(i).uuid``) finds the GPU that torch uses even when
    ``CUDA_VISIBLE_DEVICES`` renumbers devices (NVML's indices are the driver's, not torch's). Torch may
    give it without its prefix; ``GPU-`` and ``MIG-`` are both tried (``MIG-`` first where the device
    looks like a MIG instance, or where ``mig`` says so).

    Without a uuid match, ``index`` is used, but only for a whole GPU: the driver's device ``index`` is
    right only when nothing renumbers or partitions it. A MIG instance (or an index whose GPU is in MIG
    mode) that no uuid matches leaves telemetry unavailable with the reason, never another GPU's readings.

    A matched MIG instance is read through its parent GPU (``nvmlDeviceGetDeviceHandleFromMigDeviceHandle``)
    where NVML offers it: clocks, power, temperature and clock-event reasons belong to the whole GPU, and
    are shared with the other instances on it.
    """

    def __init__(self, index: int | None, uuid: str | None = None, mig: bool | None = None):
        self.handle = None
        self.read_handle = None  # the handle queries go to: the parent GPU of a MIG instance, else handle
        self.mig = False
        self.reason = NO_DEVICE if index is None else ""
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
        if mig is None:
            mig = _looks_like_mig(index, uuid)
        if uuid:
            for name, how in uuid_candidates(uuid, mig):
                try:
                    self.handle, self.matched_by = pynvml.nvmlDeviceGetHandleByUUID(name), how
                    break
                except Exception:
                    self.handle = None
            if self.handle is None and (mig or str(uuid).startswith("MIG-")):
                self.reason = (f"NVML knows no MIG instance with uuid {uuid}; not reading a whole GPU by index "
                               f"{index} instead (it may be another instance's parent)")
                return
        if self.handle is None:
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            except Exception as exc:
                self.reason = f"NVML has no device {index}: {type(exc).__name__}: {exc}"
                return
            if self._mig_mode(handle):
                self.reason = (f"NVML device {index} is in MIG mode and torch's device was not matched by uuid "
                               f"({uuid or 'none given'}): its readings would not be this instance's")
                return
            self.handle, self.matched_by = handle, "index"
        self.mig = self.matched_by == "mig_uuid"
        self.read_handle = self.handle
        if self.mig:
            parent = getattr(pynvml, "nvmlDeviceGetDeviceHandleFromMigDeviceHandle", None)
            try:
                self.read_handle = parent(self.handle) if parent is not None else self.handle
            except Exception:
                self.read_handle = self.handle

    def _mig_mode(self, handle: Any) -> bool:
        """Whether the GPU behind ``handle`` runs MIG now (False where NVML cannot say)."""
        fn = getattr(self.nvml, "nvmlDeviceGetMigMode", None)
        if fn is None:
            return False
        try:
            current = fn(handle)[0]
        except Exception:
            return False
        return current == getattr(self.nvml, "NVML_DEVICE_MIG_ENABLE", 1)

    @property
    def available(self) -> bool:
        return self.handle is not None

    def query(self, name: str, *args: Any) -> Any:
        """NVML function ``name`` called on this GPU's handle; None when it is missing or fails."""
        fn = getattr(self.nvml, name, None)
        if fn is None:
            return None
        try:
            return fn(self.read_handle if self.read_handle is not None else self.handle, *args)
        except Exception:
            return None

    def power_mw(self) -> tuple[int | None, str | None]:
        """(milliwatts, method): NVML's instantaneous power field where the driver has it (``instant``);
        else ``nvmlDeviceGetPowerUsage``, which on Hopper and later is an average over the last second
        (``average``: a 10 ms sampler under-reads the peak of a short cell with it)."""
        field = getattr(self.nvml, "NVML_FI_DEV_POWER_INSTANT", None)
        values = self.query("nvmlDeviceGetFieldValues", [field]) if field is not None else None
        if values:
            v = values[0]
            if getattr(v, "nvmlReturn", 1) == 0:
                return int(v.value.uiVal), "instant"
        power = self.query("nvmlDeviceGetPowerUsage")
        return (power, "average") if power is not None else (None, None)

    def snapshot(self) -> dict[str, Any]:
        if not self.available:
            return {"available": False, "reason": self.reason}
        n = self.nvml
        mask = self.query("nvmlDeviceGetCurrentClocksEventReasons")
        if mask is None:
            mask = self.query("nvmlDeviceGetCurrentClocksThrottleReasons")
        power, power_method = self.power_mw()
        return {
            "available": True,
            "sm_clock_mhz": self.query("nvmlDeviceGetClockInfo", getattr(n, "NVML_CLOCK_SM", 1)),
            "mem_clock_mhz": self.query("nvmlDeviceGetClockInfo", getattr(n, "NVML_CLOCK_MEM", 2)),
            "power_w": power / 1000 if power is not None else None,
            "power_method": power_method,
            "temperature_c": self.query("nvmlDeviceGetTemperature", getattr(n, "NVML_TEMPERATURE_GPU", 0)),
            "clock_event_mask": mask,
            "clock_event_reasons": decode_reasons(mask),
        }

    def violation_ns(self) -> dict[str, tuple[int, int] | None]:
        """NVML's cumulative violation counters: {"power" | "thermal": (reference time in ns, time the
        clocks were held below what was asked for, ns)}, None for a counter NVML does not offer."""
        out: dict[str, tuple[int, int] | None] = {}
        for key, policy, default in (("power", "NVML_PERF_POLICY_POWER", 0), ("thermal", "NVML_PERF_POLICY_THERMAL", 1)):
            v = self.query("nvmlDeviceGetViolationStatus", getattr(self.nvml, policy, default))
            try:  # referenceTime: a timestamp in microseconds; violationTime: nanoseconds
                out[key] = (int(v.referenceTime) * 1000, int(v.violationTime)) if v is not None else None
            except Exception:
                out[key] = None
        return out

    def sampling(self, interval_s: float = 0.01):
        """A sampler of this GPU under load: ``with t.sampling() as s: ...; s.summary``."""
        return sampling(self, interval_s)


def sampling(telemetry: Telemetry | None, interval_s: float = 0.01):
    """A :class:`attnbench.measure.gpuload.LoadSampler` of ``telemetry``'s GPU; with no telemetry (None,
    or NVML unavailable) a sampler that reads nothing and whose ``summary`` is None."""
    from .gpuload import LoadSampler

    return LoadSampler(telemetry, interval_s)


def _reasons(readings: tuple[dict[str, Any] | None, ...]) -> set[str]:
    found: set[str] = set()
    for s in readings:
        found |= set((s or {}).get("clock_event_reasons") or [])
    return found


def throttled(*snapshots: dict[str, Any]) -> list[str]:
    """Every reason the clocks were held down (power cap, thermal, hardware slowdown) present in any of
    the snapshots. The ``throttled`` column is :func:`slowdowns`, which leaves the power cap out."""
    return sorted(THROTTLE_REASONS & _reasons(snapshots))


def slowdowns(*readings: dict[str, Any] | None) -> list[str]:
    """What flags a cell as throttled: the thermal and hardware slowdown reasons in any of the readings
    (snapshots or a :class:`LoadSampler` summary), plus ``thermal_violation`` where a summary's thermal
    violation counter advanced during the window. ``sw_power_cap`` alone is not a slowdown."""
    found = SLOWDOWN_REASONS & _reasons(readings)
    if any((r or {}).get("throttle_thermal_fraction") for r in readings):
        found.add(THERMAL_VIOLATION)
    return sorted(found)


def power_capped(*readings: dict[str, Any] | None) -> bool:
    """Whether the GPU held its clocks down to stay at its power limit: ``sw_power_cap`` in any of the
    readings, or a summary's power violation counter advanced. Normal at full load on an H100."""
    return POWER_CAP_REASON in _reasons(readings) or any((r or {}).get("throttle_power_fraction")
                                                          for r in readings)


LOAD_KEYS = ("samples", "idle_samples", "sm_clock_mhz_median", "sm_clock_mhz_min", "mem_clock_mhz_median",
             "power_w_median", "power_w_max", "temperature_c_max", "throttle_power_fraction",
             "throttle_thermal_fraction", "power_method")


def flatten_load(summary: dict[str, Any] | None, prefix: str = "gpu_load") -> dict[str, Any]:
    """A :class:`LoadSampler` summary as row columns (``gpu_load_*``); no summary: 0 samples, None elsewhere."""
    summary = summary or {}
    out = {f"{prefix}_{k}": summary.get(k) for k in LOAD_KEYS}
    out[f"{prefix}_samples"] = int(summary.get("samples") or 0)
    out[f"{prefix}_idle_samples"] = int(summary.get("idle_samples") or 0)
    out[f"{prefix}_clock_event_reasons"] = ",".join(summary.get("clock_event_reasons") or [])
    return out


def flatten(prefix: str, snapshot: dict[str, Any]) -> dict[str, Any]:
    """{'sm_clock_mhz': 1980, ...} -> {'gpu_before_sm_clock_mhz': 1980, ...} for a results row."""
    keys = ("sm_clock_mhz", "mem_clock_mhz", "power_w", "temperature_c", "clock_event_mask")
    out = {f"{prefix}_{k}": snapshot.get(k) for k in keys}
    out[f"{prefix}_clock_event_reasons"] = ",".join(snapshot.get("clock_event_reasons") or [])
    return out
