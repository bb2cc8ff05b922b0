"""The runner: rows per cell, failures as rows, budgets and skips, resume, the run folder."""

import json
import math

import pytest
import torch
import yaml

import attnbench
from attnbench import store
from attnbench.runner import prepare, run_suite
from conftest import make_suite


def suite(impls, resolution=(32, 48, 64), **kw):
    """This file's sweeps: three resolutions by default, patch 4, the device's peaks measured (as by default)."""
    return make_suite(impls, resolution, **{"patch": 4, "measure_peaks": True, **kw})


def test_rows_have_every_measurement(tmp_path):
    res = run_suite(suite(["mha.sdpa", {"sra.conv": {"sr_ratio": 2}}]), out=tmp_path / "r", progress=False)
    df = attnbench.load_results(res.run_dir)
    assert len(df) == 6 and set(df["status"]) == {"ok"}
    for col in ("params_count", "flops_analytic", "macs_fvcore", "flops_torch", "latency_ms_median",
                "latency_ms_iqr", "throughput_img_s", "throughput_tok_s"):
        assert df[col].notna().all() and (df[col] > 0).all(), col
    assert df["peak_mem_bytes"].notna().all() and (df["peak_mem_bytes"] >= 0).all()  # KiB-sized cells: page noise
    assert (df["flops_analytic"] == df["flops_torch"]).all()
    assert (df["flops_analytic"] == 2 * df["macs_fvcore_matmul"]).all()
    assert (df["sr_ratio"].dropna() == 2).all()  # implementation parameters become columns
    assert (df["tokens"] == (df["resolution"] // 4) ** 2).all()
    row = store.read_rows(res.run_dir)[0]
    assert len(row["latency_ms_samples"]) == row["latency_n"] >= 3
    env = json.loads((res.run_dir / "env.json").read_text())
    for key in ("torch", "cpu", "git", "nvml", "memory_method", "packages"):
        assert key in env
    assert env["nvml"]["available"] in (True, False)
    assert yaml.safe_load((res.run_dir / "suite.yaml").read_text())["name"] == "t"


def test_peak_memory_sees_the_attention_matrix(tmp_path):
    """mha.math materialises (B, h, N, N) logits and their softmax; mha.sdpa on CPU does not."""
    res = run_suite(suite(["mha.math", "mha.sdpa"], resolution=(128,)), out=tmp_path / "r", progress=False)
    df = attnbench.load_results(res.run_dir).set_index("impl")
    logits_bytes = 2 * 1024 * 1024 * 4  # heads x N x N float32, N = 32 x 32
    if df.loc["mha.math", "peak_mem_method"] == "rss_hwm_delta":
        # two N x N buffers live at once (logits and their softmax); the RSS method is good to a few pages
        assert df.loc["mha.math", "peak_mem_bytes"] >= 0.98 * 2 * logits_bytes
        assert df.loc["mha.sdpa", "peak_mem_bytes"] < logits_bytes


def test_failing_cell_does_not_end_the_sweep(tmp_path):
    res = run_suite(suite(["toy.fail", "toy.proj"]), out=tmp_path / "r", progress=False)
    df = attnbench.load_results(res.run_dir).set_index(["impl", "resolution"])
    assert df.loc[("toy.fail", 32), "status"] == "ok"  # grid 8
    assert df.loc[("toy.fail", 48), "status"] == "error"
    assert "toy failure" in df.loc[("toy.fail", 48), "message"]
    assert df.loc[("toy.fail", 64), "status"] == "error"  # errors do not block larger cells: each is tried
    assert (df.loc["toy.proj", "status"] == "ok").all()
    assert "toy failure" in (res.run_dir / "errors.log").read_text()


def test_oom_skips_larger_resolutions(tmp_path):
    res = run_suite(suite(["toy.oom"], resolution=(32, 48, 64, 96)), out=tmp_path / "r", progress=False)
    rows = {r["resolution"]: r for r in res.rows}
    assert rows[32]["status"] == "ok"
    assert rows[48]["status"] == "oom" and "out of memory" in rows[48]["message"]
    assert rows[64]["status"] == rows[96]["status"] == "oom"
    assert rows[96]["message"] == "skipped: resolution 48 was oom"
    assert rows[96]["flops_analytic"] > 0  # FLOPs are still counted for cells not run


# the budget rule on a scripted clock: toy.proj's measured call "takes" 0.1 ms per token, whatever the machine
SCRIPTED_TIMING = {"warmup_s": 0.0, "target_s": 0.05, "min_repeats": 3, "max_repeats": 5, "sentinel": False,
                   "min_sample_s": 0.0}


def per_token(module, x):
    return x.shape[1] * x.shape[2] * 1e-4  # grids 8, 16, 32, 64: 6.4, 25.6, 102.4, 409.6 ms a call


def test_time_budget_predicts_and_skips(tmp_path, scripted_calls):
    scripted_calls.cost = per_token
    s = suite(["toy.proj"], resolution=(32, 64, 128, 256, 512), budget={"cell_time_s": 1.0}, timing=SCRIPTED_TIMING)
    res = run_suite(s, out=tmp_path / "r", progress=False)
    rows = {r["resolution"]: r for r in res.rows}
    assert [rows[r]["status"] for r in (32, 64, 128)] == ["ok"] * 3
    # 0.05 s target: 8 calls of 6.4 ms, capped at 5; 2 of 25.6 ms and 1 of 102 ms, raised to min_repeats 3
    assert rows[32]["latency_ms_samples"] == [6.4] * 5
    assert rows[64]["latency_ms_samples"] == [25.6] * 3 and rows[128]["latency_ms_samples"] == [102.4] * 3
    # resolution 128 -> 256: 4x the FLOPs, 0.41 s a call predicted, x (3 + min_repeats) calls > 1 s: not tried
    # (the first call, a warm-up call and the peak-memory call come before the min_repeats timed ones)
    assert rows[256]["status"] == "over_budget"
    assert rows[256]["message"] == ("predicted 0.41 s per call (resolution 128: 102 ms, scaled by FLOPs) x 6 calls "
                                    "exceeds the cell budget of 1 s")
    assert "latency_n" not in rows[256] and "measure_s" not in rows[256]
    assert {grid for _, grid, _ in scripted_calls.calls} == {8, 16, 32}  # no call of grid 64 or 128 was made
    assert rows[512]["status"] == "over_budget"
    assert rows[512]["message"] == "skipped: resolution 256 was over_budget"
    assert res.measured == 4 and res.skipped == 1


def test_time_budget_prediction_passes_what_fits(tmp_path, scripted_calls):
    """The same step of 4x with a budget of 2.5 s: 0.41 s predicted x (3 + min_repeats) = 6 calls, 2.46 s,
    fits, so the cell is measured."""
    scripted_calls.cost = per_token
    s = suite(["toy.proj"], resolution=(128, 256), budget={"cell_time_s": 2.5}, timing=SCRIPTED_TIMING)
    rows = run_suite(s, out=tmp_path / "r", progress=False).rows
    assert [r["status"] for r in rows] == ["ok", "ok"], rows[1]["message"]
    assert rows[1]["latency_ms_samples"] == [409.6] * 3


def test_first_call_over_half_the_budget_stops_the_cell(tmp_path, scripted_calls):
    scripted_calls.cost = per_token
    s = suite(["toy.proj"], resolution=(256, 512), budget={"cell_time_s": 0.8}, timing=SCRIPTED_TIMING)
    rows = run_suite(s, out=tmp_path / "r", progress=False).rows
    assert rows[0]["status"] == "over_budget"  # no prior: the first call itself decides
    assert rows[0]["message"] == "the first call took 0.41 s, over half the cell budget of 0.8 s"
    assert scripted_calls.calls == [(1, 64, 64)]  # that call, and nothing after it
    assert rows[0]["measure_s"] == pytest.approx(0.4096) and "latency_n" not in rows[0]
    assert rows[1]["status"] == "over_budget" and rows[1]["message"] == "skipped: resolution 256 was over_budget"


@pytest.mark.parametrize("budget_s,status", [(2.0, "over_budget"), (2.5, "ok")])
def test_min_repeats_must_fit_in_what_is_left(tmp_path, scripted_calls, budget_s, status):
    """409.6 ms calls: the first, one warm-up and the peak-memory call use 1.2288 s of the budget; 3 more
    (min_repeats) need 1.2288 s: over a budget of 2 s (0.771 s left), within one of 2.5 s (1.27 s left)."""
    scripted_calls.cost = per_token
    s = suite(["toy.proj"], resolution=(256,), budget={"cell_time_s": budget_s}, timing=SCRIPTED_TIMING)
    row = run_suite(s, out=tmp_path / "r", progress=False).rows[0]
    assert row["status"] == status, row["message"]
    if status == "over_budget":
        assert row["message"] == "3 calls of 410 ms exceed the 0.771 s left of the cell budget of 2 s"
        assert len(scripted_calls.calls) == 3 and row["measure_s"] == pytest.approx(1.2288)
    else:
        assert row["latency_ms_samples"] == [409.6] * 3 and row["warmup_calls"] == 2
        assert len(scripted_calls.calls) == 6 and row["measure_s"] == pytest.approx(6 * 0.4096)


def test_memory_budget_predicts_from_the_prior_cell(tmp_path, monkeypatch):
    """CPU: the last measured cell's peak memory scaled by tokens^2 against memory_fraction x the memory available."""
    from attnbench.measure import memory

    def one_mib(fn, device):
        fn()
        return float(2**20), memory.CPU_METHOD

    monkeypatch.setattr(memory, "peak_memory_bytes", one_mib)  # every cell's call peaks at 1 MiB
    monkeypatch.setattr(memory, "available_memory_bytes", lambda device: 8 * 2**20)
    # tokens 64, 100, 256, 576: 32 -> 40 predicts 1 MiB x (100/64)^2 = 2.4 MiB, 40 -> 64 predicts 6.6 MiB
    s = suite(["toy.proj"], resolution=(32, 40, 64, 96), budget={"memory_fraction": 0.6})
    rows = run_suite(s, out=tmp_path / "r", progress=False).rows
    assert [r["status"] for r in rows] == ["ok", "ok", "over_budget", "over_budget"], [r["message"] for r in rows]
    assert rows[2]["message"] == ("predicted peak memory 0.0064 GiB (resolution 40 scaled by tokens^2) exceeds the "
                                  "memory budget 0.00469 GiB")
    assert "latency_n" not in rows[2]
    assert rows[3]["message"] == "skipped: resolution 64 was over_budget"
    # a larger fraction of the same memory lets the 6.6 MiB cell run
    s = suite(["toy.proj"], resolution=(32, 40, 64), budget={"memory_fraction": 0.9})
    assert [r["status"] for r in run_suite(s, out=tmp_path / "r2", progress=False).rows] == ["ok"] * 3


def test_unsupported_shape_is_a_row(tmp_path):
    res = run_suite(suite(["toy.picky"], resolution=(32, 36, 40)), out=tmp_path / "r", progress=False)
    st = [r["status"] for r in res.rows]
    assert st == ["ok", "unsupported", "ok"]  # grid 9 is odd; unsupported does not block larger cells
    assert "odd" in res.rows[1]["message"]


def test_train_mode_and_dtypes(tmp_path):
    res = run_suite(suite(["mha.math"], resolution=(32,), mode=["forward", "train"], dtype=["float32", "bfloat16"]),
                    out=tmp_path / "r", progress=False)
    df = attnbench.load_results(res.run_dir)
    assert set(df["status"]) == {"ok"} and len(df) == 4
    train = df[df["mode"] == "train"]
    assert (train["flops_torch_fwd_bwd"] == 3 * train["flops_torch"]).all()


def test_reparameterizable_modules_are_measured_merged_in_forward_mode(tmp_path):
    res = run_suite(suite(["local.slide", "local.shift_dwconv"], resolution=(32,), mode=["forward", "train"]),
                    out=tmp_path / "r", progress=False)
    df = attnbench.load_results(res.run_dir).set_index(["impl", "mode"])
    assert set(df["status"]) == {"ok"}
    assert df.loc[("local.slide", "forward"), "reparameterized"] == True  # noqa: E712
    assert df.loc[("local.slide", "train"), "reparameterized"] == False  # noqa: E712
    # merged: one shift convolution, like shift_dwconv; two-path (train): two
    assert df.loc[("local.slide", "forward"), "flops_torch"] == df.loc[("local.shift_dwconv", "forward"), "flops_torch"]
    assert df.loc[("local.slide", "train"), "flops_torch"] > df.loc[("local.shift_dwconv", "train"), "flops_torch"]


def test_resume_measures_only_missing_cells(tmp_path):
    s = suite(["toy.proj", "mha.sdpa"])
    out = tmp_path / "r"
    first = run_suite(s, out=out, progress=False)
    lines = (out / "rows.jsonl").read_text().splitlines(keepends=True)
    (out / "rows.jsonl").write_text("".join(lines[:2]) + lines[2][:25])  # killed mid-write of the third
    again = run_suite(s, out=out, resume=True, progress=False)
    assert again.reused == 2 and again.measured == 4
    rows = store.read_rows(out)
    assert [r["cell_id"] for r in rows[:2]] == [json.loads(l)["cell_id"] for l in lines[:2]]
    assert sorted(r["cell_id"] for r in rows) == sorted(r["cell_id"] for r in first.rows)
    assert (out / "env.1.json").exists()


def test_existing_run_folder_needs_resume(tmp_path):
    s = suite(["toy.proj"], resolution=(32,))
    run_suite(s, out=tmp_path / "r", progress=False)
    with pytest.raises(attnbench.RunDirError, match="--resume"):
        run_suite(s, out=tmp_path / "r", progress=False)


def test_only_filters_and_rejects_empty_selection():
    s = suite(["toy.proj", "mha.sdpa", "mha.math"])
    _, _, cases = prepare(s, only="mha.*")
    assert {c.impl for c in cases} == {"mha.sdpa", "mha.math"}
    with pytest.raises(attnbench.SuiteError, match="selects no cell"):
        prepare(s, only="nosuch.*")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_device_error():
    with pytest.raises(attnbench.DeviceError, match="no CUDA device"):
        prepare(suite(["mha.sdpa"]), device="cuda")


def test_default_run_folder_and_resume_latest(tmp_path):
    s = suite(["toy.proj"], resolution=(32,))
    res = run_suite(s, results_root=tmp_path, progress=False)
    assert res.run_dir.parent == tmp_path / "t"
    again = run_suite(s, results_root=tmp_path, resume=True, progress=False)
    assert again.run_dir == res.run_dir and again.reused == 1 and again.measured == 0


def test_inputs_are_not_zero(tmp_path, monkeypatch):
    seen = []
    from attnbench import cell

    orig = cell.make_call

    def spy(module, x, mode):
        seen.append(x.detach().abs().mean().item())
        return orig(module, x, mode)

    monkeypatch.setattr(cell, "make_call", spy)
    run_suite(suite(["toy.proj"], resolution=(32,)), out=tmp_path / "r", progress=False)
    assert seen and all(v > 0.5 for v in seen)


def test_seed_fixes_the_input_and_the_weights(tmp_path, monkeypatch):
    from attnbench import cell

    seen = []
    real = cell.make_call

    def spy(module, x, mode):
        seen.append((x.detach().clone(), {k: v.detach().clone() for k, v in module.state_dict().items()}))
        return real(module, x, mode)

    monkeypatch.setattr(cell, "make_call", spy)
    for i, seed in enumerate((7, 7, 8)):
        run_suite(suite(["toy.proj"], resolution=(32,), seed=seed, measure_peaks=False), out=tmp_path / f"r{i}",
                  progress=False)
    (x1, w1), (x2, w2), (x3, w3) = seen
    assert set(w1) == {"proj.weight", "proj.bias"}
    assert torch.equal(x1, x2) and all(torch.equal(w1[k], w2[k]) for k in w1)  # same seed: same cell
    assert not torch.equal(x1, x3) and not any(torch.equal(w1[k], w3[k]) for k in w1)  # another seed: another


def test_threads_are_applied_and_recorded(tmp_path, keep_torch_globals):
    want = 1 if torch.get_num_threads() != 1 else 2
    res = run_suite(suite(["toy.proj"], resolution=(32, 48), threads=want, measure_peaks=False), out=tmp_path / "r",
                    progress=False)
    assert [r["cpu_threads"] for r in res.rows] == [want, want]
    assert json.loads((res.run_dir / "env.json").read_text())["torch"]["num_threads"] == want


def test_tf32_is_applied_through_apply_globals_and_none_on_cpu(tmp_path, monkeypatch, keep_torch_globals):
    from attnbench import device as device_mod
    from attnbench import runner

    applied = []
    real = runner.apply_globals

    def spy(threads, tf32, dev):
        applied.append((tf32, dev.type))
        return real(threads, tf32, dev)

    monkeypatch.setattr(runner, "apply_globals", spy)
    for i, tf32 in enumerate((True, False)):
        row = run_suite(suite(["toy.proj"], resolution=(32,), tf32=tf32, measure_peaks=False), out=tmp_path / f"r{i}",
                        progress=False).rows[0]
        assert row["status"] == "ok" and row["tf32"] is None  # recorded per row; TF32 means nothing on CPU
    assert applied == [(True, "cpu"), (False, "cpu")]
    # on a CUDA device apply_globals sets TF32 (torch's flags exist without a GPU); on CPU it leaves them
    cuda = torch.device("cuda")
    for value in (True, False, True):
        assert device_mod.apply_globals(None, value, cuda)["tf32"] is value
        assert torch.backends.cuda.matmul.allow_tf32 is value and torch.backends.cudnn.allow_tf32 is value
    assert device_mod.apply_globals(None, None, cuda)["tf32"] is True  # null: torch's setting left as it is
    assert device_mod.apply_globals(None, False, torch.device("cpu"))["tf32"] is None
    assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True


@pytest.mark.gpu
def test_gpu_run(tmp_path, keep_torch_globals):
    res = run_suite(suite(["mha.sdpa", "mha.math"], device="cuda", tf32=True), out=tmp_path / "r", progress=False)
    df = attnbench.load_results(res.run_dir)
    assert set(df["status"]) == {"ok"}
    assert (df["tf32"] == True).all()  # noqa: E712 - applied, and recorded per row
    assert (df["dtype"] == "bfloat16").all() and (df["peak_mem_method"] == "cuda_allocator_peak_delta").all()
    assert not math.isnan(df["peak_mem_bytes"].iloc[0])


def test_budget_messages_write_times_without_scientific_notation():
    from attnbench.budget import Prior, time_problem, time_text

    assert [time_text(s) for s in (0.00085, 0.102, 2.99)] == ["0.85 ms", "102 ms", "2.99 s"]
    assert time_text(0.41, "s") == "0.41 s" and time_text(3300, "s") == "3300 s"
    prior = Prior(resolution=640, latency_ms=1600.0, flops=1e9, tokens=25600, peak_mem_bytes=1e6)
    text = time_problem(prior, 2e9, 8, 20.0)
    assert "e+" not in text and "(resolution 640: 1.6 s, scaled by FLOPs)" in text
