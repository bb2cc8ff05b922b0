"""The FlexAttention forms: swin.window_flex, swin.shift_flex, local.flex, local.neighborhood_flex.

float64 runs flex_attention uncompiled (inductor's CPU kernel takes float32/16/bf16 only), so the
equivalence tests below are cheap; one compiled float32 check per form (a compile each, seconds).
"""

import math
import random

import pytest
import torch

import attnbench
from attnbench.impls import _flex
from attnbench.measure import flops as F
from conftest import randomize_
from equivalence import assert_same_function

# flex form -> (its naive sibling, parameter choices)
FORMS = {
    "swin.window_flex": ("swin.window", [{}, {"window": 4}, {"window": 3, "qkv_bias": False}]),
    "swin.shift_flex": ("swin.shift_cyclic", [{}, {"window": 4, "shift": 1}, {"window": 5, "shift": 4}]),
    "local.flex": ("local.im2col", [{"kernel": 7}, {"kernel": 3}, {"kernel": 5}]),
    "local.neighborhood_flex": ("local.neighborhood_naive", [{"kernel": 7}, {"kernel": 3, "dilation": 2},
                                                             {"kernel": 5, "dilation": 3}]),
}


def _cases():
    rng = random.Random(7)
    for name, (ref, variants) in FORMS.items():
        for params in variants:
            for _ in range(2):
                lo = params.get("kernel", 1) * params.get("dilation", 1) if "neighborhood" in name else 1
                yield name, ref, params, rng.randint(lo, 19), rng.randint(lo, 19)


CASES = list(_cases())


LAYOUTS = ["cpu", "cuda"]  # the CUDA layout (power-of-two slots, 128-token blocks) runs on a CPU too


def _pair(name, ref, params, seed=5, layout="cpu"):
    a = randomize_(attnbench.create(ref, dim=24, heads=2, **params), seed=seed).eval()
    b = attnbench.create(name, dim=24, heads=2, **params).eval()
    b.load_state_dict(a.state_dict(), strict=True)
    b.flex_layout = layout
    return b, a


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name,ref,params,h,w", CASES, ids=[f"{c[0]}-{c[2]}-{c[3]}x{c[4]}" for c in CASES])
def test_same_function_as_the_naive_form(name, ref, params, h, w, layout):
    """Random grids, divisible by the window or not, smaller than a block or spanning several."""
    flex, naive = _pair(name, ref, params, layout=layout)
    x = torch.randn(2, h, w, 24, generator=torch.Generator().manual_seed(h * 97 + w))
    assert_same_function(flex, naive, x)


def test_shift_flex_equals_the_padded_form_too():
    flex, naive = _pair("swin.shift_flex", "swin.shift_pad", {"window": 4, "shift": 2})
    assert_same_function(flex, naive, torch.randn(1, 11, 9, 24))


def test_a_wrong_bias_index_is_caught():
    """The comparison has power: a transposed relative-position index gives another function."""
    flex, naive = _pair("swin.window_flex", "swin.window", {"window": 4})
    rules = flex._rules

    def transposed(hp, wp, slot=None):
        mask_fn, rel, region = rules(hp, wp, slot)
        return mask_fn, (lambda q, k: rel(k, q)), region

    flex._rules = transposed
    with pytest.raises(AssertionError, match="differ in float64"):
        assert_same_function(flex, naive, torch.randn(1, 8, 8, 24))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(FORMS))
def test_block_mask_counts(name, layout):
    """The mask allows exactly the design's pairs; the blocks computed cover them; both FLOP conventions."""
    ref, variants = FORMS[name]
    params = variants[1]
    m = attnbench.create(name, dim=24, heads=2, **params)
    m.flex_layout = layout
    naive = attnbench.create(ref, dim=24, heads=2, **params)
    h, w = 23, 17
    if name.startswith("swin"):
        M = m.window
        hp, wp = -(-h // M) * M, -(-w // M) * M
        plan, useful_pairs = m._plan(hp, wp), hp * wp * M * M
        assert plan.allowed_pairs == useful_pairs
    else:
        plan, useful_pairs = m._plan(h, w), h * w * m.kernel ** 2
        hq, wq = m._grids(h, w)[:2] if name == "local.flex" else (h, w)  # local.flex pads queries to whole tiles
        assert plan.allowed_pairs == hq * wq * m.kernel ** 2
    assert useful_pairs <= plan.computed_pairs <= plan.q_len * plan.kv_len
    assert plan.computed_pairs == sum((r1 - r0) * keys for r0, r1, keys in plan.spans)
    useful_ref = getattr(naive, "flops_useful", naive.flops_analytic)(3, h, w)
    assert m.flops_useful(3, h, w) == useful_ref
    assert m.flops_analytic(3, h, w) - m.flops_useful(3, h, w) == 4 * 3 * 24 * (plan.computed_pairs - useful_pairs)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(FORMS))
def test_torch_counter_counts_the_computed_blocks_and_fvcore_says_why_not(name, layout):
    params = FORMS[name][1][0]

    def build():
        m = attnbench.create(name, dim=24, heads=2, **params)
        _flex.set_layout(m, layout)
        return m

    counted = F.count_flops(build, (2, 15, 12, 24), torch.float32, train=True)
    analytic = build().flops_analytic(2, 15, 12)
    assert counted["flops_torch"] == analytic and counted["count_message"] == ""
    assert counted["flops_torch_fwd_bwd"] == 3 * analytic
    fv = F.count_fvcore(build().eval(), torch.randn(2, 15, 12, 24))
    assert math.isnan(fv["macs_fvcore"]) and "FlexTraceError" in fv["fvcore_message"]
    assert math.isnan(counted["macs_fvcore"]) and "cannot record" in counted["fvcore_message"]


def test_block_plan_against_dense_evaluation():
    """build_plan's block classification equals evaluating the rule on the whole (Nq, Nk) grid."""
    from attnbench.impls.local import local_mask_fn

    h, w, k, t = 9, 23, 5, 4
    m = attnbench.create("local.flex", dim=24, heads=2, kernel=k, tile=t)
    hq, wq, hk, wk = m._grids(h, w)
    assert (hq, wq, hk, wk) == (12, 24, 16, 28)
    rule, block = local_mask_fn(wq // t, wk // t, t, k), t * t
    nq, nk = hq * wq, hk * wk
    plan = _flex.build_plan(rule, nq, nk, "cpu", block=block)
    dense = rule(torch.arange(nq)[:, None], torch.arange(nk)[None, :])
    assert plan.allowed_pairs == int(dense.sum())
    bm = plan.block_mask
    for i in range(math.ceil(nq / block)):
        tile_any = [bool(dense[i * block:(i + 1) * block, j * block:(j + 1) * block].any())
                    for j in range(math.ceil(nk / block))]
        listed = set(bm.kv_indices[0, 0, i, :int(bm.kv_num_blocks[0, 0, i])].tolist())
        listed |= set(bm.full_kv_indices[0, 0, i, :int(bm.full_kv_num_blocks[0, 0, i])].tolist())
        assert listed == {j for j, a in enumerate(tile_any) if a}


COMPILED = [pytest.param("local.flex", "cpu", id="local.flex"),
            pytest.param("swin.shift_flex", "cuda", id="swin.shift_flex-cuda-layout")] + [
    pytest.param(n, layout, id=f"{n}-{layout}-layout", marks=pytest.mark.slow)
    for n in ("swin.shift_flex", "local.neighborhood_flex", "swin.window_flex", "local.flex")
    for layout in LAYOUTS if (n, layout) not in (("local.flex", "cpu"), ("swin.shift_flex", "cuda"))]


@pytest.mark.parametrize("name,layout", COMPILED)
def test_compiled_float32(name, layout):
    """The compiled kernel (one compile) agrees with the float64 naive form to float32 accuracy, and a
    second call of the same shape does not compile again."""
    ref, variants = FORMS[name]
    flex, naive = _pair(name, ref, variants[0], layout=layout)
    x = torch.randn(2, 13, 10, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = flex(x)
        assert len(flex.flex_compile_s) == 1
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert graphs > 0  # the compiled path ran
        y2 = flex(x)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
        y64 = naive.double()(x.double())
    assert torch.equal(y, y2)
    assert (y.double() - y64).abs().max() <= 2e-5 * y64.abs().max()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(FORMS))
def test_autograd_on_cpu_runs_the_explicit_blocks(name, layout):
    """flex_attention has no backward on CPU: with grad the same blocks run as torch ops (with a warning
    naming why); outputs and parameter gradients equal the naive form's in float64."""
    from equivalence import assert_close64

    ref, variants = FORMS[name]
    flex, naive = (m.double() for m in _pair(name, ref, variants[1], layout=layout))
    x = torch.randn(2, 11, 13, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with pytest.warns(UserWarning, match="no backward on CPU"):
        y = flex(x)
    assert flex.flex_path.startswith("explicit blocks")
    y_ref = naive(x)
    assert_close64(y, y_ref)
    g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    grads = dict(naive.named_parameters())
    for pname, p in flex.named_parameters():
        assert_close64(p.grad, grads[pname].grad, what=pname)


def test_a_flex_form_is_timed_only_as_compiled_flex(tmp_path):
    """On a CPU flex attention has no backward: a train-mode cell of a flex form is recorded unsupported with
    the reason (timing its torch-ops path under the form's name would time another kernel); forward runs."""
    from attnbench.runner import run_suite
    from conftest import make_suite

    suite = make_suite(["local.flex"], resolution=(32,), mode=["forward", "train"])
    rows = run_suite(suite, tmp_path / "run", progress=False).rows
    by_mode = {r["mode"]: r for r in rows}
    assert by_mode["forward"]["status"] == "ok", by_mode["forward"]["message"]
    assert by_mode["train"]["status"] == "unsupported"
    assert "no backward on CPU" in by_mode["train"]["message"]


@pytest.mark.parametrize("name,params", [("swin.window_flex", {}), ("swin.shift_flex", {"window": 4, "shift": 1}),
                                         ("swin.shift_flex", {"window": 5, "shift": 2})])
def test_swin_flex_blocks_are_the_windows(name, params):
    """Window-major order, block size M^2: the block mask is block-diagonal, each computed block one window
    (all "full"), so the computed pairs are the unmasked ones and flops_analytic == flops_useful."""
    m = attnbench.create(name, dim=24, heads=2, **params)
    M = m.window
    for h, w in ((23, 17), (56, 56)):
        hp, wp = -(-h // M) * M, -(-w // M) * M
        plan = m._plan(hp, wp)
        assert plan.computed_pairs == plan.allowed_pairs == hp * wp * M * M
        bm = plan.block_mask
        assert bm.BLOCK_SIZE == (M * M, M * M)
        assert int(bm.kv_num_blocks.sum()) == 0 and bm.full_kv_num_blocks.flatten().tolist() == [1] * (hp * wp // M // M)
        assert m.flops_analytic(2, h, w) == m.flops_useful(2, h, w)


@pytest.mark.parametrize("h,w,k,dil", [(56, 56, 7, 1), (17, 13, 5, 2), (19, 11, 3, 3), (9, 23, 7, 1)])
def test_neighborhood_flex_tile_layout(h, w, k, dil):
    """The gathers are a layout of the grid (each token once as a query and once as a key), the rule equals the
    row-major one of the naive form's tables, and at 56 x 56, kernel 7, tile 4 each query tile computes
    at most 3 x 3 key blocks of 16 (144 keys per query instead of the row-major order's ~615)."""
    from attnbench.impls.neighborhood import axis_tables, nat_flex_rule

    m = attnbench.create("local.neighborhood_flex", dim=24, heads=2, kernel=k, dilation=dil)
    mask_fn, _, q_len, kv_len, block, q_src, kv_src, q_inv = nat_flex_rule(h, w, k, dil, m.tile)
    assert torch.equal(q_src[q_inv], torch.arange(h * w))
    dense = mask_fn(torch.arange(q_len)[:, None], torch.arange(kv_len)[None, :])
    pairs = dense.nonzero()
    got = torch.zeros(h * w, h * w, dtype=torch.bool)
    got[q_src[pairs[:, 0]], kv_src[pairs[:, 1]]] = True
    assert len(pairs) == h * w * k * k == int(got.sum())  # no pair twice: padding never allowed
    kr, _ = axis_tables(h, k, dil)
    kc, _ = axis_tables(w, k, dil)
    keys = (kr[:, None, :, None] * w + kc[None, :, None, :]).reshape(h * w, k * k)
    want = torch.zeros(h * w, h * w, dtype=torch.bool)
    want[torch.arange(h * w)[:, None], keys] = True
    assert torch.equal(got, want)
    if (h, w, k, dil) == (56, 56, 7, 1) and m.tile == 4:
        plan = m._plan(h, w)  # interior tiles 3 x 3 key blocks, clamped border tiles fewer
        assert max(keys for *_, keys in plan.spans) == 9 * 16 and plan.computed_pairs < h * w * 9 * 16


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
