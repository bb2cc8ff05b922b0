"""`attnbench check`, `baseline update` and `export`: exit codes on planted regressions, baselines
keyed by device, and this project's own CI check against its committed CPU baseline."""

import json
import shutil

import pytest

from attnbench import store
from attnbench.analysis import baseline as bl
from attnbench.analysis.compare import compare_runs
from attnbench.analysis.gate import check
from attnbench.cli import main
from conftest import ROOT, SYNTH_ENV, planted_pair, suite_file, write_rows, write_run
from conftest import sampled_row as cell

CI_BASELINE = ROOT / "results" / "baselines" / "cpu-amd-epyc-1t" / "ci_smoke"
# the thresholds .ci/run uses (it adds --retries 3, which needs a suite to re-run)
CI_FLAGS = ["--max-slowdown", "100%", "--alpha", "0.001", "--max-memory-growth", "25%", "--memory-floor", "8",
            "--normalize"]


def test_check_planted_regressions_exit_1(tmp_path, capsys):
    base, new = planted_pair(tmp_path)
    assert main(["check", str(new), "--baseline", str(base)]) == 1
    out = capsys.readouterr().out
    failing = [line for line in out.splitlines() if line.startswith("REGRESSION")]
    text = "\n".join(failing)
    assert any(line.startswith("REGRESSION mha.sdpa 224px") and "latency" in line and "x1.29" in line
               and "p=" in line for line in failing)
    assert "REGRESSION swin.window 224px" in text and "flops_analytic 1,000,000,000 -> 1,000,004,096" in text
    assert "REGRESSION mha.math 224px" in text and "peak memory 50 -> 90 MiB" in text
    assert "REGRESSION sra.linear 224px" in text and "status ok -> oom" in text
    assert "sra.conv" not in text and "swin.shift_pad" not in text  # noise and sub-floor memory: no failure
    assert "mvit.pool" not in text and "local.slide" not in text  # missing cells: listed, not failures
    assert "only in base (2):" in out and "check FAILED: 6 regression(s)" in out  # 3 FLOP counts of swin.window


def test_check_thresholds_and_flags(tmp_path, capsys):
    base, new = planted_pair(tmp_path)
    cmp = compare_runs(base, new, memory_growth=1.0)
    whys = [f.why for f in check(cmp, max_slowdown=0.5, max_memory_growth=1.0, fail_on_flops=False)]
    assert len(whys) == 1 and whys[0].startswith("status ok -> oom")  # +30% < 50%, +80% memory < 100%
    assert len(check(cmp, max_slowdown=0.5, max_memory_growth=1.0, fail_on_flops=False, fail_on_status=False,
                     fail_on_missing=True)) == 3  # two only in base, one only in new
    # the sdpa slowdown alone, with the other planted changes allowed
    only_slow = write_run(tmp_path / "n2", [cell("mha.sdpa", 224, 13.0, seed=21), cell("sra.conv", 224, 2.0, seed=22)])
    assert main(["check", str(only_slow), "--baseline", str(base), "--max-slowdown", "0.5"]) == 0
    assert main(["check", str(only_slow), "--baseline", str(base), "--max-slowdown", "20%"]) == 1
    out = capsys.readouterr().out
    assert "exceeds +20% at alpha 0.01" in out
    assert main(["check", str(only_slow), "--baseline", str(base), "--max-slowdown", "20%", "--alpha", "1e-40"]) == 0


def test_noise_only_run_passes(tmp_path):
    impls = ["mha.sdpa", "sra.conv", "swin.window", "mvit.pool", "local.im2col", "mha.math"]
    base = write_run(tmp_path / "b", [cell(i, r, 3.0 + k, seed=k * 7 + r, sigma=0.15) for k, i in enumerate(impls)
                                      for r in (64, 128)])
    new = write_run(tmp_path / "n", [cell(i, r, 3.0 + k, seed=1000 + k * 7 + r, sigma=0.15)
                                     for k, i in enumerate(impls) for r in (64, 128)])
    assert main(["check", str(new), "--baseline", str(base)]) == 0


@pytest.mark.parametrize("args,needle", [
    (["--max-slowdown", "10"], "ambiguous: write 10% or 0.1"),
    (["--max-memory-growth", "five"], "not a percentage"),
    (["--alpha", "5"], "between 0 and 1"),
])
def test_check_bad_thresholds_exit_2(tmp_path, capsys, args, needle):
    base, new = planted_pair(tmp_path)
    assert main(["check", str(new), "--baseline", str(base), *args]) == 2
    assert needle in capsys.readouterr().err


def test_check_bad_input_exit_2(tmp_path, capsys):
    base, new = planted_pair(tmp_path)
    assert main(["check", str(new), "--baseline", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["check", str(tmp_path / "empty"), "--baseline", str(base)]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert main(["check", str(new), "--baseline", "auto", "--root", str(tmp_path / "baselines")]) == 2
    err = capsys.readouterr().err
    assert "no baseline for device 'cpu-amd-epyc-1t' and suite 'synth'" in err and "baseline update" in err
    assert main(["check", "--baseline", "auto"]) == 2
    (tmp_path / "x.txt").write_text("hi")
    assert main(["check", str(tmp_path / "x.txt"), "--baseline", str(base)]) == 2
    assert "neither a run folder nor a suite file" in capsys.readouterr().err


def test_device_keys():
    assert bl.device_key(SYNTH_ENV) == "cpu-amd-epyc-1t"
    assert bl.device_key({"gpu": {"name": "NVIDIA H100 80GB HBM3"}, "cpu": {"model": "x"}}) == "nvidia-h100-80gb-hbm3"
    assert bl.device_key({"cpu": {"model": "Intel(R) Xeon(R) Platinum 8480+", "logical_cores": 8}}) == \
        "cpu-intel-r-xeon-r-platinum-8480-8t"


def test_baseline_update_auto_and_export(tmp_path, capsys):
    base, new = planted_pair(tmp_path)
    root = tmp_path / "baselines"
    assert main(["baseline", "update", str(base), "--root", str(root)]) == 0
    dest = root / "cpu-amd-epyc-1t" / "synth"
    assert f"baseline written: {dest}" in capsys.readouterr().out
    rows = store.read_rows(dest)
    assert len(rows) == 8 and rows[0]["latency_ms_samples"] == store.read_rows(base)[0]["latency_ms_samples"]
    assert json.loads((dest / "baseline.json").read_text())["compact"] is True
    assert main(["check", str(new), "--baseline", "auto", "--root", str(root)]) == 1
    assert f"baseline {dest}" in capsys.readouterr().out
    assert main(["check", str(new), "--baseline", str(root / "cpu-amd-epyc-1t")]) == 1  # a device folder
    # update replaces; --full copies every file
    (base / "errors.log").write_text("trace")
    assert main(["baseline", "update", str(base), "--root", str(root), "--full"]) == 0
    assert (dest / "errors.log").read_text() == "trace"
    assert main(["baseline", "list", "--root", str(root)]) == 0
    assert "cpu-amd-epyc-1t" in capsys.readouterr().out
    # github-action-benchmark JSON: one latency entry per ok cell, memory with --memory
    out = tmp_path / "bench.json"
    assert main(["export", str(new), "-o", str(out), "--memory"]) == 0
    entries = json.loads(out.read_text(encoding="utf-8"))
    ok = [r for r in store.read_rows(new) if r["status"] == "ok"]
    assert len(entries) == 2 * len(ok)
    lat = next(e for e in entries if e["name"].startswith("mha.sdpa 224px") and e["unit"] == "ms")
    assert set(lat) == {"name", "unit", "value", "range", "extra"}
    assert lat["value"] == pytest.approx(ok[0]["latency_ms_median"]) and lat["range"].startswith("± ")
    assert {e["unit"] for e in entries} == {"ms", "MiB"}


def test_baseline_refuses_to_overwrite_other_files(tmp_path):
    base, _ = planted_pair(tmp_path)
    dest = tmp_path / "keep"
    dest.mkdir()
    (dest / "notes.md").write_text("mine")
    with pytest.raises(bl.BaselineError, match="not a baseline's"):
        bl.write_baseline(base, dest=dest)


# --- a real run with a planted slowdown ---------------------------------------------------------

SLEEPY_PLUGIN = '''
import torch
import attnbench


@attnbench.register("sleepy.check", family="sleepy")
class SleepyCheck(torch.nn.Module):
    """A projection; the test's scripted clock decides how long its calls take."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj(x)
'''


def test_check_suite_with_planted_slowdown(tmp_path, monkeypatch, scripted_calls, keep_torch_globals, capsys):
    """Real runs of a suite (baseline, new run, one retry) on a scripted clock: sleepy.check's calls take
    1 ms, then 4 ms (+-3%); mha.sdpa's 2 ms throughout; every call peaks at 1 MiB. The 4x slowdown, and
    nothing else, fails, confirmed by the retry."""
    import itertools

    from attnbench.measure import memory

    def one_mib(fn, device):
        fn()
        return float(2**20), memory.CPU_METHOD

    monkeypatch.setattr(memory, "peak_memory_bytes", one_mib)
    (tmp_path / "sleepy.py").write_text(SLEEPY_PLUGIN)
    suite = suite_file(tmp_path, ["sleepy.check", "mha.sdpa"], filename="s.yaml", name="sleepy", threads=1,
                       plugins=["sleepy.py"], timing={"warmup_s": 0.0, "target_s": 0.03, "min_repeats": 20,
                                                      "max_repeats": 30})
    sleepy_ms = [1.0]
    jitter = itertools.cycle([1.0, 1.03, 0.97, 1.01, 0.99, 1.02, 0.98])
    scripted_calls.cost = lambda module, x: next(jitter) * (
        sleepy_ms[0] if type(module).__name__ == "SleepyCheck" else 2.0) / 1e3
    root = tmp_path / "baselines"
    assert main(["baseline", "update", str(suite), "--root", str(root), "--out", str(tmp_path / "b"),
                 "--no-progress"]) == 0
    sleepy_ms[0] = 4.0
    rc = main(["check", str(suite), "--baseline", "auto", "--root", str(root), "--out", str(tmp_path / "n"),
               "--max-slowdown", "50%", "--alpha", "0.001", "--retries", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert f"run folder: {tmp_path / 'n'}" in out and f"run folder: {tmp_path / 'n-retry1'}" in out
    failing = [line for line in out.splitlines() if line.startswith("REGRESSION")]
    assert len(failing) == 1 and failing[0].startswith("REGRESSION sleepy.check 32px"), out
    assert ": latency 1 -> 4 ms (x4.000, p=" in failing[0], out
    base = store.read_rows(tmp_path / "b")[0]
    assert base["impl"] == "sleepy.check" and base["latency_n"] == 30  # 0.03 s target / 1 ms, within 20..30
    assert store.read_rows(tmp_path / "n")[0]["latency_n"] == 20  # 4 ms calls: min_repeats


# --- failed statuses are regressions ---------------------------------------------------------------

@pytest.mark.parametrize("status", ["timeout", "crashed", "unsupported"])
def test_ok_to_a_failed_status_is_a_regression(tmp_path, capsys, status):
    base = write_run(tmp_path / "b", [cell("mha.sdpa", 224, 10.0, seed=1), cell("toy.hang", 224, 2.0, seed=2)])
    new = write_run(tmp_path / "n", [cell("mha.sdpa", 224, 10.0, seed=3),
                                     cell("toy.hang", 224, 0, seed=4, status=status)])
    cmp = compare_runs(base, new)
    whys = [(f.cell.label.split()[0], f.why) for f in check(cmp)]
    assert whys == [("toy.hang", f"status ok -> {status} ({status}: planted)")]  # the message rides along
    assert check(cmp, fail_on_status=False) == []
    assert main(["check", str(new), "--baseline", str(base)]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION toy.hang 224px" in out and f"status ok -> {status}" in out
    assert main(["check", str(base), "--baseline", str(new)]) == 0  # the other way round: better, no failure


# --- this project's CI baseline ------------------------------------------------------------------

def test_ci_baseline_is_committed_and_checks_itself(capsys):
    rows = store.read_rows(CI_BASELINE)
    assert len(rows) >= 10 and all(r["status"] == "ok" and len(r["latency_ms_samples"]) >= 20 for r in rows)
    assert bl.device_key(store.read_env(CI_BASELINE)) == "cpu-amd-epyc-1t"
    assert main(["check", str(CI_BASELINE), "--baseline", str(CI_BASELINE), *CI_FLAGS]) == 0


def _planted_copy(tmp_path, edit):
    new = tmp_path / "new"
    shutil.copytree(CI_BASELINE, new)
    rows = store.read_rows(new)
    edit(rows)
    return write_rows(new, rows)


def test_ci_flags_fail_on_a_planted_slowdown(tmp_path, capsys):
    def slow_down(rows):
        r = next(r for r in rows if r["impl"] == "sra.conv" and r["resolution"] == 128)
        r["latency_ms_samples"] = [2.5 * s for s in r["latency_ms_samples"]]

    new = _planted_copy(tmp_path, slow_down)
    assert main(["check", str(new), "--baseline", str(CI_BASELINE), *CI_FLAGS]) == 1
    out = capsys.readouterr().out
    failing = [line for line in out.splitlines() if line.startswith("REGRESSION")]
    assert len(failing) == 1 and failing[0].startswith("REGRESSION sra.conv(sr_ratio=8) 128px") and "x2.500" in out


def test_ci_flags_fail_on_a_flops_change_and_pass_a_uniform_slowdown(tmp_path, capsys):
    def more_flops(rows):
        rows[0]["flops_torch"] += 2

    assert main(["check", str(_planted_copy(tmp_path / "a", more_flops)), "--baseline", str(CI_BASELINE),
                 *CI_FLAGS]) == 1
    assert "flops_torch" in capsys.readouterr().out

    def busy_machine(rows):  # every cell 2.5x slower: the machine, not the code
        for r in rows:
            r["latency_ms_samples"] = [2.5 * s for s in r["latency_ms_samples"]]

    busy = _planted_copy(tmp_path / "b", busy_machine)
    assert main(["check", str(busy), "--baseline", str(CI_BASELINE), *CI_FLAGS]) == 0
    assert "speed factor): x2.500" in capsys.readouterr().out
    no_norm = [a for a in CI_FLAGS if a != "--normalize"]
    assert main(["check", str(busy), "--baseline", str(CI_BASELINE), *no_norm]) == 1  # without it: every cell
