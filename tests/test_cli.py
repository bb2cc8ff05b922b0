"""The CLI end to end: runs, listings, and bad input -> exit code 2 with a message and no traceback."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from attnbench import store
from attnbench.cli import main
from conftest import ROOT, suite_file


def cli(*args, cwd=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "attnbench", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


@pytest.fixture
def tiny(tmp_path):
    return suite_file(tmp_path, ["mha.sdpa", {"sra.conv": {"sr_ratio": 2}}, "toy.fail"], resolution=(32, 48),
                      filename="tiny.yaml", name="tiny", measure_peaks=True)


def test_run_end_to_end(tiny, tmp_path):
    r = cli("run", tiny, "--out", tmp_path / "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "latency, median ms" in r.stdout and "sra.conv(sr_ratio=2)" in r.stdout and "ERR" in r.stdout
    assert "Traceback" not in r.stderr
    rows = store.read_rows(tmp_path / "run")
    assert len(rows) == 6
    assert {r["status"] for r in rows} == {"ok", "error"}


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "mha.sdpa" in out and "sr_ratio=8" in out and "family" in out
    assert main(["list", "--plugin", str(ROOT / "examples" / "my_attention.py"), "mine.*"]) == 0
    assert "mine.talking_heads" in capsys.readouterr().out


def _write(tmp_path, text, name="s.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


BASE = "name: s\ndevice: cpu\ndim: 16\nheads: 2\nresolution: [32]\n"


@pytest.mark.parametrize("text,needle", [
    ("name: s\nresolution: [32\n", "not valid YAML: line"),
    (BASE + "impls: [mha.sdpa]\nresolutoin: [64]\n", "did you mean 'resolution'"),
    (BASE + "impls: [mha.sdp]\n", "impls[0]: unknown implementation 'mha.sdp'; did you mean 'mha.sdpa'"),
    (BASE + "impls: [{sra.conv: {ratio: 2}}]\n", "sra.conv takes no parameter 'ratio'"),
    (BASE + "impls: [mha.sdpa]\ndtype: float64\n", "dtype[0]"),
    (BASE.replace("heads: 2", "heads: 3") + "impls: [mha.sdpa]\n", "not divisible by heads 3"),
    (BASE + "impls: [mha.sdpa]\nplugins: [missing.py]\n", "plugins[0]"),
])
def test_bad_suite_exit_2(tmp_path, capsys, text, needle):
    p = _write(tmp_path, text)
    assert main(["run", str(p), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert needle in err and str(p) in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing ran


def test_other_bad_input_exit_2(tmp_path, tiny, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "suite file not found" in capsys.readouterr().err
    assert main(["run", str(tiny), "--only", "nosuch.*"]) == 2
    assert "selects no cell" in capsys.readouterr().err
    assert main(["list", "nosuch.*"]) == 2
    assert "no implementation matches" in capsys.readouterr().err


def test_cuda_without_gpu_exit_2(tiny, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert main(["run", str(tiny), "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_run_isolated_with_a_device_override(tmp_path, capsys, keep_torch_globals):
    """--isolate: each cell in a worker, which applies the suite's settings (threads) and whose error and
    out-of-memory become rows; --device cpu replaces the suite's device (one that does not exist here)."""
    path = suite_file(tmp_path, ["toy.fail", "toy.oom"], resolution=(48,), filename="s.yaml", device="cuda:63",
                      threads=1)
    assert main(["run", str(path), "--out", str(tmp_path / "no"), "--no-progress"]) == 2  # the suite's own device
    assert "cuda:63" in capsys.readouterr().err and not (tmp_path / "no").exists()
    out = tmp_path / "r"
    assert main(["run", str(path), "--device", "cpu", "--isolate", "--out", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    rows = {r["impl"]: r for r in store.read_rows(out)}
    assert rows["toy.fail"]["status"] == "error" and rows["toy.fail"]["message"] == \
        "RuntimeError: toy failure on a wide grid"
    assert rows["toy.oom"]["status"] == "oom" and "OutOfMemoryError" in rows["toy.oom"]["message"]
    for r in rows.values():
        assert r["isolation"] == "process" and r["device"] == "cpu" and r["worker_wall_s"] > 0
        assert r["cpu_threads"] == 1  # a fresh worker starts with torch's default (2 here): the suite's applied
    log = (out / "errors.log").read_text()  # the worker wrote the traceback, the oom is no error
    assert log.startswith("=== toy.fail resolution=48") and "toy failure on a wide grid" in log and "toy.oom" not in log
    env = json.loads((out / "env.json").read_text())
    assert env["isolation"] == "process" and env["device_requested"] == "cpu" and env["device"] == "cpu"
    assert "cells: error 1, oom 1" in captured.out
    assert "1 cell(s) raised; see" in captured.err


def test_subprocess_bad_input_has_no_traceback(tmp_path):
    p = _write(tmp_path, BASE + "impls: [mha.sdpa]\nbatch: two\n")
    r = cli("run", p)
    assert r.returncode == 2
    assert "batch[0]" in r.stderr and "Traceback" not in r.stderr


def test_existing_run_needs_resume(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(tiny), "--out", str(out), "--only", "mha.sdpa", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["run", str(tiny), "--out", str(out), "--only", "mha.sdpa"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_after_kill(tmp_path):
    """SIGKILL a real run in the middle of a cell (toy.gated waits at a gate while the kill comes: 4 cells are
    on disk, the 5th is running); a cut last line is added as a kill mid-write leaves it. --resume drops that
    line, keeps the 4 rows and measures the other 2: every cell once, no finished cell lost."""
    suite = suite_file(tmp_path, ["toy.proj", "toy.gated"], resolution=(32, 48, 64), filename="s.yaml", name="killed")
    out = tmp_path / "run"
    gate = tmp_path / "gate"
    gate.write_text("")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ATTNBENCH_TOY_GATE": str(gate)}
    log = tmp_path / "first.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "attnbench", "run", str(suite), "--out", str(out),
                                 "--no-progress"], stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "gate.reached").exists():  # toy.gated at 48 px (grid 12) has started its call
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the run never reached the gated cell"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        gate.unlink()  # a run that was not killed leaves its wait
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    before = store.read_rows(out)
    assert [(r["impl"], r["resolution"]) for r in before] == [("toy.proj", 32), ("toy.proj", 48), ("toy.proj", 64),
                                                              ("toy.gated", 32)]
    with open(out / "rows.jsonl", "a") as f:
        f.write('{"impl": "toy.gated", "resolution": 48, "sta')  # as a kill during the write leaves it
    r = cli("run", suite, "--out", out, "--resume", "--no-progress", cwd=tmp_path)  # no gate: toy.proj's speed
    assert r.returncode == 0, r.stderr
    assert "was cut mid-write (a killed run)" in r.stderr
    after = store.read_rows(out)
    assert len(after) == 6 and len({x["cell_id"] for x in after}) == 6
    assert after[:4] == before and {x["status"] for x in after} == {"ok"}
    assert [(x["impl"], x["resolution"], x["session"]) for x in after[4:]] == [("toy.gated", 48, 1),
                                                                               ("toy.gated", 64, 1)]
    assert "2 cells measured, 0 recorded without being tried, 4 reused" in r.stdout
