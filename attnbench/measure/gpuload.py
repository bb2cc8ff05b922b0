"""GPU state while the timed calls run: a background thread reading NVML (see
:func:`attnbench.measure.telemetry.sampling`, which makes these)."""

from __future__ import annotations

import statistics
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .telemetry import Telemetry


class LoadSampler:
    """GPU state while a block runs: a context manager whose background thread reads SM and memory
    clocks, power, temperature and the clock-event reason mask every ``interval_s`` (the first reading
    at once), plus NVML's power and thermal violation counters at both ends of the window.

    ``with sampling(ctx.telemetry, interval_s=0.01) as s: <timed calls>``, then ``s.summary`` (see
    :meth:`summarize`). NVML calls go through ctypes, which releases the GIL, and one reading is five
    of them, so the thread costs the timed calls little. Exiting stops and joins the thread (waiting at
    most ``join_timeout_s`` for a hung NVML call); nothing here raises, and an exception of the block
    goes on as it would without the sampler.
    """

    def __init__(self, telemetry: Telemetry | None, interval_s: float = 0.01, join_timeout_s: float = 2.0,
                 max_samples: int = 100_000):
        self.telemetry = telemetry if telemetry is not None and telemetry.available else None
        self.interval_s = max(float(interval_s), 0.001)
        self.join_timeout_s = join_timeout_s
        self.max_samples = max_samples
        self.samples: list[dict[str, Any]] = []
        self.summary: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._violations: list[dict[str, Any]] = []
        self._t0 = self._t1 = 0.0

    def read(self) -> dict[str, Any] | None:
        """One reading of the GPU (None when every NVML call failed)."""
        try:
            snap = self.telemetry.snapshot()
        except Exception:
            return None
        keys = ("sm_clock_mhz", "mem_clock_mhz", "power_w", "temperature_c", "clock_event_mask")
        if not snap.get("available") or all(snap.get(k) is None for k in keys):
            return None
        return {"t": time.perf_counter(), **{k: snap.get(k) for k in keys},
                "power_method": snap.get("power_method"),
                "clock_event_reasons": snap.get("clock_event_reasons") or []}

    def _run(self) -> None:
        try:
            while len(self.samples) < self.max_samples:
                sample = self.read()
                if sample is not None:
                    self.samples.append(sample)
                if self._stop.wait(self.interval_s):
                    return
        except Exception:  # a thread that dies early leaves the samples it took
            return

    def _violations_now(self) -> dict[str, Any]:
        try:
            return self.telemetry.violation_ns()
        except Exception:
            return {}

    def __enter__(self) -> "LoadSampler":
        if self.telemetry is None:
            return self
        try:
            self._violations = [self._violations_now()]
            self._t0 = time.perf_counter()
            self._thread = threading.Thread(target=self._run, name="attnbench-gpu-sampler", daemon=True)
            self._thread.start()
        except Exception:
            self._thread = None
        return self

    def __exit__(self, *exc: Any) -> bool:
        if self.telemetry is None:
            return False
        try:
            self._t1 = time.perf_counter()
            self._stop.set()
            if self._thread is not None:
                self._thread.join(self.join_timeout_s)
            samples = list(self.samples)
            if not samples:  # a window shorter than the thread's start: one reading now, at its end
                sample = self.read()
                samples = [sample] if sample is not None else []
            self._violations.append(self._violations_now())
            self.summary = self.summarize(samples, self._violations[0], self._violations[-1], self._t1 - self._t0)
        except Exception:
            self.summary = None
        return False

    @staticmethod
    def summarize(samples: list[dict[str, Any]], v_before: dict[str, Any], v_after: dict[str, Any],
                  window_s: float) -> dict[str, Any] | None:
        """The window's summary; None where there is no reading at all.

        ``samples``: readings taken; ``idle_samples``: those with the ``gpu_idle`` reason (the GPU had
        nothing to run, e.g. between calls). Clocks and power are summarised over the busy readings
        (all of them where every one was idle), so an idle gap does not pass for a slowdown.
        ``clock_event_reasons``: every reason seen in any reading (idle ones included).
        ``throttle_power_fraction`` / ``throttle_thermal_fraction``: the share of the window NVML counted
        the clocks held down by power / by temperature (violation counters; None where NVML has none).
        """
        if not samples:
            return None
        busy = [s for s in samples if "gpu_idle" not in s["clock_event_reasons"]] or samples

        def values(key: str, among: list[dict[str, Any]]) -> list[float]:
            return [s[key] for s in among if isinstance(s.get(key), (int, float))]

        def stat(fn: Any, key: str) -> float | None:
            v = values(key, busy)
            return fn(v) if v else None

        reasons: set[str] = set()
        for s in samples:
            reasons |= set(s["clock_event_reasons"])

        def fraction(key: str) -> float | None:
            a, b = (v_before or {}).get(key), (v_after or {}).get(key)
            if not a or not b:
                return None
            window_ns = b[0] - a[0] if b[0] > a[0] else window_s * 1e9
            if window_ns <= 0:
                return None
            return min(max((b[1] - a[1]) / window_ns, 0.0), 1.0)

        return {
            "samples": len(samples),
            "idle_samples": len(samples) - len([s for s in samples if "gpu_idle" not in s["clock_event_reasons"]]),
            "window_s": window_s,
            "sm_clock_mhz_median": stat(statistics.median, "sm_clock_mhz"),
            "sm_clock_mhz_min": stat(min, "sm_clock_mhz"),
            "mem_clock_mhz_median": stat(statistics.median, "mem_clock_mhz"),
            "power_w_median": stat(statistics.median, "power_w"),
            "power_w_max": stat(max, "power_w"),
            "power_method": next((s["power_method"] for s in samples if s.get("power_method")), None),
            "temperature_c_max": max(values("temperature_c", samples), default=None),
            "clock_event_reasons": sorted(reasons),
            "throttle_power_fraction": fraction("power"),
            "throttle_thermal_fraction": fraction("thermal"),
        }
