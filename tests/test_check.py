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
CI_FLAGS: list = []  # .ci/run uses the defaults


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
    assert "exceeds the noise band x1.2" in out and "(20% floor, median bounds" in out and "at alpha 0.01" in out
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
    assert main(["check", str(busy), "--baseline", str(CI_BASELINE), "--no-normalize"]) == 1  # every cell


def test_ci_defaults_fail_on_a_sub_millisecond_2x_and_a_25pct_slowdown(tmp_path, capsys):
    def slow(impl, res, factor):
        def edit(rows):
            r = next(r for r in rows if r["impl"] == impl and r["resolution"] == res)
            n = max(20, round(len(r["latency_ms_samples"]) / factor))
            r["latency_ms_samples"] = [factor * s for s in r["latency_ms_samples"][:n]]
        return edit

    for i, (impl, res, factor) in enumerate([("swin.window", 64, 2.0), ("mvit.pool", 128, 1.25),
                                             ("mha.sdpa", 128, 1.25)]):
        new = _planted_copy(tmp_path / str(i), slow(impl, res, factor))
        assert main(["check", str(new), "--baseline", str(CI_BASELINE)]) == 1
        out = capsys.readouterr().out
        failing = [line for line in out.splitlines() if line.startswith("REGRESSION")]
        assert len(failing) == 1 and f" {res}px" in failing[0] and failing[0].startswith(f"REGRESSION {impl}"), out


# --- defaults that hold: noise passes, real changes fail ----------------------------------------------

def _realistic(tmp_path, name, seed, speed=1.0, slow=None, burst=None, mem=None):
    """12 cells like ci_smoke's (0.35 to 8 ms) measured once: per-call lognormal noise (3%), a run-to-run
    shift of each cell's median up to +-5% (unchanged code, another run), the whole machine ``speed``
    times slower; ``slow`` {impl: factor} a real slowdown; ``burst`` an impl whose calls were slowed
    2x in 30% of the calls (load); ``mem`` {impl: bytes} peak memory replaced."""
    import numpy as np

    rng = np.random.default_rng(seed)
    impls = [("mha.sdpa", 0.52), ("mha.math", 0.55), ("sra.conv", 0.49), ("swin.window", 0.35),
             ("local.im2col", 1.4), ("mvit.pool", 0.65), ("mha.sdpa2", 5.5), ("mha.math2", 7.6),
             ("sra.conv2", 1.05), ("swin.window2", 1.2), ("local.im2col2", 7.5), ("mvit.pool2", 2.2)]
    rows = []
    for impl, ms in impls:
        n = int(min(200, max(20, 200 / ms)))
        shift = rng.uniform(-0.05, 0.05)
        samples = ms * speed * np.exp(shift) * (slow or {}).get(impl, 1.0) * rng.lognormal(0, 0.03, n)
        if impl == burst:
            samples[rng.random(n) < 0.3] *= 2.0
        r = cell(impl, 224, 1.0, seed=0, mem=(mem or {}).get(impl, 13.05 * 2**20))
        r["latency_ms_samples"] = samples.tolist()
        rows.append(r)
    return write_run(tmp_path / name, rows)


def test_unchanged_pairs_with_realistic_noise_pass_with_defaults(tmp_path, capsys):
    for seed in range(8):
        base = _realistic(tmp_path, f"b{seed}", seed)
        new = _realistic(tmp_path, f"n{seed}", 100 + seed, speed=1.0 + 0.1 * seed,
                         burst="mha.sdpa2" if seed % 2 else None,
                         mem={"mha.sdpa": 15.29 * 2**20, "mha.math2": 17.0 * 2**20})  # resident-set wobble
        assert main(["check", str(new), "--baseline", str(base)]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "thresholds: latency fails when its ratio over the machine's speed factor" in out
    assert "pass mha.sdpa 224px" in out and "within the noise band x1.1" in out
    assert "within the tolerance +-6 MiB (CPU resident-set peak" in out


def test_a_cell_measured_without_a_free_core_is_not_judged(tmp_path, capsys):
    """Other processes took 1.8 of the 2 cores while mha.math2 ran (one thread): its 4x is the machine's
    doing, and it is reported as not judged; one core taken (a busy loop beside a 1-thread suite) is not
    oversubscription, and a real slowdown there fails."""
    base = _realistic(tmp_path, "b", 1)
    new = _realistic(tmp_path, "n", 2, slow={"mha.math2": 4.0, "sra.conv2": 1.5})
    rows = store.read_rows(new)
    for r in rows:
        r["cpu_threads"] = 1
        r["cpu_others_cores"] = 1.8 if r["impl"] == "mha.math2" else 1.0
    write_rows(new, rows)
    assert main(["check", str(new), "--baseline", str(base)]) == 1
    out = capsys.readouterr().out
    failing = [line for line in out.splitlines() if line.startswith("REGRESSION")]
    assert len(failing) == 1 and failing[0].startswith("REGRESSION sra.conv2"), out
    assert "pass mha.math2 224px" in out and "NOT JUDGED: other processes took 1.80 CPU cores" in out
    rows[[r["impl"] for r in rows].index("sra.conv2")]["latency_ms_samples"] = \
        store.read_rows(base)[[r["impl"] for r in rows].index("sra.conv2")]["latency_ms_samples"]
    write_rows(new, rows)
    assert main(["check", str(new), "--baseline", str(base)]) == 0
    assert "1 cell(s) NOT JUDGED on latency" in capsys.readouterr().out
    assert main(["check", str(new), "--baseline", str(base), "--require-judged"]) == 1
    assert "check FAILED: 1 cell(s) could not be judged" in capsys.readouterr().out


def test_planted_slowdowns_fail_with_defaults(tmp_path, capsys):
    caught = {"mha.sdpa2": 0, "swin.window": 0}
    for seed in range(8):
        base = _realistic(tmp_path, f"b{seed}", seed)
        new = _realistic(tmp_path, f"n{seed}", 100 + seed, speed=1.2, slow={"mha.sdpa2": 1.25, "swin.window": 2.0})
        assert main(["check", str(new), "--baseline", str(base)]) == 1
        failing = [line for line in capsys.readouterr().out.splitlines() if line.startswith("REGRESSION")]
        for impl in caught:
            caught[impl] += any(line.startswith(f"REGRESSION {impl} ") for line in failing)
        assert len(failing) <= 2
    assert caught["swin.window"] == 8 and caught["mha.sdpa2"] >= 7  # 25% against up to +-10% run-to-run shifts


def test_cpu_rss_wobble_passes_and_an_n_by_n_buffer_fails(tmp_path):
    from attnbench.analysis.compare import compare_runs

    mib = 2**20
    nxn = 3 * (128 // 4) ** 4 * 4  # mha at 128 px: one N x N float32 score matrix per head, N = 1024: 12 MiB
    rows_b = [cell("mha.sdpa", 128, 5.0, seed=1, mem=1.88 * mib), cell("mha.math", 128, 7.0, seed=2, mem=13.05 * mib),
              cell("local.im2col", 128, 7.5, seed=3, mem=12.30 * mib)]
    rows_n = [cell("mha.sdpa", 128, 5.0, seed=4, mem=1.88 * mib + nxn), cell("mha.math", 128, 7.0, seed=5, mem=15.29 * mib),
              cell("local.im2col", 128, 7.5, seed=6, mem=16.22 * mib)]
    base, new = write_run(tmp_path / "b", rows_b), write_run(tmp_path / "n", rows_n)
    fails = check(compare_runs(base, new))
    assert [(f.cell.label.split()[0], f.metric.metric) for f in fails] == [("mha.sdpa", "peak_mem_bytes")]
    assert "exceeds the tolerance +6 MiB (CPU resident-set peak" in fails[0].why
    # the CUDA allocator's peak is exact: a 1 MiB growth fails there, and is noise for the resident set
    for r in rows_b + rows_n:
        r["peak_mem_method"] = "cuda_allocator_peak_delta"
    rows_n[1]["peak_mem_bytes"] = 13.05 * mib + 1 * mib
    rows_n[2]["peak_mem_bytes"] = 12.30 * mib
    cuda = check(compare_runs(write_run(tmp_path / "cb", rows_b), write_run(tmp_path / "cn", rows_n)))
    assert sorted(f.cell.label.split()[0] for f in cuda) == ["mha.math", "mha.sdpa"]


def test_a_baseline_from_several_runs_records_each_cells_spread(tmp_path, capsys):
    import numpy as np

    def run(name, seed, flaky_shift):
        rng = np.random.default_rng(seed)
        rows = [cell(i, 224, 3.0 + k, seed=seed * 10 + k, sigma=0.02) for k, i in
                enumerate(["mha.sdpa", "sra.conv", "swin.window", "mvit.pool"])]
        flaky = cell("local.im2col", 224, 2.0, seed=seed, sigma=0.02)
        flaky["latency_ms_samples"] = (np.asarray(flaky["latency_ms_samples"]) * flaky_shift).tolist()
        del rng
        return write_run(tmp_path / name, rows + [flaky])

    r1, r2, r3 = run("r1", 1, 1.0), run("r2", 2, 1.3), run("r3", 3, 1.1)
    dest = tmp_path / "baseline"
    assert main(["baseline", "update", str(r1), str(r2), str(r3), "--dest", str(dest)]) == 0
    assert "run-to-run spread recorded from 3 runs" in capsys.readouterr().out
    meta = json.loads((dest / "baseline.json").read_text())
    spread = meta["noise"]["cells"]["local.im2col-224"]["latency_spread"]
    assert meta["noise"]["runs"] == 3 and 0.15 < spread < 0.2  # ln(1.3 / 1.1)
    assert meta["noise"]["cells"]["mha.sdpa-224"]["latency_spread"] < 0.02
    # 25% slower: within the flaky cell's band (2 x its spread), a regression in a steady cell
    new = run("n", 4, 1.25 * 1.0)
    assert main(["check", str(new), "--baseline", str(dest)]) == 0
    out = capsys.readouterr().out
    assert "2 x run-to-run spread" in out and "recorded from the baseline's 3 runs" in out
    steady = write_run(tmp_path / "n2", [cell(i, 224, (3.0 + k) * (1.25 if i == "sra.conv" else 1), seed=50 + k,
                                             sigma=0.02) for k, i in enumerate(["mha.sdpa", "sra.conv", "swin.window",
                                                                                "mvit.pool"])]
                       + [cell("local.im2col", 224, 2.0, seed=9, sigma=0.02)])
    assert main(["check", str(steady), "--baseline", str(dest)]) == 1
    assert "REGRESSION sra.conv 224px" in capsys.readouterr().out


def test_baseline_update_bad_input_exit_2(tmp_path, capsys):
    base, new = planted_pair(tmp_path)
    other = write_run(tmp_path / "other", store.read_rows(new), env={**SYNTH_ENV, "suite_name": "other"})
    assert main(["baseline", "update", str(base), str(other), "--dest", str(tmp_path / "d")]) == 2
    assert "not a run of suite 'synth'" in capsys.readouterr().err
    assert main(["baseline", "update", str(base), "--repeat", "0", "--dest", str(tmp_path / "d")]) == 2
    assert "--repeat 0 must be >= 1" in capsys.readouterr().err
    assert main(["check", str(new), "--baseline", str(base), "--max-slowdown", "lots"]) == 2
    assert "not a percentage" in capsys.readouterr().err
