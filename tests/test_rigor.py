"""Measurement rigor: calibration, dtype skips, isolation and time-outs, largest batch, telemetry,
device peaks, derived performance, SDPA backend pinning, torch.compile, overhead accounting."""

import json

import pytest
import torch

import attnbench
from attnbench import device as device_mod
from attnbench.analysis import summary
from attnbench.cell import CellContext
from attnbench.job import CellSettings
from attnbench.measure import peaks, telemetry, timing
from attnbench.runner import prepare, run_suite
from conftest import FAST_TIMING, ROOT, suite_file
from conftest import make_suite as suite


# --- calibration ---------------------------------------------------------------------------------

@pytest.mark.parametrize("est,remaining,want", [
    (0.001, 100, 500),   # 0.5 s target / 1 ms a call = 500 calls
    (0.5, 100, 5),       # slow: at least min_repeats
    (1e-6, 100, 1000),   # fast: at most max_repeats
    (0.01, 0.3, 30),     # the budget left caps the count...
    (0.1, 0.45, None),   # ...and when min_repeats do not fit in it, there is no plan
])
def test_plan_repeats(est, remaining, want):
    assert timing.plan_repeats(est, target_s=0.5, min_repeats=5, max_repeats=1000, remaining_s=remaining) == want


def test_cuda_graph_and_flush_need_a_gpu():
    assert timing.l2_flusher(torch.device("cpu")) is None
    with pytest.raises(RuntimeError):
        timing.capture_graph(lambda: None, torch.device("cpu"))


# --- dtypes ---------------------------------------------------------------------------------------

def test_dtype_the_device_lacks_is_a_skip(tmp_path, monkeypatch):
    monkeypatch.setitem(device_mod._dtype_problems, ("bfloat16", "cpu"), "bfloat16 is not supported by this toy device")
    res = run_suite(suite(["mha.sdpa"], dtype=["float32", "bfloat16"]), out=tmp_path / "r", progress=False)
    st = {r["dtype"]: (r["status"], r["message"]) for r in res.rows}
    assert st["float32"] == ("ok", "")
    assert st["bfloat16"] == ("unsupported", "bfloat16 is not supported by this toy device")


def test_no_runnable_dtype_is_bad_input(monkeypatch):
    monkeypatch.setitem(device_mod._dtype_problems, ("float16", "cpu"), "float16 is not supported by this toy device")
    with pytest.raises(attnbench.DeviceError, match="float16"):
        prepare(suite(["mha.sdpa"], dtype="float16"))


def test_float16_and_bfloat16_run_on_cpu(tmp_path):
    res = run_suite(suite(["mha.math", "swin.shift_cyclic"], dtype=["float16", "bfloat16"], mode=["forward", "train"]),
                    out=tmp_path / "r", progress=False)
    assert {r["status"] for r in res.rows} == {"ok"}, [r["message"] for r in res.rows]


# --- isolation --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_isolated_crash_becomes_a_row(tmp_path):
    s = suite(["toy.crash", "toy.proj"], resolution=(32, 48, 64), isolation="process",
              budget={"cell_timeout_s": 300})  # nothing hangs: a generous time-out cannot be reached by a busy machine
    res = run_suite(s, out=tmp_path / "r", progress=False)
    st = {(r["impl"], r["resolution"]): r for r in res.rows}
    assert all(r["isolation"] == "process" for r in res.rows)
    assert st[("toy.crash", 32)]["status"] == "ok"
    assert st[("toy.crash", 48)]["status"] == "crashed" and "signal 9" in st[("toy.crash", 48)]["message"]
    assert st[("toy.crash", 64)]["status"] == "crashed"  # a crash does not block larger cells: each is tried
    assert st[("toy.crash", 64)]["message"] == "the worker process died (signal 9)"
    assert all(st[("toy.proj", r)]["status"] == "ok" for r in (32, 48, 64))
    assert len(attnbench.load_results(res.run_dir)) == 6
    # workers judge the device's speed against the parent's reference (the start's best, raised by every
    # reading the workers sent back), never one of their own: replay that reference cell by cell
    best = json.loads((res.run_dir / "env.json").read_text())["sentinel_tflops_start"]
    assert best > 0
    for r in res.rows:
        if r["status"] != "ok":
            assert "sentinel_tflops_before" not in r  # a dead worker reports nothing
            continue
        before, after = r["sentinel_tflops_before"], r["sentinel_tflops_after"]
        best = max(best, before, after)  # the cell's two readings join the reference first
        assert before / r["device_speed_before"] == pytest.approx(best, rel=1e-9)
        assert after / r["device_speed_after"] == pytest.approx(best, rel=1e-9)
        assert 0 < r["device_speed"] <= 1
    ctx = CellContext.create(CellSettings.from_suite(s.model), torch.device("cpu"), None, sentinel_start=123.0)
    assert ctx.sentinel_start == 123.0  # given (as a worker is given the parent's), not measured again


def test_isolated_hang_is_a_timeout_and_blocks_the_series(tmp_path):
    """toy.hang hangs on every real grid from 12 on: its first cell here is a time-out however long the
    worker takes to start; the larger one is not tried."""
    import multiprocessing

    s = suite(["toy.hang"], resolution=(48, 64), isolation="process", budget={"cell_timeout_s": 2})
    res = run_suite(s, out=tmp_path / "r", progress=False)
    hung, skipped = res.rows
    assert hung["status"] == "timeout" and hung["isolation"] == "process"
    assert hung["message"] == "the worker did not finish within 2 s and was killed"
    assert hung["worker_wall_s"] >= 2 and "latency_n" not in hung
    assert skipped["status"] == "timeout" and skipped["message"] == "skipped: resolution 48 was timeout"
    assert "isolation" not in skipped and res.measured == 1 and res.skipped == 1
    assert not multiprocessing.active_children()  # the hung worker was killed and reaped
    assert res.overhead["timeout_s"] == pytest.approx(hung["worker_wall_s"])
    assert [r["status"] for r in attnbench.load_results(res.run_dir).to_dict("records")] == ["timeout", "timeout"]


def test_isolated_worker_dying_slowly_is_crashed_not_timeout(tmp_path):
    s = suite(["toy.lingers"], isolation="process", budget={"cell_timeout_s": 60})
    row = run_suite(s, out=tmp_path / "r", progress=False).rows[0]
    assert row["status"] == "crashed" and row["message"] == "the worker process died (exit code 3)"
    assert row["worker_wall_s"] < 60


# --- largest batch ----------------------------------------------------------------------------------

def test_find_max_batch_halves_on_oom(tmp_path):
    res = run_suite(suite(["toy.batchcap"], batch=32, find_max_batch=True), out=tmp_path / "r", progress=False)
    row = res.rows[0]
    assert row["status"] == "ok" and row["batch"] == 4 and row["batch_requested"] == 32
    assert [t["batch"] for t in row["batch_search"]] == [32, 16, 8, 4]
    assert [t["fits"] for t in row["batch_search"]] == [False, False, False, True]
    assert row["throughput_img_s"] == pytest.approx(4 / (row["latency_ms_median"] / 1e3))


def test_find_max_batch_respects_cpu_memory_budget(tmp_path, monkeypatch, scripted_calls):
    """On CPU a too-large batch is predicted from the batch-1 peak, never tried (it would swap)."""
    from attnbench.measure import memory

    def ten_mib(fn, device):  # every call peaks at 10 MiB above what it starts with
        fn()
        return float(10 * 2**20), memory.CPU_METHOD

    monkeypatch.setattr(memory, "peak_memory_bytes", ten_mib)
    monkeypatch.setattr(memory, "available_memory_bytes", lambda device: 2**30)  # budget: 0.05 x 1 GiB = 51 MiB
    scripted_calls.cost = lambda module, x: 1e-3
    res = run_suite(suite(["toy.proj"], batch=1 << 20, find_max_batch=True, budget={"memory_fraction": 0.05},
                          timing={**FAST_TIMING, "sentinel": False}), out=tmp_path / "r", progress=False)
    row = res.rows[0]
    assert row["status"] == "ok" and row["batch"] == 4 and row["batch_requested"] == 1 << 20  # 4 x 10 MiB fits
    assert row["batch_search"] == [{"batch": 1 << k, "fits": False, "why": "estimated memory over budget"}
                                   for k in range(20, 2, -1)] + [{"batch": 4, "fits": True}]
    assert {b for b, _, _ in scripted_calls.calls} == {1, 4}  # the one-image estimate, then batch 4 only


# --- telemetry ------------------------------------------------------------------------------------

def test_clock_event_reasons_decode():
    assert telemetry.decode_reasons(0) == []
    assert telemetry.decode_reasons(0x1 | 0x4 | 0x40) == ["gpu_idle", "sw_power_cap", "hw_thermal_slowdown"]
    assert telemetry.decode_reasons(0x10000) == ["other_0x10000"]
    snaps = [{"clock_event_reasons": ["gpu_idle"]}, {"clock_event_reasons": ["sw_power_cap", "gpu_idle"]}]
    assert telemetry.throttled(*snaps) == ["sw_power_cap"]
    assert telemetry.throttled({"clock_event_reasons": ["gpu_idle", "applications_clocks_setting"]}) == []


def test_telemetry_absent_without_gpu(tmp_path):
    t = telemetry.Telemetry(None)
    assert t.snapshot() == {"available": False, "reason": "no CUDA device in use"}
    res = run_suite(suite(["mha.sdpa"]), out=tmp_path / "r", progress=False)
    assert res.rows[0]["telemetry"] == "absent" and res.rows[0]["status"] == "ok"


def test_throttled_cells_are_listed():
    import pandas as pd

    df = pd.DataFrame([{"label": "a", "resolution": 224, "shape": "", "tokens": 3136, "batch": 1, "dtype": "bfloat16",
                        "mode": "forward", "status": "ok", "message": "", "noisy": False, "throttled": "sw_power_cap",
                        "latency_ms_iqr": 0.1, "latency_ms_median": 1.0}])
    assert summary.attention_lines(df) == ["throttled: a 224px (3136 tokens) bfloat16 forward batch 1: sw_power_cap"]


class FakeNVML:
    """A stand-in for pynvml: one GPU whose clock-event mask is whatever the test sets."""

    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 0, 1, 0

    def __init__(self, uuids=("GPU-aaaa", "GPU-bbbb")):
        self.uuids, self.mask, self.inits = list(uuids), 0x1, 0

    def nvmlInit(self):
        self.inits += 1

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, i):
        return self.uuids[i]

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid not in self.uuids:
            raise RuntimeError("NVML_ERROR_NOT_FOUND")
        return uuid

    def nvmlDeviceGetClockInfo(self, h, kind):
        return 1980 if kind == self.NVML_CLOCK_SM else 3201

    def nvmlDeviceGetPowerUsage(self, h):
        return 412_345  # milliwatts

    def nvmlDeviceGetTemperature(self, h, sensor):
        return 61

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return self.mask

    def nvmlDeviceGetName(self, h):
        return b"Fake H200"

    def nvmlSystemGetDriverVersion(self):
        return "580.159"

    def nvmlDeviceGetMaxClockInfo(self, h, kind):
        return 1980

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return 700_000

    def nvmlDeviceGetPersistenceMode(self, h):
        raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")  # a query that fails is None, not an error


def test_telemetry_reads_nvml_and_matches_torchs_gpu_by_uuid(monkeypatch):
    from attnbench.measure import env

    fake = FakeNVML()
    monkeypatch.setitem(__import__("sys").modules, "pynvml", fake)
    t = telemetry.Telemetry(0, uuid="bbbb")  # torch's device 0 is the driver's device 1
    assert t.available and t.matched_by == "uuid" and t.handle == "GPU-bbbb"
    fake.mask = 0x1 | 0x4
    assert t.snapshot() == {"available": True, "sm_clock_mhz": 1980, "mem_clock_mhz": 3201, "power_w": 412.345,
                            "power_method": "average", "temperature_c": 61, "clock_event_mask": 0x5,
                            "clock_event_reasons": ["gpu_idle", "sw_power_cap"]}
    assert telemetry.Telemetry(1, uuid="GPU-unknown").handle == "GPU-bbbb"  # unknown uuid: by index
    state = env.nvml_state(0, "aaaa")
    assert state["name"] == "Fake H200" and state["power_limit_w"] == 700.0 and state["persistence_mode"] is None
    assert state["matched_by"] == "uuid" and state["clock_event_reasons"] == ["gpu_idle", "sw_power_cap"]


def test_throttled_cell_is_recorded_and_warned(tmp_path, monkeypatch, capsys):
    from attnbench import cli

    fake = FakeNVML()
    monkeypatch.setitem(__import__("sys").modules, "pynvml", fake)
    fake.mask = 0x20  # software thermal slowdown, in every snapshot
    real_create = CellContext.create

    def create(settings, device, peaks=None, sentinel_start=None):  # a CPU run that reads the fake GPU's telemetry
        ctx = real_create(settings, device, peaks, sentinel_start)
        ctx.telemetry = telemetry.Telemetry(0)
        return ctx

    monkeypatch.setattr(CellContext, "create", create)
    path = suite_file(tmp_path, ["mha.sdpa"], filename="s.yaml")
    code = cli.main(["run", str(path), "--out", str(tmp_path / "r"), "--no-progress"])
    row = attnbench.load_results(tmp_path / "r").iloc[0]
    assert code == 0 and row["status"] == "ok" and row["telemetry"] == "nvml"
    assert row["throttled"] == "sw_thermal_slowdown"
    assert row["gpu_before_sm_clock_mhz"] == 1980 and row["gpu_after_temperature_c"] == 61
    assert row["gpu_after_clock_event_reasons"] == "sw_thermal_slowdown"
    assert "ran with the GPU throttled (sw_thermal_slowdown)" in capsys.readouterr().err


def test_sentinel_records_device_speed_and_flags_drift(tmp_path, monkeypatch, capsys):
    from attnbench import cli
    from attnbench.measure import cpuload

    assert peaks.sentinel_tflops(torch.device("cpu")) > 0
    monkeypatch.setattr(cpuload, "read", lambda: None)  # contention unknown: the sentinel alone decides
    # three readings at the start (the best is the reference), then one before and one after each cell:
    # the second cell ran slow throughout, the third saw one slow reading only (a blip, not drift), the
    # fourth ran faster than any reading before it (the reference rises: speeds never exceed 1)
    speeds = iter([0.9, 1.0, 0.8, 1.0, 1.0, 0.7, 0.7, 0.6, 1.0, 1.25, 1.25])
    monkeypatch.setattr(peaks, "sentinel_tflops", lambda device, repeats=5: next(speeds))
    path = suite_file(tmp_path, ["mha.sdpa"], resolution=(32, 48, 64, 80), filename="s.yaml")
    assert cli.main(["run", str(path), "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    df = attnbench.load_results(tmp_path / "r")
    assert list(df["sentinel_tflops_before"]) == [1.0, 0.7, 0.6, 1.25]
    assert list(df["device_speed_before"]) == [1.0, 0.7, 0.6, 1.0] and list(df["device_speed_after"]) == [1.0, 0.7, 1.0, 1.0]
    assert list(df["device_speed"]) == pytest.approx([1.0, 0.7, 0.6 ** 0.5, 1.0])
    assert list(df["drift"]) == [False, True, False, False]
    env = json.loads((tmp_path / "r" / "env.json").read_text())
    assert env["sentinel_tflops_start"] == 1.0 and env["sentinel_tflops_best"] == 1.25
    assert "1 cell(s) were measured slowed" in capsys.readouterr().err
    assert any(line.startswith("drift: mha.sdpa 48px") and "0.70x" in line for line in summary.attention_lines(df))


def test_a_slow_start_does_not_make_later_cells_look_fast(tmp_path, monkeypatch):
    from attnbench.measure import cpuload

    monkeypatch.setattr(cpuload, "read", lambda: None)
    # the machine was busy for the first readings (the 0.049 against 0.15 TFLOP/s), then quiet
    speeds = iter([0.05, 0.05, 0.05] + [0.15] * 8)
    monkeypatch.setattr(peaks, "sentinel_tflops", lambda device, repeats=5: next(speeds))
    rows = run_suite(suite(["mha.sdpa"], resolution=(32, 48, 64, 80)), out=tmp_path / "r", progress=False).rows
    assert all(r["device_speed"] <= 1.0 for r in rows) and not any(r["drift"] for r in rows)


def test_contention_during_the_timed_calls_is_drift(tmp_path, monkeypatch):
    from attnbench.measure import cpuload

    monkeypatch.setattr(peaks, "sentinel_tflops", lambda device, repeats=5: 1.0)  # the sentinel sees nothing
    others = iter([0.0, 1.6])  # cores other processes took during the two cells' timed calls
    monkeypatch.setattr(cpuload, "others_cores", lambda before, after: next(others))
    rows = run_suite(suite(["mha.sdpa"], resolution=(32, 48)), out=tmp_path / "r", progress=False).rows
    assert [r["drift"] for r in rows] == [False, True]
    assert rows[1]["cpu_others_cores"] == 1.6 and "1.60 CPU cores" in rows[1]["drift_reason"]


def test_sentinel_can_be_turned_off(tmp_path):
    res = run_suite(suite(["mha.sdpa"], timing={**FAST_TIMING, "sentinel": False}), out=tmp_path / "r", progress=False)
    assert "device_speed" not in res.rows[0]
    assert json.loads((res.run_dir / "env.json").read_text())["sentinel_tflops_start"] is None


# --- peaks and derived performance -----------------------------------------------------------------

def test_device_peaks_and_fraction(tmp_path):
    p = peaks.measure_peaks(torch.device("cpu"), ["float32"])
    assert p["matmul_tflops"]["float32"] > 0 and p["copy_gb_s"] > 0
    res = run_suite(suite(["mha.sdpa"], measure_peaks=True), out=tmp_path / "r", progress=False)
    env = json.loads((res.run_dir / "env.json").read_text())
    assert env["peaks"]["matmul_tflops"]["float32"] > 0
    row = res.rows[0]
    sec = row["latency_ms_median"] / 1e3
    assert row["tflops_achieved"] == pytest.approx(row["flops_torch"] / sec / 1e12)
    assert row["peak_fraction"] == pytest.approx(row["tflops_achieved"] / env["peaks"]["matmul_tflops"]["float32"])


# --- SDPA backend, compile, TF32, overhead -----------------------------------------------------------

def test_sdpa_backend_pinned_and_recorded(tmp_path):
    res = run_suite(suite(["mha.sdpa"], sdpa_backend="math"), out=tmp_path / "a", progress=False)
    assert res.rows[0]["status"] == "ok" and res.rows[0]["sdpa_backend"] == "math"
    if not torch.cuda.is_available():  # no memory-efficient kernel on CPU: a clear skip, not a crash
        res = run_suite(suite(["mha.sdpa"], sdpa_backend="efficient"), out=tmp_path / "b", progress=False)
        assert res.rows[0]["status"] == "unsupported" and "sdpa_backend efficient" in res.rows[0]["message"]


@pytest.mark.slow
def test_compile_runs_for_real(tmp_path):
    res = run_suite(suite(["mha.sdpa"], compile=True), out=tmp_path / "r", progress=False)
    row = res.rows[0]
    assert row["status"] == "ok" and row["compiled"] is True and row["compile_s"] > 0
    assert FAST_TIMING["min_repeats"] <= row["latency_n"] <= FAST_TIMING["max_repeats"]


def test_compile_time_recorded_apart_and_outside_the_budget(tmp_path, monkeypatch, scripted_calls):
    """The first call of a compiled module (the compilation: 5 s here) is compile_s, in neither the samples
    nor the budget: a cell budget of 2 s still measures the 10 ms calls after it."""
    import itertools

    import torch._dynamo

    compiled = []

    def fake_compile(module, *args, **kwargs):
        compiled.append(type(module).__name__)
        assert kwargs.get("dynamic") is False  # each cell its own static program
        torch._dynamo.utils.counters["stats"]["unique_graphs"] += 1  # as a real compilation would
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    costs = itertools.chain([5.0], itertools.repeat(0.01))
    scripted_calls.cost = lambda module, x: next(costs)
    row = run_suite(suite(["toy.proj"], compile=True, budget={"cell_time_s": 2.0},
                          timing={**FAST_TIMING, "sentinel": False}), out=tmp_path / "r", progress=False).rows[0]
    assert compiled == ["ToyProj"]
    assert row["status"] == "ok" and row["compiled"] is True, row["message"]
    assert row["compile_s"] == pytest.approx(5.0)
    assert row["latency_ms_samples"] == [10.0] * row["latency_n"] and row["latency_n"] == FAST_TIMING["min_repeats"]
    assert row["warmup_calls"] == 2  # the first call after the compilation and one warm-up call


@pytest.mark.parametrize("warmup_s,calls", [(0.0, 2), (0.1, 17), (0.5, 65)])
def test_warmup_by_time(tmp_path, scripted_calls, warmup_s, calls):
    """10 ms calls: after the first call, warm-up makes one call, then doubles (1, 1, 2, 4, ...) until its
    calls add up to warmup_s: 0.1 s takes 16 calls (0.16 s), 0.5 s 64 (0.64 s), 0 s the one call."""
    scripted_calls.cost = lambda module, x: 0.01
    row = run_suite(suite(["toy.proj"], timing={**FAST_TIMING, "warmup_s": warmup_s, "sentinel": False}),
                    out=tmp_path / "r", progress=False).rows[0]
    assert row["status"] == "ok" and row["warmup_calls"] == calls
    # every call is accounted for: the warm-up (first included), the peak-memory call, the timed calls
    assert len(scripted_calls.calls) == calls + 1 + row["latency_n"]
    assert row["measure_s"] == pytest.approx(0.01 * len(scripted_calls.calls))
    assert row["latency_ms_samples"] == [10.0] * row["latency_n"]


def test_overhead_is_accounted(tmp_path):
    res = run_suite(suite(["mha.sdpa", "sra.conv"], resolution=(32, 64)), out=tmp_path / "r", progress=False)
    o = json.loads((res.run_dir / "run.jsonl").read_text().splitlines()[-1])
    assert o == res.overhead and o["cells_measured"] == 4
    assert 0 < o["harness_s"] < o["wall_s"] and 0 < o["harness_fraction"] < 1
    assert o["measure_s"] + o["harness_s"] == pytest.approx(o["wall_s"])
    assert o["measure_s"] == pytest.approx(sum(r["measure_s"] for r in res.rows))
    assert o["cells_harness_s"] + o["peaks_s"] + o["other_s"] == pytest.approx(o["harness_s"])
    for r in res.rows:
        assert r["measure_s"] > 0 and r["harness_s"] > 0
        assert r["measure_s"] + r["harness_s"] == pytest.approx(r["cell_wall_s"])
        assert r["measure_s"] >= sum(r["latency_ms_samples"]) / 1e3  # the timed calls are inside it
    assert all(r["cpu_threads"] == torch.get_num_threads() for r in res.rows)


# --- GPU ------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_flush_graph_and_telemetry(tmp_path):
    s = suite(["mha.sdpa"], device="cuda", resolution=(64, 128), measure_peaks=True,
              timing={**FAST_TIMING, "cuda_graph": True, "l2_flush": True})
    res = run_suite(s, out=tmp_path / "r", progress=False)
    env = json.loads((res.run_dir / "env.json").read_text())
    for row in res.rows:
        assert row["status"] == "ok", row["message"]
        assert row["timing_method"] == "cuda_graph_replay" and row["l2_flush"] is True
        # the cells read the GPU through NVML exactly when the environment record could
        assert row["telemetry"] == ("nvml" if env["nvml"]["available"] else "absent")
        # a fraction of the peak is at most 1, unless the cell beat even a re-measured peak (flagged)
        assert row["over_peak"] == (row["tflops_achieved"] > row["peak_tflops"])
        assert 0 < row["peak_fraction"] and (row["peak_fraction"] <= 1 or row["over_peak"])


def count_backward(monkeypatch) -> list[int]:
    """Count calls of Tensor.backward on real tensors (not the meta device's FLOP counting and memory
    tracing) from now on: the returned list's length."""
    calls = []
    real = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        if self.device.type != "meta":
            calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "backward", backward)
    return calls


def backward_per_row(impls, monkeypatch, tmp_path, **kw):
    """Run ``impls`` in forward and train mode; each row with the number of backward calls its cell made."""
    calls = count_backward(monkeypatch)
    seen = []

    def on_row(row):
        seen.append((row, len(calls) - sum(n for _, n in seen)))

    run_suite(suite(impls, mode=["forward", "train"], **kw), out=tmp_path / "r", progress=False, on_row=on_row)
    return seen


def calls_of_cell(row) -> int:
    """The measured calls a cell made: the first and the warm-up calls (``warmup_calls``), the peak-memory
    call, the timed calls and, on CUDA, the steady-state blocks (``STEADY_BLOCKS`` x ``steady_calls``)."""
    return row["warmup_calls"] + 1 + row["latency_n"] + timing.STEADY_BLOCKS * row.get("steady_calls", 0)


def test_calls_of_cell_counts_the_steady_blocks():
    """The steady phase (CUDA only in a cell) run on the CPU: its calls are what calls_of_cell adds."""
    from attnbench import cell

    calls = []
    cols = cell.steady_state(lambda: calls.append(1), torch.device("cpu"), [1.0] * 5, 1e-3, 0.05)
    assert cols["steady_calls"] == 10 and len(calls) == 50
    assert calls_of_cell({"warmup_calls": 2, "latency_n": 5, **cols}) - (2 + 1 + 5) == len(calls)


@pytest.mark.gpu
def test_gpu_train_mode_runs_backward_and_holds_more_memory(tmp_path, monkeypatch):
    rows = backward_per_row(["mha.math", "mha.sdpa"], monkeypatch, tmp_path, device="cuda", resolution=(128,))
    by = {(r["impl"], r["mode"]): (r, n) for r, n in rows}
    for impl in ("mha.math", "mha.sdpa"):
        (fwd, n_fwd), (train, n_train) = by[(impl, "forward")], by[(impl, "train")]
        assert fwd["status"] == train["status"] == "ok"
        assert n_fwd == 0 and n_train == calls_of_cell(train)  # steady-state blocks included (CUDA)
        assert train["peak_mem_bytes"] > fwd["peak_mem_bytes"]  # the allocator's peak: exact, not timing


def test_train_mode_measures_forward_and_backward(tmp_path, monkeypatch):
    """Train mode's measured call runs the backward pass: every one of its calls (first, warm-up, peak memory,
    timed) calls backward once, forward mode's never; its FLOPs count both passes."""
    rows = backward_per_row(["mha.math"], monkeypatch, tmp_path, resolution=(128,))
    (fwd, n_fwd), (train, n_train) = rows
    assert (fwd["mode"], train["mode"]) == ("forward", "train")
    assert fwd["status"] == train["status"] == "ok"
    assert n_fwd == 0 and n_train == calls_of_cell(train) == train["warmup_calls"] + 1 + train["latency_n"]
    assert "flops_torch_fwd_bwd" not in fwd or fwd["flops_torch_fwd_bwd"] is None
    assert train["flops_torch_fwd_bwd"] > train["flops_torch"] == fwd["flops_torch"]
    # achieved TFLOP/s in train mode are taken over the forward + backward count
    assert train["tflops_achieved"] == pytest.approx(train["flops_torch_fwd_bwd"] / (train["latency_ms_median"] / 1e3)
                                                     / 1e12)
    # backward keeps the (h, N, N) softmax for the gradient (memory, not timing)
    if train["peak_mem_method"] == "rss_hwm_delta":
        assert train["peak_mem_bytes"] > fwd["peak_mem_bytes"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_check_timing_without_gpu_says_so(tmp_path):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "check_timing.py"), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "needs a CUDA GPU" in p.stderr and "--device cpu" in p.stderr
    assert "Traceback" not in p.stderr


def test_a_cell_faster_than_the_peak_measures_the_peak_again(tmp_path, monkeypatch):
    readings = iter([1e-6, 50.0])  # the start's slow reading, then the refresh
    monkeypatch.setattr(peaks, "matmul_tflops", lambda device, dtype, repeats=None: next(readings))
    res = run_suite(suite(["mha.sdpa"], resolution=(32, 48), measure_peaks=True), out=tmp_path / "r", progress=False)
    assert all(r["peak_tflops"] == 50.0 and 0 < r["peak_fraction"] < 1 and not r["over_peak"] for r in res.rows)
    env = json.loads((res.run_dir / "env.json").read_text())
    assert env["peaks"]["matmul_tflops"]["float32"] == 50.0
    assert env["peaks"]["refreshed"] == [{"dtype": "float32", "from": 1e-6, "to": 50.0}]


def test_a_cell_still_above_the_peak_is_flagged(tmp_path, monkeypatch, capsys):
    from attnbench import cli

    monkeypatch.setattr(peaks, "matmul_tflops", lambda device, dtype, repeats=None: 1e-6)  # never fast enough
    path = suite_file(tmp_path, ["mha.sdpa"], resolution=(32,), filename="s.yaml", measure_peaks=True)
    assert cli.main(["run", str(path), "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    row = attnbench.load_results(tmp_path / "r").iloc[0]
    assert row["over_peak"] == True and row["peak_fraction"] > 1  # noqa: E712
    captured = capsys.readouterr()
    assert "above the device's matmul peak" in captured.out and "over_peak" in captured.err


def test_each_compiled_cell_gets_a_fresh_cache_and_eager_fallback_is_an_error(tmp_path, monkeypatch, scripted_calls):
    import torch._dynamo

    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    graphs = iter([1, 0])  # the second cell's compilation produces no graph: dynamo ran it eagerly

    def fake_compile(module, *args, **kwargs):
        torch._dynamo.utils.counters["stats"]["unique_graphs"] += next(graphs)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    scripted_calls.cost = lambda module, x: 0.01
    rows = run_suite(suite(["toy.proj"], resolution=(32, 48), compile=True, timing={**FAST_TIMING, "sentinel": False}),
                     out=tmp_path / "r", progress=False).rows
    assert len(resets) == 2  # one fresh dynamo cache per cell
    assert rows[0]["status"] == "ok"
    assert rows[1]["status"] == "error" and "ran eagerly" in rows[1]["message"]
