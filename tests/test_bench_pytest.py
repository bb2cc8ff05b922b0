"""Attention benchmarks through pytest-benchmark's ``benchmark`` fixture (copy this file to start).

The parametrised test below is the example: it times each implementation at a tiny shape on the
CPU (``device="auto"`` uses the GPU when there is one, with a synchronised timer). Run it with
pytest-benchmark's own options, e.g.::

    pytest tests/test_bench_pytest.py --benchmark-autosave                 # store a run
    pytest tests/test_bench_pytest.py --benchmark-compare --benchmark-compare-fail=median:50%
    pytest tests/test_bench_pytest.py --benchmark-json=out.json

The other tests check that path itself: JSON output, and ``--benchmark-compare-fail`` passing on
an unchanged function and failing on a planted slowdown (in subprocesses).
"""

import json
import os
import subprocess
import sys

import pytest

import attnbench
from attnbench.bench import BenchSetupError, attention_call, bench_attention, synchronized_timer
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
    assert info["attnbench_impl"] == impl and info["tokens"] == 64 and info["flops_analytic"] > 0
    assert benchmark.group == "32px b1 d16h2 float32 forward cpu"
    if benchmark.enabled:  # not under --benchmark-disable
        assert benchmark.stats.stats.rounds == 10 and benchmark.stats.stats.min > 0
    assert tuple(call.x.shape) == (1, 8, 8, 16)


def test_attention_call_modes_and_bad_input():
    fwd = attention_call("mha.math", 32, **TINY)
    fwd()
    train = attention_call("mha.math", 32, mode="train", **TINY)
    train()
    assert train.x.grad is not None and train.info["mode"] == "train"
    assert fwd.info["cell_id"] != train.info["cell_id"]
    assert attention_call("local.slide", 32, params={"kernel": 3}, **TINY).module.__class__.__name__ != ""
    with pytest.raises(attnbench.UnknownImplError):
        attention_call("mha.sdp", 32, **TINY)
    with pytest.raises(attnbench.ParamError):
        attention_call("sra.conv", 32, params={"ratio": 2}, **TINY)
    with pytest.raises(BenchSetupError, match="multiple of patch"):
        attention_call("mha.sdpa", 30, **TINY)
    with pytest.raises(BenchSetupError, match="dtype"):
        attention_call("mha.sdpa", 32, **{**TINY, "dtype": "float64"})


def test_synchronized_timer_is_a_clock():
    a = synchronized_timer()
    b = synchronized_timer()
    assert b >= a


# --- pytest-benchmark's own compare, in subprocesses --------------------------------------------

SLEEPY_TEST = '''
import os
import torch
import attnbench
from attnbench.bench import bench_attention


@attnbench.register("sleepy.proj", family="sleepy")
class Sleepy(torch.nn.Module):
    """Spins SLEEPY_MS milliseconds per call (a planted regression when raised; sleep is too coarse here)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        import time
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < float(os.environ.get("SLEEPY_MS", "2")) / 1e3:
            pass
        return self.proj(x)


def test_sleepy(benchmark):
    bench_attention(benchmark, "sleepy.proj", resolution=32, dim=16, heads=2, device="cpu", rounds=8,
                    warmup_rounds=1)
'''


def _pytest(tmp_path, *args, sleepy_ms="2"):
    # one thread: with two, a busy second core makes OpenMP barriers cost milliseconds per call
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SLEEPY_MS": sleepy_ms, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                           str(tmp_path / "test_sleepy.py"), f"--benchmark-storage=file://{tmp_path / 'store'}",
                           *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)


def test_benchmark_json_and_compare_fail(tmp_path):
    (tmp_path / "test_sleepy.py").write_text(SLEEPY_TEST)
    r = _pytest(tmp_path, "--benchmark-save=base", f"--benchmark-json={tmp_path / 'out.json'}")
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads((tmp_path / "out.json").read_text())
    bench = data["benchmarks"][0]
    assert bench["extra_info"]["attnbench_impl"] == "sleepy.proj" and bench["stats"]["rounds"] == 8
    assert bench["stats"]["min"] >= 0.002  # the call's 2 ms spin is inside the timed region
    # unchanged: median within +300% of the saved run -> exit 0
    same = _pytest(tmp_path, "--benchmark-compare=0001", "--benchmark-compare-fail=median:300%")
    assert same.returncode == 0, same.stdout + same.stderr
    # planted slowdown: 2 ms -> 20 ms a call -> pytest-benchmark's compare fails the session
    slow = _pytest(tmp_path, "--benchmark-compare=0001", "--benchmark-compare-fail=median:300%", sleepy_ms="20")
    assert slow.returncode != 0, slow.stdout + slow.stderr
    assert "Performance has regressed" in slow.stdout + slow.stderr
