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


def test_time_budget_predicts_and_skips(tmp_path):
    # toy.slow sleeps 0.1 ms per token: grids 8, 16, 32, 64 take 6.4, 26, 102, 410 ms a call
    s = suite(["toy.slow"], resolution=(32, 64, 128, 256, 512), budget={"cell_time_s": 1.0},
              timing={"warmup_s": 0.0, "target_s": 0.05, "min_repeats": 3, "max_repeats": 5})
    res = run_suite(s, out=tmp_path / "r", progress=False)
    rows = {r["resolution"]: r for r in res.rows}
    assert [rows[r]["status"] for r in (32, 64, 128)] == ["ok"] * 3
    assert rows[256]["status"] == "over_budget"  # predicted ~0.41 s x 4 calls > 1 s
    assert "predicted" in rows[256]["message"] and "latency_n" not in rows[256]  # not tried
    assert rows[512]["status"] == "over_budget"
    assert rows[512]["message"] == "skipped: resolution 256 was over_budget"


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


@pytest.mark.gpu
def test_gpu_run(tmp_path):
    res = run_suite(suite(["mha.sdpa", "mha.math"], device="cuda"), out=tmp_path / "r", progress=False)
    df = attnbench.load_results(res.run_dir)
    assert set(df["status"]) == {"ok"}
    assert (df["dtype"] == "bfloat16").all() and (df["peak_mem_method"] == "cuda_allocator_peak_delta").all()
    assert not math.isnan(df["peak_mem_bytes"].iloc[0])
