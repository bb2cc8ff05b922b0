"""CUDA paths of the cell that a CPU can check with fakes (issue 13): the current device, both TF32
switches, the input made on its device in its dtype, the largest-batch search in the measured context,
out-of-memory clean-up outside the exception, memory freed between cells, train FLOPs without a
forward-only stand-in."""

import gc
import weakref

import pytest
import torch

from attnbench import build, cell, device as device_mod
from attnbench.runner import prepare, run_suite
from conftest import FAST_TIMING, make_suite


def test_a_cuda_n_run_makes_that_gpu_current(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: seen.append(index))
    saved = device_mod.saved_globals()
    try:
        state = device_mod.apply_globals(None, True, torch.device("cuda:1"))
        assert seen == [1]
        assert state["tf32"] is True and state["tf32_cudnn"] is True  # the suite's tf32 reaches both switches
        device_mod.apply_globals(None, False, torch.device("cuda:1"))
        assert torch.backends.cudnn.allow_tf32 is False and torch.backends.cuda.matmul.allow_tf32 is False
        device_mod.apply_globals(None, None, torch.device("cpu"))
        assert seen == [1, 1]  # nothing for the CPU
    finally:
        device_mod.restore_globals(saved)


def test_rows_record_both_tf32_switches(tmp_path):
    row = run_suite(make_suite(["toy.proj"]), out=tmp_path / "r", progress=False).rows[0]
    assert "tf32" in row and "tf32_cudnn" in row and row["tf32_cudnn"] is None  # None on CPU


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_input_is_made_in_its_dtype_where_it_is_used(dtype, monkeypatch):
    _suite, _dev, cases = prepare(make_suite(["toy.proj"], dtype=dtype))
    made = []
    real = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: made.append(k) or real(*a, **k))
    x = build.random_input(cases[0], 2, seed=0)
    assert x.dtype == getattr(torch, dtype) and made[0]["dtype"] == getattr(torch, dtype)
    assert made[0]["device"] == "cpu" and x.abs().mean() > 0.5  # never zeros
    assert torch.equal(x, build.random_input(cases[0], 2, seed=0))


def test_the_batch_search_runs_under_the_pinned_backend(tmp_path, monkeypatch):
    backends = []
    real = cell.sdpa_context

    def spy(name):
        backends.append(name)
        return real(name)

    monkeypatch.setattr(cell, "sdpa_context", spy)
    run_suite(make_suite(["mha.sdpa"], find_max_batch=True, batch=2, sdpa_backend="math"), out=tmp_path / "r",
              progress=False)
    assert backends[0] == "math" and len(backends) >= 2  # the search, then the measurement


def test_out_of_memory_clean_up_happens_after_the_exception_is_gone(tmp_path, monkeypatch):
    held = []

    class Hog(torch.nn.Module):
        def forward(self, x):
            activation = torch.empty(1)
            held.append(weakref.ref(activation))
            if x.shape[0] > 1:
                raise torch.OutOfMemoryError("CUDA out of memory (fake)")
            return x

    alive_at_cleanup = []
    real_collect = gc.collect
    def collect(*a):  # record what is alive when the clean-up runs, whatever collect() returns
        alive_at_cleanup.append([r() is not None for r in held])
        return real_collect(*a)

    monkeypatch.setattr(build.gc, "collect", collect)
    _suite, _dev, cases = prepare(make_suite(["toy.proj"], batch=4))
    batch, tries, _first_call_s = build.find_max_batch(cases[0], Hog(), cell.CellSettings())
    assert batch == 1 and [t["fits"] for t in tries][-1] is True
    assert alive_at_cleanup and not any(any(alive) for alive in alive_at_cleanup)


def test_a_cells_module_and_input_are_freed_after_it(tmp_path, monkeypatch):
    refs = []
    real = build.module_builder

    def spy(case):
        make = real(case)

        def built():
            m = make()
            refs.append(weakref.ref(m))
            return m

        return built

    monkeypatch.setattr(cell, "module_builder", spy)
    run_suite(make_suite(["toy.proj"], resolution=(32, 48), timing={**FAST_TIMING, "sentinel": False}),
              out=tmp_path / "r", progress=False)
    gc.collect()
    assert refs and all(r() is None for r in refs)


def test_train_mode_has_no_forward_only_stand_in(tmp_path, monkeypatch):
    from attnbench.measure import flops

    real = flops.count_flops

    def broken_torch_counter(*args, **kwargs):
        out = real(*args, **kwargs)
        out.pop("flops_torch_fwd_bwd", None)
        out["count_message"] = "torch counter: failed (fake)"
        return out

    monkeypatch.setattr(flops, "count_flops", broken_torch_counter)
    rows = run_suite(make_suite(["toy.proj"], mode=["forward", "train"]), out=tmp_path / "r", progress=False).rows
    by_mode = {r["mode"]: r for r in rows}
    assert by_mode["forward"]["tflops_count"] == "flops_torch" and by_mode["forward"]["tflops_achieved"] > 0
    assert by_mode["train"]["tflops_count"] == "" and by_mode["train"]["tflops_achieved"] != by_mode["train"][
        "tflops_achieved"]  # NaN, not the forward count over a forward + backward latency


# --- on a GPU (skipped here: this project's CPU machines have none) -----------------------------------

BUILTIN_PARAMS = {"deform.dat": {"groups": 2}}  # its default 3 groups must divide the heads


def every_builtin_suite(device: str):
    """A suite of every builtin implementation at a shape each accepts: dim 64 and 4 heads (head size 16,
    the least FlexAttention's CUDA kernel takes; cswin.cross wants an even head count), 16 x 16 tokens.
    The flex forms stay in: torch.compile'd flex_attention is captured in a CUDA graph like any kernel."""
    import attnbench

    builtin = [n for n, s in attnbench.specs().items() if s.source == "builtin"]
    impls = [{n: BUILTIN_PARAMS[n]} if n in BUILTIN_PARAMS else n for n in builtin]
    return make_suite(impls, device=device, resolution=(64,), dim=64, heads=4,
                      timing={**FAST_TIMING, "cuda_graph": True})


def test_every_builtin_case_of_the_graph_capture_test_builds():
    """The GPU test's cells, on the CPU: the suite validates, every cell passes its supports and output
    checks on meta and builds, and no FlexAttention form refuses CUDA's head size."""
    _suite, _dev, cases = prepare(every_builtin_suite("cpu"))
    for case in cases:
        make = build.module_builder(case)
        build.check_supports(case, make)
        build.check_output(case, make)
        module = make()
        assert not hasattr(module, "supports_device") or module.supports_device("cuda") is None, case.impl


@pytest.mark.gpu
def test_gpu_every_builtin_implementation_is_graph_captured(tmp_path):
    res = run_suite(every_builtin_suite("cuda"), out=tmp_path / "r", progress=False)
    for row in res.rows:
        assert row["status"] == "ok", (row["impl"], row["message"])
        assert row["timing_method"] == "cuda_graph_replay", (row["impl"], row["timing_method"])


@pytest.mark.gpu
def test_gpu_peak_fraction_and_readings_under_load(tmp_path):
    res = run_suite(make_suite(["mha.sdpa", "swin.window"], device="cuda", resolution=(224, 448), measure_peaks=True,
                               timing={**FAST_TIMING, "target_s": 0.2}), out=tmp_path / "r", progress=False)
    for row in res.rows:
        assert row["status"] == "ok", row["message"]
        assert 0 < row["peak_fraction"] <= 1 or row["over_peak"]
        if row["telemetry"] == "nvml":  # real NVML readings taken while the calls ran
            assert row["gpu_load_samples"] >= 1 and row["gpu_load_sm_clock_mhz_median"] > 0
            assert row["gpu_load_power_w_max"] > 0


@pytest.mark.gpu
def test_gpu_batch_search_recovers_from_a_real_out_of_memory(tmp_path):
    free, _total = torch.cuda.mem_get_info()
    # mha.math at 128 x 128 tokens holds batch x 3 x 16384^2 x 2 bytes of attention: 1.6 GB per image in
    # bfloat16; ask for far more images than fit, so the first tries really run out of memory
    batch = 1 << max(1, int(free / 1.6e9).bit_length() + 2)
    res = run_suite(make_suite(["mha.math"], device="cuda", dtype="bfloat16", dim=48, heads=3, resolution=(512,),
                               batch=batch, find_max_batch=True, budget={"memory_fraction": 1.0}),
                    out=tmp_path / "r", progress=False)
    row = res.rows[0]
    assert row["status"] == "ok", row["message"]
    assert row["batch"] < batch and any(t["why"] == "out of memory" for t in row["batch_search"] if not t["fits"])
