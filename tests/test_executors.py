"""Executors (issue 16): the same cells whatever places them (in this process, one worker per GPU, Ray
tasks); a worker killed mid-cell retried, a driver killed mid-run resumed, one cell per GPU at a time."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from attnbench import store
from attnbench.errors import SuiteError
from attnbench.runner import run_suite
from attnbench.suite import parse_suite
from conftest import ROOT, TOY_PLUGIN, make_suite, run_without, suite_dict, suite_file

PLUGIN = r'''
"""Implementations for the executor tests."""
import os
import time
from pathlib import Path

import torch
from torch import nn

import attnbench


class _Base(nn.Module):
    def __init__(self, dim: int, heads: int, scale: float = 1.0):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def flops_analytic(self, batch, height, width):
        return 2 * batch * height * width * self.proj.in_features ** 2


@attnbench.register("xtoy.killable", family="xtoy")
class Killable(_Base):
    """Appends its pid to $ATTNBENCH_KILLABLE_LOG once per process; the first process to do so then
    sleeps (at most 2 minutes), waiting for the test to kill it."""

    def forward(self, x):
        log = os.environ.get("ATTNBENCH_KILLABLE_LOG")
        if log and x.device.type != "meta":
            pids = Path(log).read_text().split() if Path(log).exists() else []
            if str(os.getpid()) not in pids:
                with open(log, "a") as f:
                    f.write(f"{os.getpid()}\n")
                if not pids:
                    time.sleep(120)
        return self.proj(x)


@attnbench.register("xtoy.stamp", family="xtoy")
class Stamp(_Base):
    """Each real call sleeps 20 ms and appends "<CUDA_VISIBLE_DEVICES> <grid> <scale> <start> <end>" to
    $ATTNBENCH_STAMP_LOG."""

    def __init__(self, dim: int, heads: int, scale: float = 1.0):
        super().__init__(dim, heads)
        self.scale = scale

    def forward(self, x):
        t0 = time.time()
        if x.device.type != "meta":
            time.sleep(0.02)
            with open(os.environ["ATTNBENCH_STAMP_LOG"], "a") as f:
                f.write(f"{os.environ.get('CUDA_VISIBLE_DEVICES')} {x.shape[1]} {self.scale} {t0} {time.time()}\n")
        return self.proj(x) * self.scale
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    path = tmp_path_factory.mktemp("xplugin") / "xtoy.py"
    path.write_text(PLUGIN)
    return str(path)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A local Ray cluster of 2 CPUs, its workers reading the gate and the pid log set here."""
    ray = pytest.importorskip("ray")
    folder = tmp_path_factory.mktemp("ray")
    saved = {k: os.environ.get(k) for k in ("ATTNBENCH_TOY_GATE", "ATTNBENCH_KILLABLE_LOG")}
    os.environ["ATTNBENCH_TOY_GATE"] = str(folder / "gate")
    os.environ["ATTNBENCH_KILLABLE_LOG"] = str(folder / "pids")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield {"folder": folder, "address": ray.get_runtime_context().gcs_address}
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _identity(rows):
    def num(v):
        return None if v is None or v != v else v  # NaN: not counted

    return {r["cell_id"]: (r["label"], r["resolution"], r["status"], num(r.get("flops_torch")),
                           num(r.get("flops_analytic")), num(r.get("macs_fvcore"))) for r in rows}


def _kill_first_pid(log: Path, stop: threading.Event) -> threading.Thread:
    def run():
        while not stop.is_set():
            pids = log.read_text().split() if log.exists() else []
            if pids:
                os.kill(int(pids[0]), signal.SIGKILL)
                return
            time.sleep(0.05)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


# --- ray ----------------------------------------------------------------------------------------------

def test_ray_gives_the_cells_of_inprocess(ray_cluster, tmp_path):
    suite = make_suite(["toy.proj", "toy.oom", "toy.fail"], resolution=(32, 48, 64))
    here = run_suite(suite, out=tmp_path / "here", progress=False)
    there = run_suite(suite, out=tmp_path / "ray", progress=False, executor="ray")
    assert _identity(there.rows) == _identity(here.rows)
    assert [r["cell_id"] for r in there.rows] == [r["cell_id"] for r in here.rows]  # suite order
    assert {r["status"] for r in there.rows} == {"ok", "oom", "error"}
    on_disk = store.read_rows(tmp_path / "ray")
    assert _identity(on_disk) == _identity(here.rows) and {r["executor"] for r in on_disk} == {"ray"}
    env = json.loads((tmp_path / "ray" / "env.json").read_text())
    workers = {w["worker"]: w for w in env["workers"]}
    measured = [r for r in on_disk if r.get("worker")]
    assert measured and {r["worker"] for r in measured} <= set(workers)
    assert all(w["torch"] and w["hostname"] and w["sentinel_tflops_start"] for w in workers.values())
    assert all(r["worker_host"] and r["worker_torch"] for r in measured)
    here_env = json.loads((tmp_path / "here" / "env.json").read_text())
    assert [w["executor"] for w in here_env["workers"]] == ["driver"]


def test_ray_retries_a_cell_whose_worker_died_and_cancels_a_hung_one(ray_cluster, tmp_path, plugin):
    log = ray_cluster["folder"] / "pids"
    stop = threading.Event()
    killer = _kill_first_pid(log, stop)
    suite = make_suite(["xtoy.killable", "toy.crash", "toy.hang"], resolution=(32, 48),
                       plugins=[str(TOY_PLUGIN), plugin], budget={"cell_timeout_s": 10.0})
    try:
        rows = run_suite(suite, out=tmp_path / "r", progress=False, executor="ray").rows
    finally:
        stop.set()
        killer.join(5)
    by = {(r["label"], r["resolution"]): r for r in rows}
    assert by["xtoy.killable", 32]["status"] == "ok" and by["xtoy.killable", 48]["status"] == "ok"
    assert len(set(log.read_text().split())) >= 2  # the killed attempt and its retry, in another process
    crashed = by["toy.crash", 48]
    assert crashed["status"] == "crashed" and "tried 2 times" in crashed["message"]
    assert by["toy.crash", 32]["status"] == "ok" and by["toy.hang", 32]["status"] == "ok"
    hung = by["toy.hang", 48]
    assert hung["status"] == "timeout" and "cancelled" in hung["message"]
    assert len(store.read_rows(tmp_path / "r")) == 6


def test_a_killed_ray_driver_resumes_measuring_each_cell_once(ray_cluster, tmp_path):
    gate = Path(os.environ["ATTNBENCH_TOY_GATE"])
    gate.write_text("")
    path = suite_file(tmp_path, ["toy.proj", "toy.gated"], resolution=(32, 48, 64))
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "attnbench", "run", str(path), "--out", str(out), "--no-progress",
           "--executor", "ray", "--ray-address", ray_cluster["address"]]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        reached = Path(str(gate) + ".reached")
        while not (reached.exists() and len(_lines(out)) >= 4) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.1)
        assert reached.exists(), "the gated cell never started"
        proc.send_signal(signal.SIGKILL)  # the driver dies with toy.gated at 48 px in flight
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        gate.unlink(missing_ok=True)
    before = {json.loads(line)["cell_id"] for line in _lines(out)}
    assert len(before) == 4  # toy.proj x 3, toy.gated 32 px
    res = run_suite(path, out=out, resume=True, progress=False, executor="ray")
    ids = [json.loads(line)["cell_id"] for line in _lines(out)]
    assert len(ids) == len(set(ids)) == 6 and res.reused == 4 and res.measured == 2
    assert {r["status"] for r in res.rows} == {"ok"}


def _lines(out: Path) -> list[str]:
    p = out / "rows.jsonl"
    return [x for x in p.read_text().splitlines() if x.endswith("}")] if p.exists() else []


# --- gpus ---------------------------------------------------------------------------------------------

def test_gpus_one_cell_per_device_a_dead_worker_retried_a_hung_cell_killed_alone(tmp_path, monkeypatch, plugin):
    monkeypatch.setenv("ATTNBENCH_FAKE_GPUS", "2")
    monkeypatch.setenv("ATTNBENCH_STAMP_LOG", str(tmp_path / "stamps"))
    log = tmp_path / "pids"
    monkeypatch.setenv("ATTNBENCH_KILLABLE_LOG", str(log))
    stop = threading.Event()
    killer = _kill_first_pid(log, stop)
    impls = [{"xtoy.stamp": {"scale": s}} for s in (1.0, 2.0, 3.0)] + ["xtoy.killable", "toy.hang"]
    suite = make_suite(impls, resolution=(32, 48), plugins=[str(TOY_PLUGIN), plugin], budget={"cell_timeout_s": 8.0})
    try:
        rows = run_suite(suite, out=tmp_path / "r", progress=False, executor="gpus").rows
    finally:
        stop.set()
        killer.join(5)
    by = {(r["label"], r["resolution"]): r for r in rows}
    # a worker killed mid-cell: the cell is tried again (attempt 2), on the next free worker
    assert by["xtoy.killable", 32]["status"] == "ok", (by["xtoy.killable", 32]["message"], log.read_text())
    assert by["xtoy.killable", 32]["attempts"] == 2
    assert len(log.read_text().split()) == 2
    # a hung cell: its worker killed at the time-out, the other cells unharmed
    assert by["toy.hang", 32]["status"] == "ok" and by["toy.hang", 48]["status"] == "timeout"
    assert "was killed" in by["toy.hang", 48]["message"]
    assert all(r["status"] == "ok" for k, r in by.items() if k != ("toy.hang", 48))
    # one cell per device at a time: the stamps of two cells on one device never overlap
    cells: dict[tuple, list[float]] = {}
    for line in (tmp_path / "stamps").read_text().splitlines():
        dev, grid, scale, t0, t1 = line.split()
        span = cells.setdefault((dev, grid, scale), [float(t0), float(t1)])
        span[0], span[1] = min(span[0], float(t0)), max(span[1], float(t1))
    assert {k[0] for k in cells} == {"0", "1"} and len({k[1:] for k in cells}) == 6  # both devices, every cell
    for dev in ("0", "1"):
        spans = sorted(v for k, v in cells.items() if k[0] == dev)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), f"two cells overlapped on device {dev}"
    env = json.loads((tmp_path / "r" / "env.json").read_text())
    assert {w["cuda_visible_devices"] for w in env["workers"]} == {"0", "1"}
    assert {r["worker"] for r in rows if r.get("worker")} <= {w["worker"] for w in env["workers"]}


def test_ctrl_c_cancels_what_is_outstanding_and_keeps_what_finished(ray_cluster, tmp_path):
    suite = make_suite(["toy.proj", "toy.slow"], resolution=(32, 48, 64))

    def interrupt(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_suite(suite, out=tmp_path / "r", progress=False, executor="ray", on_row=interrupt)
    assert len(store.read_rows(tmp_path / "r")) == 1
    assert (tmp_path / "r" / "run.jsonl").exists()  # the session's accounting is written all the same


# --- bad input ----------------------------------------------------------------------------------------

def test_an_unknown_executor_is_a_suite_error_naming_the_key():
    with pytest.raises(SuiteError, match=r"executor") as e:
        parse_suite(suite_dict(["toy.proj"], executor="slurm"))
    assert e.value.key == "executor" or "executor" in str(e.value)


def test_executor_ray_without_ray_is_a_typed_error(tmp_path):
    path = suite_file(tmp_path, ["toy.proj"])
    code = """
import sys
from attnbench.cli import main
assert main(["run", sys.argv[1], "--out", sys.argv[2], "--no-progress"]) == 0
assert "ray" not in sys.modules  # the default executor never imports it
rc = main(["run", sys.argv[1], "--out", sys.argv[3], "--no-progress", "--executor", "ray"])
print("rc", rc)
"""
    proc = run_without(code, path, tmp_path / "a", tmp_path / "b", blocked=("ray",), strict=False)
    assert proc.returncode == 0, proc.stderr
    assert "rc 2" in proc.stdout and "executor ray needs the ray package" in proc.stderr
    assert not (tmp_path / "b").exists()  # nothing written
