"""mvit.pool matches timm's MViTv2 MultiScaleAttention given the same weights (in float64), on its
native grid and, with relative-position tables interpolated as MViTv2 does, on other grids."""

import random
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from timm.models.mvitv2 import MultiScaleAttention as TimmMViTAttention
from torch import nn

import attnbench
from conftest import randomize_
from equivalence import LOW_PRECISION_TOL, assert_low_precision_close, assert_same_function


def _pair(dim, heads, size, pool="conv", kernel=3, stride_q=1, stride_kv=4, rel_pos=True, residual_pooling=True,
          seed=0):
    """timm's module (feat_size = size x size, MViTv2's LayerNorm eps 1e-6) with random weights, and ours loaded from it."""
    ref = TimmMViTAttention(dim, dim, (size, size), num_heads=heads, qkv_bias=True, mode=pool,
                            kernel_q=(kernel, kernel), kernel_kv=(kernel, kernel), stride_q=(stride_q, stride_q),
                            stride_kv=(stride_kv, stride_kv), has_cls_token=False,
                            rel_pos_type="spatial" if rel_pos else "none", residual_pooling=residual_pooling,
                            norm_layer=partial(nn.LayerNorm, eps=1e-6))
    ref = randomize_(ref, seed=seed).eval()
    ours = attnbench.create("mvit.pool", dim=dim, heads=heads, pool=pool, kernel=kernel, stride_q=stride_q,
                            stride_kv=stride_kv, rel_pos=rel_pos, residual_pooling=residual_pooling,
                            rel_pos_size=size).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _timm_call(ref, x):
    B, H, W, C = x.shape
    y_ref, (hq, wq) = ref(x.reshape(B, H * W, C), [H, W])
    return y_ref.reshape(B, hq, wq, C)


def _check_against_timm(ref, ours, x, tol=None):
    y, _ = assert_same_function(ours, ref, x, call_b=_timm_call, **({} if tol is None else {"tol": tol}))
    assert y.shape == (x.shape[0], *ours.output_size(*x.shape[1:3]), x.shape[3])


@pytest.mark.parametrize("stride_q,stride_kv", [(1, 2), (1, 4), (2, 2), (2, 4)])
@pytest.mark.parametrize("residual_pooling", [True, False])
@pytest.mark.parametrize("rel_pos", [True, False])
@pytest.mark.parametrize("pool", ["conv", "avg", "max"])
def test_matches_timm(pool, rel_pos, residual_pooling, stride_q, stride_kv, rand):
    ref, ours = _pair(32, 2, 16, pool, 3, stride_q, stride_kv, rel_pos, residual_pooling, seed=stride_q + stride_kv)
    _check_against_timm(ref, ours, torch.randn(2, 16, 16, 32, generator=rand))


@pytest.mark.parametrize("pool", ["conv", "avg", "max"])
@pytest.mark.parametrize("kernel,stride_q,stride_kv,size", [(1, 1, 2, 16), (1, 2, 4, 16), (5, 1, 4, 16),
                                                            (3, 2, 4, 14), (3, 1, 1, 14)])
def test_matches_timm_other_kernels_and_grids(pool, kernel, stride_q, stride_kv, size, rand):
    """Kernel 1 with stride 1 skips the pooling op; 14 / 4 leaves a 4 x 4 K/V grid indexed at ratio 7 / 4."""
    ref, ours = _pair(32, 4, size, pool, kernel, stride_q, stride_kv, seed=kernel)
    _check_against_timm(ref, ours, torch.randn(2, size, size, 32, generator=rand))


def _random_native_cases(n, seed):
    """(pool, heads, kernel, stride_q, stride_kv, size, rel_pos, residual_pooling): square grids that are
    multiples of stride_q, so the tables timm sizes from feat_size fit the grid (no interpolation)."""
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        stride_q = rng.choice([1, 1, 2])
        cases.append((rng.choice(["conv", "avg", "max"]), rng.choice([1, 2, 4]), rng.choice([1, 3, 5]), stride_q,
                      rng.choice([1, 2, 3, 4]), stride_q * rng.randint(2, 9), rng.random() < 0.8,
                      rng.random() < 0.5))
    return cases


@pytest.mark.parametrize("pool,heads,kernel,stride_q,stride_kv,size,rel_pos,residual_pooling",
                         _random_native_cases(10, seed=12))
def test_matches_timm_random(pool, heads, kernel, stride_q, stride_kv, size, rel_pos, residual_pooling, rand):
    ref, ours = _pair(8 * heads, heads, size, pool, kernel, stride_q, stride_kv, rel_pos, residual_pooling,
                      seed=size)
    _check_against_timm(ref, ours, torch.randn(2, size, size, 8 * heads, generator=rand))


# --- relative positions on grids other than rel_pos_size: MViTv2's interpolation -----------------

def _interpolate_rel_pos(table, length):
    """MViTv2's get_rel_pos (and timm's checkpoint_filter_fn): (L, d) -> (length, d), 1-D linear
    interpolation (align_corners=False) of each channel, in the table's dtype."""
    L = table.shape[0]
    if L == length:
        return table
    resized = F.interpolate(table.reshape(1, L, -1).permute(0, 2, 1), size=length, mode="linear")
    return resized.reshape(-1, length).permute(1, 0)


def test_interpolation_reference_is_linear_with_half_pixel_centres():
    """The reference's own check: 3 -> 5 entries samples at (i + 0.5) * 3 / 5 - 0.5, clamped to the ends."""
    table = torch.tensor([[0.0, 10.0], [1.0, 20.0], [4.0, 40.0]], dtype=torch.float64)
    want = torch.tensor([[0.0, 10.0], [0.4, 14.0], [1.0, 20.0], [2.8, 32.0], [4.0, 40.0]], dtype=torch.float64)
    torch.testing.assert_close(_interpolate_rel_pos(table, 5), want, rtol=0, atol=1e-12)
    assert _interpolate_rel_pos(table, 3) is table


def _timm_interpolated(ours, h, w):
    """timm's MultiScaleAttention loaded with ``ours``' weights whose rel_pos_h / rel_pos_w are
    replaced by tables interpolated (in float64) to 2 * max(q, k) - 1 entries for an h x w grid, the
    query and key grids read off timm's own pooling ops; timm's cal_rel_pos_type then indexes them."""
    size = ours.rel_pos_size
    ref = TimmMViTAttention(ours.dim, ours.dim, (size, size), num_heads=ours.heads, qkv_bias=True,
                            mode=ours.pool_mode, kernel_q=(ours.kernel,) * 2, kernel_kv=(ours.kernel,) * 2,
                            stride_q=(ours.stride_q,) * 2, stride_kv=(ours.stride_kv,) * 2, has_cls_token=False,
                            residual_pooling=ours.residual_pooling, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    ref.load_state_dict(ours.state_dict(), strict=True)
    ref = ref.double().eval()

    def grid(pool):  # the output grid of one of timm's pooling ops (conv, avg or max) on h x w
        if pool is None:
            return h, w
        channels = pool.in_channels if isinstance(pool, nn.Conv2d) else 1
        return tuple(pool(torch.zeros(1, channels, h, w, dtype=torch.float64)).shape[-2:])

    (qh, qw), (kh, kw) = grid(ref.pool_q), grid(ref.pool_k)
    with torch.no_grad():
        ref.rel_pos_h = nn.Parameter(_interpolate_rel_pos(ours.rel_pos_h.double(), 2 * max(qh, kh) - 1))
        ref.rel_pos_w = nn.Parameter(_interpolate_rel_pos(ours.rel_pos_w.double(), 2 * max(qw, kw) - 1))
    return ref, (qh, qw), (kh, kw)


def _random_grid_cases(n, seed):
    """(pool, heads, kernel, stride_q, stride_kv, rel_pos_size, h, w): non-square grids, odd sizes,
    grids smaller and larger than rel_pos_size (default 56 too), a 1 x 1 grid."""
    rng = random.Random(seed)
    cases = [("conv", 2, 3, 2, 4, 16, 9, 13), ("avg", 2, 3, 2, 4, 16, 24, 20), ("max", 2, 3, 2, 4, 16, 1, 1),
             ("conv", 1, 3, 1, 4, 56, 12, 7)]
    for _ in range(n):
        cases.append((rng.choice(["conv", "avg", "max"]), rng.choice([1, 2, 4]), rng.choice([1, 3]),
                      rng.choice([1, 2]), rng.choice([2, 4]), rng.choice([8, 12, 16, 56]), rng.randint(1, 26),
                      rng.randint(1, 26)))
    return cases


GRID_CASES = _random_grid_cases(8, seed=13)
INTERPOLATED_TOL = 1e-12  # tables are interpolated in the module's dtype (float64 here), as in the reference


@pytest.mark.parametrize("pool,heads,kernel,stride_q,stride_kv,rel_pos_size,h,w", GRID_CASES)
def test_other_grids_match_mvitv2_interpolation(pool, heads, kernel, stride_q, stride_kv, rel_pos_size, h, w, rand):
    """On a grid other than rel_pos_size the tables are linearly interpolated to the lengths the grid needs,
    as MViTv2 does; the output is timm's with tables interpolated so (in float64)."""
    ours = randomize_(attnbench.create("mvit.pool", dim=8 * heads, heads=heads, pool=pool, kernel=kernel,
                                       stride_q=stride_q, stride_kv=stride_kv, rel_pos_size=rel_pos_size),
                      seed=h * w).eval()
    ref, q_size, k_size = _timm_interpolated(ours, h, w)
    assert q_size == ours.output_size(h, w)
    x = torch.randn(2, h, w, 8 * heads, generator=rand)
    _check_against_timm(ref, ours, x, tol=INTERPOLATED_TOL)


@pytest.mark.parametrize("pool,h,w", [("conv", 9, 13), ("avg", 24, 20)])
def test_other_grids_interpolate_in_float64(pool, h, w, rand):
    ours = randomize_(attnbench.create("mvit.pool", dim=16, heads=2, pool=pool, stride_q=2, rel_pos_size=16),
                      seed=3).eval()
    ref, _, _ = _timm_interpolated(ours, h, w)
    _check_against_timm(ref, ours, torch.randn(2, h, w, 16, generator=rand))


def test_interpolation_is_used_and_matters(rand):
    """A non-native grid really gets interpolated tables (not the native ones cropped, nor none)."""
    ours = randomize_(attnbench.create("mvit.pool", dim=16, heads=2, stride_q=2, rel_pos_size=16), seed=1).eval()
    x = torch.randn(2, 24, 20, 16, generator=rand)
    ref, _, _ = _timm_interpolated(ours, 24, 20)
    assert ref.rel_pos_h.shape[0] != ours.rel_pos_h.shape[0] != ref.rel_pos_w.shape[0]
    _check_against_timm(ref, ours, x, tol=INTERPOLATED_TOL)
    with torch.no_grad():  # nearest instead of linear interpolation: caught
        ref.rel_pos_h.copy_(F.interpolate(ours.rel_pos_h.double().t()[None], size=ref.rel_pos_h.shape[0],
                                          mode="nearest")[0].t())
    with pytest.raises(AssertionError, match="differ in float64"):
        _check_against_timm(ref, ours, x, tol=INTERPOLATED_TOL)


def test_unit_kernel_and_stride_skip_pooling():
    m = attnbench.create("mvit.pool", dim=32, heads=2, kernel=1, stride_q=1, stride_kv=2)
    assert m.pool_q is None and m.norm_q is None and m.pool_k is not None and m.norm_k is not None
    assert not any(k.startswith(("pool_q", "norm_q")) for k in m.state_dict())
    m = attnbench.create("mvit.pool", dim=32, heads=2, pool="avg")
    assert m.pool_q is not None and m.norm_q is None  # kernel 3 pools even at stride 1; no norms when not conv


@pytest.mark.parametrize("stride_q,h,w,expect", [(1, 15, 11, (15, 11)), (2, 15, 11, (8, 6)), (2, 16, 12, (8, 6)),
                                                 (4, 7, 3, (2, 1))])
def test_output_grid_is_the_pooled_query_grid(stride_q, h, w, expect, rand):
    m = attnbench.create("mvit.pool", dim=24, heads=3, stride_q=stride_q).eval()
    y = m(torch.randn(2, h, w, 24, generator=rand))
    assert y.shape == (2, *expect, 24)
    assert m.output_size(h, w) == expect


def test_meta_device():
    with torch.device("meta"):
        m = attnbench.create("mvit.pool", dim=48, heads=3, stride_q=2)
        y = m(torch.empty(2, 16, 12, 48, device="meta"))
    assert y.shape == (2, 8, 6, 48) and y.device.type == "meta"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pool,h,w", [("conv", 16, 12), ("avg", 16, 12), ("conv", 9, 13)])
def test_half_precision_is_the_float64_function(pool, h, w, dtype, rand):
    """float16 / bfloat16 outputs are within the dtype's rounding of the float64 output (rel_pos on, and
    interpolated on the 9 x 13 grid), and a different function is not."""
    m = randomize_(attnbench.create("mvit.pool", dim=48, heads=3, pool=pool, stride_q=2, rel_pos_size=16),
                   seed=5).eval()
    x = torch.randn(2, h, w, 48, generator=rand)
    y = assert_low_precision_close(m, x, dtype)
    assert y.shape == (2, *m.output_size(h, w), 48)
    other = attnbench.create("mvit.pool", dim=48, heads=3, pool=pool, stride_q=2, rel_pos_size=16).eval()
    other.load_state_dict({**m.state_dict(), "rel_pos_h": 4 * m.rel_pos_h})  # only the h table changed
    with pytest.raises(AssertionError, match="differ in float64"):  # the tolerance is tight enough to see it
        assert_same_function(other, m, x, tol=LOW_PRECISION_TOL[dtype])


@pytest.mark.parametrize("kwargs", [dict(pool="mean"), dict(pool="conv_unshared"), dict(stride_q=0),
                                    dict(stride_kv=0), dict(kernel=0), dict(rel_pos_size=0)])
def test_bad_parameters_raise(kwargs):
    with pytest.raises(ValueError):
        attnbench.create("mvit.pool", dim=32, heads=2, **kwargs)


def test_heads_must_divide_dim():
    with pytest.raises(ValueError):
        attnbench.create("mvit.pool", dim=30, heads=4)
