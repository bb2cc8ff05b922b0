"""The FlexAttention forms on CUDA and in the harness: the CUDA token layout against torch's own CUDA kernel
configs, what CUDA refuses, a CUDA cell's counts, compile time and compile: true, and the GPU check of every
form (forward and backward on CUDA; its logic on the CPU in the CUDA layout)."""

import pytest
import torch

import attnbench
from conftest import randomize_
from test_flex import FORMS


CAPABILITIES = [(8, 0), (9, 0), (10, 0), (12, 0)]  # A100, H100, B200, RTX 50


@pytest.mark.parametrize("name", list(FORMS))
def test_cuda_layout_blocks_fit_every_default_cuda_kernel_config(name, monkeypatch):
    """On CUDA inductor tiles each sparse block by its default (BLOCK_M, BLOCK_N) and refuses a block they do
    not divide (forward: an error; backward: no config left). Asked for its default configs as on four GPU
    generations (the capability faked), for every dtype and head size, torch's own heuristics divide the
    CUDA layout's blocks, forward and backward; the CPU layout's Swin block (49) they do not, which is
    what the CUDA layout is for."""
    heuristics = pytest.importorskip("torch._inductor.template_heuristics.triton")
    cfg = heuristics.CUDAConfigHeuristic()
    import inspect  # the private signature moves between releases: (head_dim, dtype) in 2.11, seq_len added since

    def configs(kind, head_dim, dtype):
        fn = getattr(cfg, f"get_flex_attn_{kind}_configs")
        extra = {"seq_len": 3136} if "seq_len" in inspect.signature(fn).parameters else {}
        return fn(head_dim, dtype=dtype, **extra)

    params = FORMS[name][1][0]
    m = attnbench.create(name, dim=96, heads=3, **params)
    m.flex_layout = "cuda"
    sizes = {m._plan(56, 56).block_mask.BLOCK_SIZE, m._plan(13, 9).block_mask.BLOCK_SIZE}
    for cap in CAPABILITIES:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, cap=cap: cap)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for head_dim in (16, 32, 64, 128):
                for q_block, kv_block in sizes:
                    for c in configs("fwd", head_dim, dtype):
                        assert q_block % c.block_m == 0 and kv_block % c.block_n == 0, (cap, dtype, head_dim, c)
                    for c in configs("bwd", head_dim, dtype):
                        assert q_block % c.block_m1 == 0 and kv_block % c.block_n1 == 0, (cap, dtype, head_dim, c)
                        assert q_block % c.block_m2 == 0 and kv_block % c.block_n2 == 0, (cap, dtype, head_dim, c)
    if name.startswith("swin"):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
        m.flex_layout = "cpu"
        q_block, _ = m._plan(56, 56).block_mask.BLOCK_SIZE
        assert q_block == 49 and any(q_block % c.block_m for c in configs("fwd", 32, torch.float32))


def test_flex_forms_say_what_cuda_cannot_take():
    """A head dimension under 16 (torch's CUDA lowering refuses it) and, for local.flex, a tile that is not a
    power of two are refused for CUDA with the reason, before anything runs; the CPU takes both."""
    m = attnbench.create("swin.window_flex", dim=24, heads=2)
    assert "at least 16" in m.supports_device("cuda") and m.supports_device("cpu") is None
    assert attnbench.create("swin.window_flex", dim=32, heads=2).supports_device("cuda") is None
    t6 = attnbench.create("local.flex", dim=64, heads=2, tile=6)
    assert "power-of-two tile" in t6.supports_device("cuda") and t6.supports_device("cpu") is None
    t6.flex_layout = "cuda"
    with pytest.raises(ValueError, match="power-of-two tile"):
        t6._plan(16, 16)


def test_a_cuda_cell_counts_and_refuses_in_the_cuda_layout():
    """The cell's builder gives flex forms its device's layout before anything is counted (FLOPs on meta are
    the CUDA kernel's blocks for a CUDA cell), and a head dimension CUDA's flex cannot take is unsupported
    there, with the reason, before a module is built on the device."""
    import dataclasses

    from attnbench import build
    from attnbench.runner import prepare
    from conftest import make_suite

    _suite, _dev, cases = prepare(make_suite(["swin.window_flex"], resolution=(64,), dim=32, heads=2))
    cpu_case = cases[0]
    cuda_case = dataclasses.replace(cpu_case, device="cuda")
    cpu_mod, cuda_mod = build.module_builder(cpu_case)(), build.module_builder(cuda_case)()
    assert (cpu_mod.flex_layout, cuda_mod.flex_layout) == ("cpu", "cuda")
    h, w = cpu_case.grid_h, cpu_case.grid_w
    assert cuda_mod.flops_analytic(2, h, w) > cpu_mod.flops_analytic(2, h, w) == cpu_mod.flops_useful(2, h, w)
    build.check_supports(cuda_case, build.module_builder(cuda_case))  # head dim 16: fine
    small = dataclasses.replace(cuda_case, heads=4)  # head dim 8
    with pytest.raises(build.Unsupported, match="at least 16"):
        build.check_supports(small, build.module_builder(small))
    build.check_supports(dataclasses.replace(small, device="cpu"), build.module_builder(small))


def test_a_flex_forms_compile_is_compile_s_not_a_first_call_over_budget(tmp_path, monkeypatch):
    """A flex form compiles inside its first call (seconds, minutes for a GPU backward): that call is the
    cell's compile_s and is not held against the budget; the calls after it are."""
    from attnbench import cell
    from attnbench.runner import run_suite
    from conftest import make_suite

    walls = iter([100.0])  # the first call "takes" 100 s; every later one is really timed
    real = cell._wall
    monkeypatch.setattr(cell, "_wall", lambda fn, dev: next(walls, real(fn, dev)))  # every call really runs
    suite = make_suite(["local.flex"], resolution=(32,), budget={"cell_time_s": 30})
    row = run_suite(suite, tmp_path / "run", progress=False).rows[0]
    assert row["status"] == "ok", row["message"]
    assert row["compile_s"] == 100.0 and row["latency_ms_median"] < 1000


@pytest.mark.parametrize("name", ["local.flex", "swin.shift_flex"] + [
    pytest.param(n, marks=pytest.mark.slow) for n in ("swin.window_flex", "local.neighborhood_flex")])
def test_inside_a_compiled_module_flex_is_one_graph_with_it(name):
    """With ``compile: true`` the whole module is compiled: its flex call must be traced into that graph
    (not a graph break around the form's own compiled call and its bookkeeping, which ran flex eagerly
    at ~40x the time), and compute the same."""
    import torch._dynamo

    m = attnbench.create(name, dim=32, heads=2).eval()
    x = torch.randn(1, 16, 16, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = m(x)  # builds the block mask (a cold trace breaks the graph there once, to build it eagerly)
        explained = torch._dynamo.explain(m)(x)
        assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
        torch._dynamo.reset()
        y_compiled = torch.compile(m)(x)
    assert (y_compiled - y).abs().max() <= 1e-4 * y.abs().max()


def _flex_against_naive(name: str, device: str, dtype: torch.dtype, train: bool, layout: str = "cuda") -> None:
    """The flex form against its naive sibling on ``device``: same weights, dim 64 and 4 heads (head size 16,
    the least CUDA's flex takes), a grid no window or tile divides; the naive form in float64 on the CPU is
    the reference. With ``train`` the input and weight gradients are compared too."""
    ref, variants = FORMS[name]
    params = variants[0]
    naive = randomize_(attnbench.create(ref, dim=64, heads=4, **params), seed=11).double()
    flex = attnbench.create(name, dim=64, heads=4, **params)
    flex.load_state_dict(naive.state_dict())
    flex.flex_layout = layout  # a CUDA call takes the cuda layout whatever this says
    flex = flex.to(device=device, dtype=dtype)
    x64 = torch.randn(2, 23, 19, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    x = x64.to(device=device, dtype=dtype).requires_grad_(train)
    with torch.set_grad_enabled(train):
        y = flex(x)
    assert flex.flex_path == "compiled flex_attention", flex.flex_path
    x64.requires_grad_(train)
    y64 = naive(x64)
    tol = 2e-3 if dtype == torch.float32 else 3e-2  # float32 allows for TF32 (a layout mistake is O(1))
    assert (y.double().cpu() - y64.detach()).abs().max() <= tol * y64.abs().max()
    if train:
        g = torch.randn(y64.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
        (y * g.to(device=device, dtype=dtype)).sum().backward()
        (y64 * g).sum().backward()
        assert (x.grad.double().cpu() - x64.grad).abs().max() <= 10 * tol * x64.grad.abs().max()
        grads = dict(naive.named_parameters())
        for pname, p in flex.named_parameters():
            want = grads[pname].grad
            assert (p.grad.double().cpu() - want).abs().max() <= 10 * tol * want.abs().max(), pname


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(FORMS))
def test_gpu_flex_forms_compile_and_match_on_cuda_forward_and_backward(name, dtype):
    """The CUDA layout through torch's CUDA flex kernels (the block sizes they accept), forward and backward."""
    _flex_against_naive(name, "cuda", dtype, train=False)
    _flex_against_naive(name, "cuda", dtype, train=True)


@pytest.mark.slow
def test_the_gpu_flex_check_runs_on_the_cpu_forward():
    """The GPU test's own logic, on the CPU (forward only: no flex backward here), in the CUDA layout."""
    _flex_against_naive("swin.shift_flex", "cpu", torch.float32, train=False, layout="cuda")


def test_compile_true_compiles_a_flex_form_as_one_graph(tmp_path):
    """With compile: true the cell primes the flex form's block mask before compiling, so dynamo makes one
    graph of the whole module (a mask built during the trace left it as 5 graphs and 3 breaks for good);
    rows say how many graphs and breaks the compile made."""
    from attnbench.runner import run_suite
    from conftest import make_suite

    suite = make_suite(["local.flex", "swin.window"], resolution=(64,), dim=32, heads=2, compile=True)
    rows = run_suite(suite, tmp_path / "run", progress=False).rows
    for row in rows:
        assert row["status"] == "ok", row["message"]
        assert (row["compile_graphs"], row["compile_graph_breaks"]) == (1, 0), row["impl"]
