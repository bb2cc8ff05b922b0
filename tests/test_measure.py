"""Statistics, the noisy flag, CPU peak memory, timing calls, the environment record without NVML."""

import numpy as np
import pytest
import torch

from attnbench.measure import env, memory, timing


def test_summary_statistics():
    s = timing.summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["latency_ms_median"] == 3.0
    assert s["latency_ms_iqr"] == pytest.approx(np.percentile([1, 2, 3, 4, 100], 75) - 2.0)
    assert s["latency_ms_min"] == 1.0 and s["latency_n"] == 5
    assert s["latency_ms_p10"] < s["latency_ms_median"] < s["latency_ms_p90"]


def test_noisy_flag_threshold():
    steady = [10.0, 10.1, 10.2, 9.9, 10.0, 10.05]
    assert timing.summarize(steady)["noisy"] is False
    noisy = [10.0, 14.0, 8.0, 12.5, 9.0, 13.0]
    assert timing.summarize(noisy)["noisy"] is True


def test_time_calls_cpu():
    calls = []
    samples = timing.time_calls(lambda: calls.append(1), torch.device("cpu"), 7)
    assert len(samples) == 7 == len(calls) and all(s >= 0 for s in samples)


def test_time_calls_cuda_events_order(monkeypatch):
    """The CUDA path without a GPU: fake events show the flush runs before each call's start event,
    outside the timed interval, and the device is synchronised only before and after the batch."""
    log = []

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.t = None

        def record(self):
            self.t = len(log)
            log.append("record")

        def elapsed_time(self, end):  # "milliseconds" = log entries between the two events
            return float(end.t - self.t)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("sync"))
    samples = timing.time_calls(lambda: log.append("call"), torch.device("cuda"), 3,
                                flush=lambda: log.append("flush"))
    assert log == ["sync"] + ["flush", "record", "call", "record"] * 3 + ["sync"]
    assert samples == [2.0, 2.0, 2.0]  # each interval holds the call alone


@pytest.mark.skipif(memory.cpu_method() != memory.CPU_METHOD, reason="needs /proc/self/clear_refs")
@pytest.mark.parametrize("mib", [8, 64])
def test_cpu_peak_memory_sees_a_temporary(mib):
    n = mib * 2**20 // 4

    def fn():
        t = torch.ones(n)  # written, so every page is resident
        t.add_(1)
        del t

    fn()
    peak, method = memory.peak_memory_bytes(fn, torch.device("cpu"))
    assert method == "rss_hwm_delta"
    assert mib * 2**20 * 0.95 <= peak <= mib * 2**20 * 1.25, peak / 2**20


@pytest.mark.skipif(memory.cpu_method() != memory.CPU_METHOD, reason="needs /proc/self/clear_refs")
def test_cpu_peak_memory_after_heap_reuse():
    """Memory freed earlier (and kept by the allocator) must not hide the call's own allocations."""
    for _ in range(3):
        a = [torch.ones(2**18) for _ in range(32)]  # 32 x 1 MiB
        del a
    peak, _ = memory.peak_memory_bytes(lambda: [torch.ones(2**18) for _ in range(32)], torch.device("cpu"))
    assert peak >= 30 * 2**20


def test_env_without_nvml_is_recorded(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pynvml(name, *a, **k):
        if name == "pynvml":
            raise ImportError("no pynvml here")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_pynvml)
    state = env.nvml_state()
    assert state["available"] is False and "pynvml" in state["reason"]
    record = env.collect_env(torch.device("cpu"))
    assert record["device"] == "cpu" and record["torch"]["num_threads"] >= 1
    assert record["cpu"]["model"]
