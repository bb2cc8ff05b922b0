"""GPU timing without a GPU: steady-state blocks, the launch-bound flag, the CUDA-graph fallback, the
time-based warm-up of the device peaks and the sentinel, the time-budgeted repeat count. CUDA is faked
(events, synchronisation, graphs and a clock) as in test_measure's event-order test."""

import math

import pytest
import torch

from attnbench.measure import peaks, timing

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


@pytest.fixture
def fake_cuda(monkeypatch):
    """Fake CUDA events and synchronisation; returns the log of what happened, in order. An event's
    ``elapsed_time`` is scripted: the number of ``call`` entries between the two events, times 2 ms."""
    log: list[str] = []

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.at = None

        def record(self):
            self.at = len(log)
            log.append("record")

        def elapsed_time(self, end):
            return 2.0 * log[self.at:end.at].count("call")

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("sync"))
    return log


# --- 1. steady state and the launch-bound flag -----------------------------------------------------

def test_time_steady_records_events_only_at_block_boundaries(fake_cuda):
    log = fake_cuda
    samples = timing.time_steady(lambda: log.append("call"), CUDA, n=4, repeats=3)
    # no flush, no synchronisation inside or between blocks: one event per block boundary
    assert log == ["sync", "record"] + (["call"] * 4 + ["record"]) * 3 + ["sync"]
    assert samples == [2.0, 2.0, 2.0]  # 4 calls x 2 ms per block, over 4 calls


def test_time_steady_gives_total_over_n_per_block(monkeypatch):
    """Scripted block totals: each sample is its block's elapsed time over n."""
    totals = iter([10.0, 12.0, 30.0])

    class Event:
        def __init__(self, enable_timing=False):
            pass

        def record(self):
            pass

        def elapsed_time(self, end):
            return next(totals)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    assert timing.time_steady(lambda: None, CUDA, n=5, repeats=3) == [2.0, 2.4, 6.0]


def test_time_steady_cpu_one_sample_per_block():
    calls = []
    samples = timing.time_steady(lambda: calls.append(1), CPU, n=6, repeats=4)
    assert len(calls) == 24 and len(samples) == 4 and all(s >= 0 for s in samples)


def test_time_calls_with_flush_hides_what_steady_shows(fake_cuda):
    """The flushed per-call events hold the call alone; the steady blocks hold back-to-back calls."""
    log = fake_cuda
    flushed = timing.time_calls(lambda: log.append("call"), CUDA, 3, flush=lambda: log.append("flush"))
    assert "flush" in log and flushed == [2.0] * 3
    log.clear()
    timing.time_steady(lambda: log.append("call"), CUDA, n=3, repeats=2)
    assert "flush" not in log and log.count("sync") == 2


@pytest.mark.parametrize("flushed,steady,want", [
    (0.010, 0.050, True),    # launches cannot keep up: 5x
    (0.010, 0.0121, True),   # just over 20%
    (0.010, 0.0119, False),  # just under
    (1.00, 1.02, False),     # GPU-bound: the same
    (0.10, 0.05, False),     # steady faster: the warm L2, not launch overhead
    (math.nan, 0.05, False),
])
def test_launch_bound(flushed, steady, want):
    assert timing.launch_bound(flushed, steady) is want


def test_launch_bound_tolerance():
    assert timing.launch_bound(1.0, 1.3, tolerance=0.5) is False
    assert timing.launch_bound(1.0, 1.6, tolerance=0.5) is True


@pytest.mark.parametrize("est,total,want", [
    (1e-3, 0.1, 20),        # 5 blocks of 20 ms: 20 calls of 1 ms
    (1e-7, 0.1, 2000),      # at most MAX_CALLS_HARD calls in all
    (0.015, 0.1, 1),        # a call per block at least...
    (0.03, 0.1, None),      # ...and no plan when 5 calls do not fit
])
def test_steady_calls(est, total, want):
    assert timing.steady_calls(est, total) == want


# --- 2. a module that cannot be captured falls back to CUDA events --------------------------------

@pytest.fixture
def fake_graph_cuda(monkeypatch, fake_cuda):
    """Fake streams and graphs; ``state["fail"]`` makes capture raise, ``state["exit_fail"]`` makes the
    end of capture raise its own error too (as torch's does after a failed capture)."""
    log = fake_cuda
    state = {"fail": None, "exit_fail": None}

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    class StreamContext:
        def __init__(self, stream):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class CUDAGraph:
        def capture_begin(self):
            log.append("capture_begin")
            if state["fail"]:
                raise state["fail"]

        def capture_end(self):
            log.append("capture_end")
            if state["exit_fail"]:
                raise state["exit_fail"]

        def replay(self):
            log.append("replay")

    class Graph:  # torch.cuda.graph: begin on entry, end on exit (also after an error inside)
        def __init__(self, graph, stream=None):
            self.graph = graph

        def __enter__(self):
            self.graph.capture_begin()

        def __exit__(self, *exc):
            self.graph.capture_end()
            return False

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", StreamContext)
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", CUDAGraph)
    monkeypatch.setattr(torch.cuda, "graph", Graph)
    return log, state


def test_capture_graph_replays_when_capture_works(fake_graph_cuda):
    log, _ = fake_graph_cuda
    replay = timing.capture_graph(lambda: log.append("call"), CUDA, warmup=2)
    replay()
    assert log == ["call", "call", "capture_begin", "call", "capture_end", "sync", "replay"]
    timed, method = timing.graph_or_events(lambda: None, CUDA)
    assert method == "cuda_graph_replay" and timed.__name__ == "replay"


def test_capture_failure_is_typed(fake_graph_cuda):
    _, state = fake_graph_cuda
    state["fail"] = RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")
    with pytest.raises(timing.GraphCaptureError) as info:
        timing.capture_graph(lambda: None, CUDA)
    assert info.value.reason == "RuntimeError: CUDA error: operation not permitted when stream is capturing"
    assert isinstance(info.value, RuntimeError)  # callers catching RuntimeError still do


def test_failed_capture_falls_back_to_cuda_events(fake_graph_cuda):
    log, state = fake_graph_cuda
    state["fail"] = ValueError("a host sync inside the module")
    call = lambda: log.append("call")
    timed, method = timing.graph_or_events(call, CUDA)
    assert timed is call
    assert method == "cuda_events (graph capture failed: ValueError: a host sync inside the module)"
    assert log[-1] == "sync"  # the device synchronised after the failed capture
    log.clear()
    assert timing.time_calls(timed, CUDA, 2) == [2.0, 2.0]  # and the call is timed with events


def test_fallback_names_the_first_error_not_the_cleanups(fake_graph_cuda):
    _, state = fake_graph_cuda
    state["fail"] = TypeError("the module's own problem")
    state["exit_fail"] = RuntimeError("operation failed due to a previous error during capture")
    _, method = timing.graph_or_events(lambda: None, CUDA)
    assert method == "cuda_events (graph capture failed: TypeError: the module's own problem)"


def test_capture_needs_cuda_and_cpu_falls_back_to_perf_counter():
    with pytest.raises(timing.GraphCaptureError, match="CUDA device"):
        timing.capture_graph(lambda: None, CPU)
    call = lambda: None
    assert timing.graph_or_events(call, CPU) == (call, "perf_counter")


# --- 3. peaks and the sentinel warm up by time -----------------------------------------------------

@pytest.fixture
def fake_clock(monkeypatch):
    """peaks' clock, advanced only by the fake work: each ``work()`` takes ``state["call_s"]``."""
    state = {"now": 100.0, "call_s": 0.003, "calls": 0}
    monkeypatch.setattr(peaks, "perf_counter", lambda: state["now"])

    def work():
        state["now"] += state["call_s"]
        state["calls"] += 1

    return state, work


def test_warm_runs_until_the_time_is_reached_on_cuda(fake_cuda, fake_clock):
    state, work = fake_clock
    log = fake_cuda
    calls = peaks._warm(work, CUDA, peaks.WARMUP_S)
    assert calls == state["calls"] == math.ceil(peaks.WARMUP_S / state["call_s"] - 1e-9)  # 34 calls of 3 ms
    assert state["now"] - 100.0 >= peaks.WARMUP_S
    assert log == ["sync"] * (calls + 1)  # synchronised before, and after every call: device time counted


def test_warm_is_short_on_cpu(fake_clock):
    state, work = fake_clock
    assert peaks.warmup_s(CPU) == peaks.CPU_WARMUP_S < peaks.WARMUP_S == peaks.warmup_s(CUDA)
    state["call_s"] = 0.0012
    assert peaks._warm(work, CPU, peaks.warmup_s(CPU)) == 5  # 0.005 s of 1.2 ms calls
    state["call_s"] = 0.5
    assert peaks._warm(work, CPU, peaks.warmup_s(CPU)) == peaks.WARMUP_MIN_CALLS  # a slow call: two


def test_peak_and_sentinel_timing_warm_up_by_time_first(fake_cuda, fake_clock):
    """_best_ms / _median_ms (the matmul peak, the copy and the sentinel) on a fake GPU: ~0.1 s of
    calls, then the timed ones."""
    state, work = fake_clock
    log = fake_cuda

    def call():
        work()
        log.append("call")

    assert peaks._best_ms(call, CUDA, 5) == 2.0
    warm = math.ceil(peaks.WARMUP_S / state["call_s"] - 1e-9)
    assert state["calls"] == warm + 5
    state["calls"] = 0
    assert peaks._median_ms(call, CUDA, 3) == 2.0 and state["calls"] == warm + 3


def test_sentinel_on_cpu_warms_with_the_cpu_time(monkeypatch):
    seen = []
    monkeypatch.setattr(peaks, "_warm", lambda fn, device, seconds: seen.append(seconds))
    assert peaks.sentinel_tflops(CPU, repeats=2) > 0
    assert seen == [peaks.CPU_WARMUP_S]


# --- 4. fast calls get more than max_repeats, within the time left -------------------------------

@pytest.mark.parametrize("est,remaining,kw,want", [
    (1e-6, 100, {}, 1000),                             # today's behaviour by default: max_repeats
    (1e-5, 100, {"min_sample_s": 0.05}, 5000),         # 10 us calls: 0.05 s of samples
    (1e-6, 100, {"min_sample_s": 0.05}, 10000),        # ...capped by the hard cap
    (1e-6, 100, {"min_sample_s": 0.05, "hard_cap": 2000}, 2000),
    (1e-5, 0.02, {"min_sample_s": 0.05}, 2000),        # ...and by the time left
    (1e-3, 100, {"min_sample_s": 0.05}, 500),          # max_repeats calls span enough already
    (1e-5, 0.02, {"min_sample_s": 0.05, "overhead_s": 9e-5}, 200),  # a 90 us flush per call counts
    (1e-3, 0.003, {"overhead_s": 1e-3}, None),         # min_repeats with their flushes do not fit
])
def test_plan_repeats_by_time(est, remaining, kw, want):
    assert timing.plan_repeats(est, target_s=0.5, min_repeats=2, max_repeats=1000, remaining_s=remaining,
                               **kw) == want


def test_min_sample_never_exceeds_the_target():
    """A short target (a quick test suite) is not stretched by min_sample_s."""
    assert timing.plan_repeats(1e-5, 0.01, 2, 100, 30.0, min_sample_s=0.1) == 1000


def test_plan_repeats_default_unchanged_for_fast_cells():
    """max_repeats 100 and 10 us calls: 1 ms of samples today; 0.1 s with min_sample_s."""
    assert timing.plan_repeats(1e-5, 0.5, 5, 100, 30.0) == 100
    assert timing.plan_repeats(1e-5, 0.5, 5, 100, 30.0, min_sample_s=0.1) == 10000


# --- 5. the steady state in a whole cell: measure_cell on a faked CUDA device ---------------------

FLUSHED_MS = [2.0, 1.9, 2.3, 2.0, 2.1, 1.8]  # the warm-up call, then the 5 timed calls (FAST_TIMING): median 2.0


@pytest.fixture
def cuda_cell(monkeypatch, fake_graph_cuda):
    """``measure(steady_ms, flushed_ms=FLUSHED_MS, **timing)``: one toy.proj cell measured by
    :func:`attnbench.cell.measure_cell` on a faked CUDA device (its module and input stay on the CPU), CUDA
    events scripted: a flushed call's window (one call) takes the next of ``flushed_ms``; block k of the
    steady phase takes ``steady_ms[k]`` per call in it. Returns the row and what happened: ``log`` (calls,
    graph replays, flushes, events, syncs, in order), ``steady_log`` (the part inside
    :func:`attnbench.cell.steady_state`), ``blocks`` (the calls each steady window held),
    ``flushed_windows`` (the calls each other window held)."""
    import dataclasses

    from conftest import FAST_TIMING, make_suite

    from attnbench import cell
    from attnbench.context import CellContext
    from attnbench.job import CellSettings, Job
    from attnbench.runner import prepare

    log, _ = fake_graph_cuda
    seen = {"phase": None, "steady": [], "flushed": iter(()), "blocks": [], "flushed_windows": [], "steady_log": None,
            "log": log}

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.at = self.phase = None

        def record(self):
            self.at, self.phase = len(log), seen["phase"]
            log.append("record")

        def elapsed_time(self, end):
            calls = sum(e in ("call", "replay") for e in log[self.at:end.at])
            if end.phase == "steady":
                seen["blocks"].append(calls)
                return seen["steady"][len(seen["blocks"]) - 1] * calls
            seen["flushed_windows"].append(calls)
            return next(seen["flushed"]) * calls

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (64 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 4096)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    from attnbench import device as device_mod

    monkeypatch.setitem(device_mod._dtype_problems, ("float32", "cuda"), None)  # the cell's dtype probe: runs

    real_builder, real_input, real_make_call, real_steady = (cell.module_builder, cell.random_input, cell.make_call,
                                                             cell.steady_state)

    def module_builder(case):  # built for "cuda", kept on the CPU: .to(device=...) keeps the dtype only
        build = real_builder(case)

        def built():
            module = build()
            module.to = lambda *a, device=None, **k: torch.nn.Module.to(module, *a, **k)
            return module

        return built

    def make_call(module, x, mode):
        call = real_make_call(module, x, mode)

        def logged():
            call()
            log.append("call")

        return logged

    def steady_state(*args, **kwargs):
        seen["phase"], start = "steady", len(log)
        try:
            return real_steady(*args, **kwargs)
        finally:
            seen["phase"], seen["steady_log"] = None, log[start:]

    monkeypatch.setattr(cell, "module_builder", module_builder)
    monkeypatch.setattr(cell, "random_input", lambda case, batch, seed: real_input(
        dataclasses.replace(case, device="cpu"), batch, seed))
    monkeypatch.setattr(cell, "make_call", make_call)
    monkeypatch.setattr(cell, "steady_state", steady_state)

    def measure(steady_ms, flushed_ms=FLUSHED_MS, **timing_kw):
        suite = make_suite(["toy.proj"], timing={**FAST_TIMING, "sentinel": False, **timing_kw})
        _suite, _dev, cases = prepare(suite)
        case = dataclasses.replace(cases[0], device="cuda")
        log.clear()
        seen.update(steady=list(steady_ms), flushed=iter(flushed_ms), blocks=[], flushed_windows=[], steady_log=None)
        ctx = CellContext(device=CUDA, flush=lambda: log.append("flush"))
        row = cell.measure_cell(Job(case=case, settings=CellSettings.from_suite(suite.model)), ctx)
        assert row["status"] == "ok", row["message"]
        return row, seen

    return measure


@pytest.mark.parametrize("cuda_graph", [False, True])
@pytest.mark.parametrize("steady_ms,want_median,want_bound", [
    ([3.0, 2.6, 2.5, 9.0, 2.45], 2.6, True),    # 30% above the flushed median of 2.0 ms: launch-bound
    ([2.0, 2.2, 2.3, 9.0, 1.5], 2.2, False),    # 10% above: within the tolerance
    ([2.5, 2.45, 2.3, 2.2, 2.41], 2.41, True),  # just over 20%
    ([2.5, 2.39, 2.3, 2.2, 2.45], 2.39, False),  # just under
    ([1.2, 1.1, 1.0, 1.3, 1.25], 1.2, False),   # faster than flushed: the warm cache, not launches
])
def test_cell_steady_state_columns_from_scripted_events(cuda_cell, cuda_graph, steady_ms, want_median, want_bound):
    row, seen = cuda_cell(steady_ms, steady_s=0.1, cuda_graph=cuda_graph)
    assert row["timing_method"] == ("cuda_graph_replay" if cuda_graph else "cuda_events") and row["l2_flush"] is True
    # the flushed samples are the scripted ones: one call per pair of events, median 2.0 ms
    assert row["latency_ms_samples"] == FLUSHED_MS[1:] and row["latency_ms_median"] == 2.0
    assert seen["flushed_windows"] == [1] * len(FLUSHED_MS)
    # 5 blocks of 0.1 s / 5 / 2 ms = 10 back-to-back calls each; one event per block boundary
    per_block = row["steady_calls"]
    assert per_block == 10 == timing.steady_calls(2e-3, 0.1) and seen["blocks"] == [per_block] * timing.STEADY_BLOCKS
    # each sample is the block's time over its calls; the median over the blocks
    block_ms = [ms * n for ms, n in zip(steady_ms, seen["blocks"])]
    assert row["latency_steady_ms_samples"] == pytest.approx([t / per_block for t in block_ms])
    assert row["latency_steady_ms_median"] == pytest.approx(want_median)
    assert row["launch_bound"] is want_bound
    assert want_bound is (want_median > 1.2 * row["latency_ms_median"])


def test_cell_launch_bound_is_judged_against_the_reported_flushed_median(cuda_cell):
    """An even number of timed calls: the flag compares with the row's latency_ms_median (the mean of the
    two middle samples), not with the upper of them."""
    row, _ = cuda_cell([2.5] * 5, flushed_ms=[2.0, 1.0, 1.0, 3.0, 3.0], steady_s=0.1, min_repeats=4, max_repeats=4)
    assert row["latency_n"] == 4 and row["latency_ms_median"] == 2.0
    assert row["latency_steady_ms_median"] == pytest.approx(2.5) and row["launch_bound"] is True  # 25% above 2.0


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_cell_flushes_the_timed_calls_never_the_steady_blocks(cuda_cell, cuda_graph):
    """The fake flush is the cell's (one timed alone for the budget, then one before each timed call,
    outside its events); none inside the steady phase, and no synchronisation between its calls."""
    row, seen = cuda_cell([2.0] * 5, steady_s=0.1, cuda_graph=cuda_graph)
    log, steady, n = seen["log"], seen["steady_log"], row["steady_calls"]
    unit = "replay" if cuda_graph else "call"
    timed = (["flush", "record", unit, "record"] * row["latency_n"])
    start = next(i for i in range(len(log)) if log[i:i + len(timed)] == timed)  # the timed calls, each flushed
    assert log.count("flush") == 1 + row["latency_n"] and "flush" not in log[start + len(timed):]
    assert steady == ["sync", "record"] + ([unit] * n + ["record"]) * timing.STEADY_BLOCKS + ["sync"]


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_cell_without_steady_s_has_no_steady_columns(cuda_cell, cuda_graph):
    row, seen = cuda_cell([2.0] * 5, steady_s=0.0, cuda_graph=cuda_graph)
    assert seen["steady_log"] is None and seen["blocks"] == []  # the steady phase never ran
    for col in ("latency_steady_ms_median", "latency_steady_ms_samples", "steady_calls", "launch_bound"):
        assert col not in row
    assert row["latency_ms_median"] == 2.0  # the flushed samples as with it


def test_cell_steady_phase_skipped_when_one_call_per_block_does_not_fit(cuda_cell):
    """steady_s too short for 5 calls of 2 ms: no blocks, no steady columns."""
    row, seen = cuda_cell([2.0] * 5, steady_s=0.009)
    assert seen["steady_log"] is not None and seen["blocks"] == [] and "steady_calls" not in row


def test_cpu_cell_has_no_steady_columns(tmp_path):
    """The steady phase is the GPU's (a CPU call is synchronous: its timed calls are back to back already)."""
    from conftest import FAST_TIMING, make_suite

    from attnbench.runner import run_suite

    row = run_suite(make_suite(["toy.proj"], timing={**FAST_TIMING, "sentinel": False, "steady_s": 0.1}),
                    out=tmp_path / "r", progress=False).rows[0]
    assert row["status"] == "ok" and "steady_calls" not in row and "launch_bound" not in row
