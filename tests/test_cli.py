"""The CLI end to end: runs, listings, and bad input -> exit code 2 with a message and no traceback."""

import os
import signal
import re
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
    """Kill a run mid-sweep; --resume finishes it with every cell once and no finished cell lost."""
    suite = suite_file(tmp_path, ["toy.slow", "toy.proj"], resolution=(32, 48, 64, 80), filename="s.yaml",
                       name="slowish", measure_peaks=True,
                       timing={"warmup_s": 0.0, "target_s": 0.3, "min_repeats": 5, "max_repeats": 50})
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "attnbench", "run", str(suite), "--out", str(out), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tmp_path)
    rows_file = out / "rows.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if rows_file.exists() and len(rows_file.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = store.read_rows(out)
    assert 2 <= len(before) < 8
    r = cli("run", suite, "--out", out, "--resume", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    after = store.read_rows(out)
    assert len(after) == 8 and len({x["cell_id"] for x in after}) == 8
    assert after[: len(before)] == before
    m = re.search(r"(\d+) cells measured, (\d+) recorded without being tried, (\d+) reused", r.stdout)
    assert m and int(m[1]) + int(m[2]) == 8 - len(before) and int(m[3]) == len(before), r.stdout
