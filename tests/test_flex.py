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

