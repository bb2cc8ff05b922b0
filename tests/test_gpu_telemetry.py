"""GPU telemetry under load (the LoadSampler), what `throttled` means, and MIG matching; CPU only, with a
fake pynvml whose readings the test scripts."""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

import pytest

from attnbench.context import telemetry_columns
from attnbench.measure import telemetry


class FakeNVML:
    """A stand-in for pynvml: whole GPUs by uuid and index, optional MIG instances (``migs``: MIG uuid ->
    parent GPU uuid), scripted readings (``script``: a function of the reading's number -> dict), and
    violation counters (``violations``: policy -> [(referenceTime µs, violationTime ns), ...], one pair per
    call)."""

    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 1, 2, 0
    NVML_PERF_POLICY_POWER, NVML_PERF_POLICY_THERMAL = 0, 1
    NVML_DEVICE_MIG_ENABLE = 1

    def __init__(self, uuids=("GPU-aaaa",), migs=None, mig_mode=0):
        self.uuids, self.migs, self.mig_mode = list(uuids), dict(migs or {}), mig_mode
        self.readings = 0  # clock-event mask reads: one per snapshot
        self.script = lambda i: {}
        self.violations: dict[int, list[tuple[int, int]]] = {}
        self.fail: set[str] = set()

    def _maybe_fail(self, name):
        if name in self.fail or "*" in self.fail:
            raise RuntimeError(f"NVML_ERROR_UNKNOWN ({name})")

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, i):
        return self.uuids[i]

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid not in self.uuids and uuid not in self.migs:
            raise RuntimeError("NVML_ERROR_NOT_FOUND")
        return uuid

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, h):
        return self.migs[h]

    def nvmlDeviceGetMigMode(self, h):
        return [self.mig_mode, self.mig_mode]

    def _now(self):
        return self.script(self.readings)

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        self._maybe_fail("mask")
        self.readings += 1
        return self._now().get("mask", 0x0)

    def nvmlDeviceGetClockInfo(self, h, kind):
        self._maybe_fail("clock")
        return self._now().get("sm", 1980) if kind == self.NVML_CLOCK_SM else 2619

    def nvmlDeviceGetPowerUsage(self, h):
        self._maybe_fail("power")
        return self._now().get("power_mw", 650_000)

    def nvmlDeviceGetTemperature(self, h, sensor):
        self._maybe_fail("temperature")
        return self._now().get("temp", 60) + (5 if h == "GPU-parent" else 0)

    def nvmlDeviceGetViolationStatus(self, h, policy):
        self._maybe_fail("violation")
        pairs = self.violations.get(policy)
        if not pairs:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        ref, viol = pairs.pop(0) if len(pairs) > 1 else pairs[0]
        return SimpleNamespace(referenceTime=ref, violationTime=viol)


@pytest.fixture
def fake(monkeypatch):
    f = FakeNVML()
    monkeypatch.setitem(sys.modules, "pynvml", f)
    return f


def run_window(t: telemetry.Telemetry, fake: FakeNVML, seconds=0.05, at_least=5, interval_s=0.005):
    """A ~50 ms window of 'work', held open until the sampler took ``at_least`` readings (no timing luck)."""
    with telemetry.sampling(t, interval_s=interval_s) as s:
        time.sleep(seconds)
        deadline = time.monotonic() + 5
        while len(s.samples) < at_least and time.monotonic() < deadline:
            time.sleep(0.002)
    return s


def test_sampler_sees_the_clock_drop_and_thermal_slowdown_during_the_window(fake):
    # the first three readings: full clock, power-capped; then the clock drops and software thermal slowdown appears
    fake.script = lambda i: ({"sm": 1980, "mask": 0x4, "power_mw": 690_000, "temp": 70} if i < 3 else
                             {"sm": 1410, "mask": 0x4 | 0x20, "power_mw": 600_000, "temp": 88})
    t = telemetry.Telemetry(0, uuid="aaaa")
    assert t.matched_by == "uuid"
    before = t.snapshot()  # idle-looking readings around the cell see nothing of it
    s = run_window(t, fake, at_least=6)
    summary = s.summary
    assert summary["samples"] >= 6 and summary["samples"] == len(s.samples) and summary["idle_samples"] == 0
    assert summary["sm_clock_mhz_min"] == 1410 and summary["sm_clock_mhz_median"] in (1410, 1980, (1410 + 1980) / 2)
    assert summary["power_w_max"] == 690.0 and summary["temperature_c_max"] == 88
    assert summary["clock_event_reasons"] == ["sw_power_cap", "sw_thermal_slowdown"]
    assert summary["throttle_power_fraction"] is None  # the fake has no violation counters: unknown, not 0
    assert not s._thread.is_alive()  # stopped and joined on exit
    cols = telemetry_columns(before, t.snapshot(), under_load=summary)
    assert cols["throttled"] == "sw_thermal_slowdown" and cols["power_capped"] is True
    assert cols["gpu_load_sm_clock_mhz_min"] == 1410 and cols["gpu_load_temperature_c_max"] == 88
    assert cols["gpu_load_clock_event_reasons"] == "sw_power_cap,sw_thermal_slowdown"
    assert cols["gpu_load_samples"] == summary["samples"] and cols["gpu_before_sm_clock_mhz"] == 1980


def test_power_cap_alone_is_not_throttled_and_thermal_or_hardware_slowdown_is(fake):
    t = telemetry.Telemetry(0)
    idle = {"available": True, "clock_event_reasons": ["gpu_idle"]}
    fake.script = lambda i: {"mask": 0x4}  # sw_power_cap throughout: a heavy cell on an H100
    cols = telemetry_columns(idle, idle, run_window(t, fake, at_least=3).summary)
    assert cols["throttled"] == "" and cols["power_capped"] is True
    for bit, name in ((0x20, "sw_thermal_slowdown"), (0x40, "hw_thermal_slowdown"), (0x8, "hw_slowdown"),
                      (0x80, "hw_power_brake_slowdown")):
        fake.script = lambda i, bit=bit: {"mask": 0x4 | bit}
        cols = telemetry_columns(idle, idle, run_window(t, fake, at_least=2).summary)
        assert cols["throttled"] == name and cols["power_capped"] is True
    fake.script = lambda i: {"mask": 0x0}
    cols = telemetry_columns(idle, idle, run_window(t, fake, at_least=2).summary)
    assert cols["throttled"] == "" and cols["power_capped"] is False


def test_idle_readings_do_not_pass_for_a_slowdown(fake):
    # the GPU idles between calls at times: those readings (gpu_idle) stay out of the clock and power figures
    fake.script = lambda i: {"sm": 345, "mask": 0x1, "power_mw": 90_000} if i % 2 else {"sm": 1980, "mask": 0x0}
    summary = run_window(telemetry.Telemetry(0), fake, at_least=6).summary
    assert summary["idle_samples"] >= 1 and summary["sm_clock_mhz_min"] == 1980 and summary["power_w_median"] == 650.0
    assert "gpu_idle" in summary["clock_event_reasons"]


def test_violation_counters_give_the_throttled_fractions(fake):
    # 100 ms between the readings (referenceTime in µs); 80 ms of it power-limited, 10 ms thermally limited
    fake.violations = {0: [(1_000_000, 5_000_000_000), (1_100_000, 5_080_000_000)],
                       1: [(1_000_000, 7_000_000), (1_100_000, 17_000_000)]}
    summary = run_window(telemetry.Telemetry(0), fake, at_least=2).summary
    assert summary["throttle_power_fraction"] == pytest.approx(0.8)
    assert summary["throttle_thermal_fraction"] == pytest.approx(0.1)
    idle = {"available": True, "clock_event_reasons": []}
    cols = telemetry_columns(idle, idle, under_load=summary)
    # the thermal counter advanced though no reading caught the bit: throttled; the power counter alone: capped
    assert cols["throttled"] == "thermal_violation" and cols["power_capped"] is True
    assert cols["gpu_load_throttle_thermal_fraction"] == pytest.approx(0.1)
    # counters that did not move: 0.0 of the window, nothing flagged
    fake.violations = {0: [(2_000_000, 5)], 1: [(2_000_000, 7)]}
    summary = run_window(telemetry.Telemetry(0), fake, at_least=2).summary
    assert summary["throttle_power_fraction"] == 0.0 and summary["throttle_thermal_fraction"] == 0.0
    assert telemetry_columns(idle, idle, summary)["throttled"] == ""


def test_sampler_never_raises(fake):
    t = telemetry.Telemetry(0)
    fake.fail = {"*"}  # every NVML reading fails
    with telemetry.sampling(t, interval_s=0.005) as s:
        time.sleep(0.03)
    assert s.summary is None and not s._thread.is_alive()
    fake.fail = {"clock", "violation"}  # some fail: the others are still read
    summary = run_window(t, fake, at_least=2).summary
    assert summary["sm_clock_mhz_min"] is None and summary["power_w_max"] == 650.0
    assert summary["throttle_thermal_fraction"] is None
    # no telemetry at all: a sampler that reads nothing
    for absent in (None, telemetry.Telemetry(None)):
        with telemetry.sampling(absent) as s:
            pass
        assert s.summary is None and s._thread is None
    # an exception of the block goes on, the thread still stopped
    fake.fail = set()
    with pytest.raises(ValueError):
        with telemetry.sampling(t, interval_s=0.005) as s:
            raise ValueError("the cell failed")
    assert not s._thread.is_alive() and s.summary["samples"] >= 1


def test_telemetry_columns_keeps_the_two_argument_call(fake):
    t = telemetry.Telemetry(0)
    fake.script = lambda i: {"mask": 0x20}
    cols = telemetry_columns(t.snapshot(), t.snapshot())
    assert cols["telemetry"] == "nvml" and cols["throttled"] == "sw_thermal_slowdown" and cols["power_capped"] is False
    assert cols["gpu_before_sm_clock_mhz"] == 1980 and cols["gpu_after_clock_event_reasons"] == "sw_thermal_slowdown"
    assert cols["gpu_load_samples"] == 0 and cols["gpu_load_sm_clock_mhz_min"] is None
    fake.script = lambda i: {"mask": 0x4}
    cols = telemetry_columns(t.snapshot(), t.snapshot())
    assert cols["throttled"] == "" and cols["power_capped"] is True
    assert telemetry_columns({"available": False}, {"available": False}) == {"telemetry": "absent"}
    cpu = telemetry.Telemetry(None).snapshot()
    assert telemetry_columns(cpu, cpu) == {"telemetry": "absent"}


def test_a_mig_instance_is_matched_by_its_mig_uuid(monkeypatch):
    # torch gives the MIG instance's uuid without its prefix; NVML knows it only as "MIG-<uuid>"
    fake = FakeNVML(uuids=("GPU-parent",), migs={"MIG-1234": "GPU-parent"}, mig_mode=1)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    t = telemetry.Telemetry(0, uuid="1234")
    assert t.available and t.matched_by == "mig_uuid" and t.mig and t.handle == "MIG-1234"
    assert t.read_handle == "GPU-parent" and t.snapshot()["temperature_c"] == 65  # read through its parent GPU
    assert telemetry.Telemetry(0, uuid="MIG-1234").matched_by == "mig_uuid"
    # a device known to be MIG tries MIG- first
    assert telemetry.uuid_candidates("1234", mig=True)[0] == ("MIG-1234", "mig_uuid")
    assert telemetry.uuid_candidates("1234", mig=False)[0] == ("GPU-1234", "uuid")
    # without a parent lookup in NVML, the instance's own handle is read
    monkeypatch.delattr(FakeNVML, "nvmlDeviceGetDeviceHandleFromMigDeviceHandle")
    t = telemetry.Telemetry(0, uuid="1234")
    assert t.read_handle == "MIG-1234" and t.snapshot()["temperature_c"] == 60


def test_an_unmatched_mig_instance_is_unavailable_not_read_by_index(monkeypatch):
    fake = FakeNVML(uuids=("GPU-parent",), migs={"MIG-1234": "GPU-parent"}, mig_mode=1)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    # a MIG uuid NVML does not know: no fall back to index 0 (a whole GPU, maybe another instance's parent)
    for t in (telemetry.Telemetry(0, uuid="MIG-9999"), telemetry.Telemetry(0, uuid="9999", mig=True)):
        assert not t.available and t.handle is None and "MIG" in t.reason
        snap = t.snapshot()
        assert snap["available"] is False and "9999" in snap["reason"]
        cols = telemetry_columns(snap, snap)
        assert cols["telemetry"] == "absent" and "9999" in cols["telemetry_reason"]
        with telemetry.sampling(t) as s:
            pass
        assert s.summary is None
    # no MIG hint at all, but the index's GPU is in MIG mode: its readings are not this device's either
    t = telemetry.Telemetry(0, uuid="9999")
    assert not t.available and "MIG mode" in t.reason
    t = telemetry.Telemetry(0)
    assert not t.available and "MIG mode" in t.reason
    # MIG detected from torch's device name (e.g. "NVIDIA H100 80GB HBM3 MIG 1g.10gb")
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.get_device_properties", lambda i: SimpleNamespace(name="NVIDIA H100 MIG 1g.10gb"))
    assert telemetry._looks_like_mig(0, "1234") is True
    monkeypatch.setattr("torch.cuda.get_device_properties", lambda i: SimpleNamespace(name="NVIDIA H100 80GB HBM3"))
    assert telemetry._looks_like_mig(0, "1234") is False


def test_a_whole_gpu_still_falls_back_to_its_index(monkeypatch):
    fake = FakeNVML(uuids=("GPU-aaaa", "GPU-bbbb"))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    t = telemetry.Telemetry(1, uuid="unknown")  # not MIG, GPU not in MIG mode: the driver's index is right
    assert t.available and t.matched_by == "index" and t.handle == "GPU-bbbb"
    assert telemetry.Telemetry(0, uuid="bbbb").handle == "GPU-bbbb"


class FakeNVMLInstantPower(FakeNVML):
    """A driver with NVML's instantaneous power field (186): it reads ``instant_mw``; the averaged
    nvmlDeviceGetPowerUsage keeps the old ``power_mw`` (Hopper's 1 s average lags a short peak)."""

    NVML_FI_DEV_POWER_INSTANT = 186

    def nvmlDeviceGetFieldValues(self, h, ids):
        assert ids == [186]
        ret = 0 if "instant_mw" in self._now() else 3  # NVML_ERROR_NOT_SUPPORTED
        return [SimpleNamespace(fieldId=186, nvmlReturn=ret, value=SimpleNamespace(uiVal=self._now().get("instant_mw", 0)))]


def test_power_is_read_instantaneously_where_the_driver_can(monkeypatch):
    f = FakeNVMLInstantPower()
    monkeypatch.setitem(sys.modules, "pynvml", f)
    f.script = lambda i: {"power_mw": 400_000, "instant_mw": 700_000 if i >= 2 else 300_000}
    t = telemetry.Telemetry(0, uuid="aaaa")
    s = run_window(t, f, at_least=6)
    assert s.summary["power_w_max"] == 700.0 and s.summary["power_method"] == "instant"
    cols = telemetry_columns(t.snapshot(), t.snapshot(), under_load=s.summary)
    assert cols["gpu_load_power_method"] == "instant" and cols["gpu_before_power_w"] == 700.0
    f.script = lambda i: {"power_mw": 400_000}  # the field not supported: the averaged reading, said so
    s = run_window(t, f, at_least=3)
    assert s.summary["power_w_max"] == 400.0 and s.summary["power_method"] == "average"


def test_power_method_is_average_without_the_field(fake):
    t = telemetry.Telemetry(0, uuid="aaaa")
    s = run_window(t, fake, at_least=3)
    assert s.summary["power_method"] == "average" and s.summary["power_w_max"] == 650.0
