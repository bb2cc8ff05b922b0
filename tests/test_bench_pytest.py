"""Attention benchmarks through pytest-benchmark's ``benchmark`` fixture (copy this file to start).

The parametrised test below is the example: it times each implementation at a tiny shape on the
CPU (``device="auto"`` uses the GPU when there is one, with a synchronised timer). Run it with
pytest-benchmark's own options, e.g.::

    pytest tests/test_bench_pytest.py --benchmark-autosave                 # store a run
    pytest tests/test_bench_pytest.py --benchmark-compare --benchmark-compare-fail=median:50%
    pytest tests/test_bench_pytest.py --benchmark-json=out.json

The other tests check that path itself: the recorded stats are the timed call's, the timer and the
call wait for the device, JSON output, and ``--benchmark-compare-fail`` passing on an unchanged
function and failing on a planted slowdown (in subprocesses, on a deterministic clock).
"""

import json
import os
import subprocess
import sys
import time
import types

import pytest
import torch

import attnbench
from attnbench import bench as bench_mod
from attnbench.bench import BenchSetupError, attention_call, bench_attention, synchronized_timer
from attnbench.impls.local import LocalSlide
from attnbench.measure import timing
from conftest import ROOT

TINY = {"dim": 16, "heads": 2, "patch": 4, "batch": 1, "device": "cpu"}


@pytest.mark.parametrize("impl,params", [
    ("mha.sdpa", {}),
    ("sra.conv", {"sr_ratio": 2}),
    ("swin.window", {"window": 4}),
])
def test_attention_benchmark(benchmark, impl, params):
    call = bench_attention(benchmark, impl, resolution=32, params=params, rounds=10, warmup_rounds=2, **TINY)
    info = benchmark.extra_info
    assert info == call.info  # the cell, as the JSON output records it
    assert info["attnbench_impl"] == impl and info["params"] == params and info["tokens"] == 64
    assert info["flops_analytic"] == call.module.flops_analytic(1, 8, 8) > 0
    assert info["params_count"] == sum(p.numel() for p in call.module.parameters())
    assert benchmark.group == "32px b1 d16h2 float32 forward cpu"
    if benchmark.enabled:  # not under --benchmark-disable
        assert benchmark.stats.stats.rounds == 10 and len(benchmark.stats.stats.data) == 10
    assert tuple(call.x.shape) == (1, 8, 8, 16) and not call.module.training


def test_recorded_stats_are_the_timed_calls(benchmark, monkeypatch):
    """Each round is setup (untimed) then one call of the module; each recorded duration contains
    that call and nothing past the next round's setup (inequalities on one monotonic clock)."""
    events = []  # (what, perf_counter)
    made = []

    def recording_call(*args, **kwargs):
        call = real_attention_call(*args, **kwargs)
        fn, setup = call.fn, call.setup
        call.module.register_forward_hook(lambda *_: events.append(("forward", time.perf_counter())))

        def timed_fn():
            events.append(("fn_start", time.perf_counter()))
            fn()
            events.append(("fn_end", time.perf_counter()))

        def recorded_setup():
            events.append(("setup_start", time.perf_counter()))
            setup()
            events.append(("setup_end", time.perf_counter()))

        call.fn, call.setup = timed_fn, recorded_setup
        made.append(call)
        return call

    real_attention_call = bench_mod.attention_call
    monkeypatch.setattr(bench_mod, "attention_call", recording_call)
    bench_attention(benchmark, "mha.math", resolution=32, rounds=6, warmup_rounds=3, **TINY)
    done = time.perf_counter()
    assert len(made) == 1
    calls = 1 if not benchmark.enabled else 6 + 3
    assert [e for e, _ in events] == ["setup_start", "setup_end", "fn_start", "forward", "fn_end"] * calls
    if not benchmark.enabled:
        return
    t = [t for _, t in events]
    rounds = [t[5 * i:5 * i + 5] for i in range(3, 9)]  # the timed rounds, after 3 warmup rounds
    data = benchmark.stats.stats.data
    assert len(data) == 6
    for i, (recorded, (_, setup_end, fn_start, _, fn_end)) in enumerate(zip(data, rounds)):
        next_setup = rounds[i + 1][0] if i + 1 < len(rounds) else done
        assert fn_end - fn_start <= recorded <= next_setup - setup_end, i
    assert benchmark.stats.stats.min == min(data) and benchmark.stats.stats.max == max(data)


def test_attention_call_modes_and_bad_input():
    fwd = attention_call("mha.math", 32, **TINY)
    fwd()
    assert fwd.x.grad is None and all(p.grad is None for p in fwd.module.parameters()) and not fwd.module.training
    train = attention_call("mha.math", 32, mode="train", **TINY)
    train()
    assert train.x.grad is not None and train.info["mode"] == "train" and train.module.training
    first = [train.x.grad.clone()] + [p.grad.clone() for p in train.module.parameters()]
    assert all(g.abs().sum() > 0 for g in first)
    train()  # gradients cleared before each call: the same, not accumulated
    for g0, g1 in zip(first, [train.x.grad] + [p.grad for p in train.module.parameters()]):
        torch.testing.assert_close(g1, g0, rtol=0, atol=0)
    assert fwd.info["cell_id"] != train.info["cell_id"]
    assert torch.equal(fwd.x, train.x.detach())  # one seeded input for both
    assert not torch.equal(fwd.x, attention_call("mha.math", 32, seed=1, **TINY).x)
    slide = attention_call("local.slide", 32, params={"kernel": 3}, **TINY)
    assert isinstance(slide.module, LocalSlide) and slide.module.kernel == 3
    assert slide.module.is_merged  # forward mode measures the reparameterized module, as a run does
    assert not attention_call("local.slide", 32, params={"kernel": 3}, mode="train", **TINY).module.is_merged
    with pytest.raises(attnbench.UnknownImplError):
        attention_call("mha.sdp", 32, **TINY)
    with pytest.raises(attnbench.ParamError):
        attention_call("sra.conv", 32, params={"ratio": 2}, **TINY)
    with pytest.raises(BenchSetupError, match="multiple of patch"):
        attention_call("mha.sdpa", 30, **TINY)
    with pytest.raises(BenchSetupError, match="dtype"):
        attention_call("mha.sdpa", 32, **{**TINY, "dtype": "float64"})


def _fake_cuda(monkeypatch, events, *, available=True, initialized=True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialized)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("synchronize"))


def test_synchronized_timer_synchronizes_before_reading_the_clock(monkeypatch):
    events = []
    _fake_cuda(monkeypatch, events)
    monkeypatch.setattr(bench_mod, "time", types.SimpleNamespace(
        perf_counter=lambda: events.append("clock") or 12.5))
    assert synchronized_timer() == 12.5
    assert events == ["synchronize", "clock"]  # the device's queued work is done before the clock is read
    events.clear()
    _fake_cuda(monkeypatch, events, initialized=False)  # never initialises CUDA just to synchronise
    assert synchronized_timer() == 12.5 and events == ["clock"]
    events.clear()
    _fake_cuda(monkeypatch, events, available=False)
    assert synchronized_timer() == 12.5 and events == ["clock"]


def test_timed_call_and_setup_wait_for_the_device(monkeypatch):
    """The timed function returns only after the module ran and the device was synchronised; setup synchronises."""
    events = []
    call = attention_call("mha.sdpa", 32, **TINY)
    call.module.register_forward_hook(lambda *_: events.append("forward"))
    monkeypatch.setattr(timing, "synchronize", lambda device: events.append(("synchronize", device)))
    call.fn()
    assert events == ["forward", ("synchronize", call.device)]
    events.clear()
    call.setup()
    assert events == [("synchronize", call.device)]


# --- pytest-benchmark's own compare, in subprocesses --------------------------------------------

# A deterministic clock (--benchmark-timer sleepy_clock.deterministic_timer): each read advances 1 ns,
# and each call of the module below advances the clock by its test's SLEEPY_MS_<WHICH>, so timings and
# comparisons do not depend on the load of the machine (on a wall clock an unchanged function can
# look several times slower when the shared machine is busy).
SLEEPY_CLOCK = '''
NOW = [0.0]


def deterministic_timer():
    NOW[0] += 1e-9
    return NOW[0]


def advance(seconds):
    NOW[0] += seconds
'''

SLEEPY_TEST = '''
import os
import pytest
import torch
import attnbench
import sleepy_clock
from attnbench.bench import bench_attention


@attnbench.register("sleepy.proj", family="sleepy")
class Sleepy(torch.nn.Module):
    """Takes ``ms`` milliseconds of the deterministic clock per call (a planted regression when raised)."""

    ms = 2.0

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        sleepy_clock.advance(self.ms / 1e3)
        return self.proj(x)


@pytest.mark.parametrize("which", ["same", "changed"])
def test_sleepy(benchmark, which):
    Sleepy.ms = float(os.environ.get("SLEEPY_MS_" + which.upper(), "2"))
    bench_attention(benchmark, "sleepy.proj", resolution=32, dim=16, heads=2, device="cpu", rounds=8,
                    warmup_rounds=1)
'''


def _pytest(tmp_path, *args, changed_ms="2"):
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "SLEEPY_MS_CHANGED": changed_ms,
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                           str(tmp_path / "test_sleepy.py"), f"--benchmark-storage=file://{tmp_path / 'store'}",
                           "--benchmark-timer=sleepy_clock.deterministic_timer", *args],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)


def test_benchmark_json_and_compare_fail(tmp_path):
    (tmp_path / "test_sleepy.py").write_text(SLEEPY_TEST)
    (tmp_path / "sleepy_clock.py").write_text(SLEEPY_CLOCK)
    r = _pytest(tmp_path, "--benchmark-save=base", f"--benchmark-json={tmp_path / 'out.json'}")
    assert r.returncode == 0, r.stdout + r.stderr
    benches = {b["param"]: b for b in json.loads((tmp_path / "out.json").read_text())["benchmarks"]}
    assert set(benches) == {"same", "changed"}
    for bench in benches.values():
        assert bench["extra_info"]["attnbench_impl"] == "sleepy.proj" and bench["stats"]["rounds"] == 8
        assert bench["options"]["timer"] == "deterministic_timer"
        # each round is exactly the call's 2 ms (plus the clock's 1 ns a read): the call is inside
        # the timed region and nothing else (setup, warmup rounds) is
        assert bench["stats"]["min"] == pytest.approx(0.002, rel=1e-5)
        assert bench["stats"]["max"] == pytest.approx(0.002, rel=1e-5)
    # planted slowdown of one test: 2 ms -> 10 ms a call (+400%) fails the session at a 300% threshold,
    # naming that test only (the unchanged one has the same median)
    r = _pytest(tmp_path, "--benchmark-compare=0001", "--benchmark-compare-fail=median:300%", changed_ms="10")
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "Performance has regressed:" in out, out
    regressed = [line.strip() for line in out.split("Performance has regressed:")[1].splitlines() if "Field" in line]
    assert len(regressed) == 1 and regressed[0].startswith(
        "test_sleepy[changed] (0001_base) - Field 'median' has failed PercentageRegressionCheck: 399.9998"), out
