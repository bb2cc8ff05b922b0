"""mvit.pool matches timm's MViTv2 MultiScaleAttention given the same weights (in float64), on its
native grid and, with relative-position tables interpolated as MViTv2 does, on other grids.
mvit.window (MViTv2's detection backbone) matches a written-out window partition in float64."""

import copy
import math
import random
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from timm.models.mvitv2 import MultiScaleAttention as TimmMViTAttention
from torch import nn

import attnbench
from conftest import randomize_
from equivalence import LOW_PRECISION_TOL, assert_low_precision_close, assert_same_function, to_float64


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


# --- mvit.window: MViTv2's pooling attention inside windows (its detection backbone) ----------------

def _rel_index(q_len, k_len):
    """MViTv2's (q_len, k_len) index into a 2 * max(q_len, k_len) - 1 table: query i and key j at
    positions scaled to the finer of the two grids, their difference shifted to start at 0."""
    q_scale, k_scale = max(k_len / q_len, 1.0), max(q_len / k_len, 1.0)
    return torch.tensor([[int(i * q_scale - j * k_scale + (k_len - 1) * k_scale) for j in range(k_len)]
                         for i in range(q_len)])


def _window_reference(m, x):
    """mvit.window written out as MViTv2's detection backbone defines it: Q, K, V projected and pooled
    over the whole grid (m's own pooling ops), the pooled grids cut by hand into windows of
    window // stride (zero-padded at bottom/right), attention with the decomposed relative position
    terms inside each window pair, the windows put back and cropped, residual pooling, proj."""
    B, H, W, C = x.shape
    h, d = m.heads, C // m.heads
    q, k, v = m.qkv(x).reshape(B, H, W, 3, h, d).permute(3, 0, 4, 1, 2, 5)  # each (B, h, H, W, d)

    def pool(t, op, norm):
        if op is not None:
            t = op(t.reshape(B * h, H, W, d).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            t = t.reshape(B, h, *t.shape[1:])
        return norm(t) if norm is not None else t

    q, k, v = pool(q, m.pool_q, m.norm_q), pool(k, m.pool_k, m.norm_k), pool(v, m.pool_v, m.norm_v)
    mq, mk = m.window // m.stride_q, m.window // m.stride_kv
    (qh, qw), (kh, kw) = q.shape[2:4], k.shape[2:4]
    nh, nw = -(-qh // mq), -(-qw // mq)
    assert (nh, nw) == (-(-kh // mk), -(-kw // mk))

    def padded(t, size):
        out = t.new_zeros(B, h, nh * size, nw * size, d)
        out[:, :, :t.shape[2], :t.shape[3]] = t
        return out

    qp, kp, vp = padded(q, mq), padded(k, mk), padded(v, mk)
    if m.rel_pos:
        length = 2 * max(mq, mk) - 1
        rh = _interpolate_rel_pos(m.rel_pos_h, length)[_rel_index(mq, mk)]  # (mq, mk, d)
        rw = _interpolate_rel_pos(m.rel_pos_w, length)[_rel_index(mq, mk)]
    out = torch.zeros_like(qp)
    for a in range(nh):
        for b in range(nw):
            qwin = qp[:, :, a * mq:(a + 1) * mq, b * mq:(b + 1) * mq]  # (B, h, mq, mq, d)
            kwin = kp[:, :, a * mk:(a + 1) * mk, b * mk:(b + 1) * mk]  # (B, h, mk, mk, d)
            vwin = vp[:, :, a * mk:(a + 1) * mk, b * mk:(b + 1) * mk].reshape(B, h, mk * mk, d)
            logits = torch.einsum("bhijd,bhkld->bhijkl", qwin * d ** -0.5, kwin)
            if m.rel_pos:  # query (i, j), key (k, l): q . Rh[i, k] + q . Rw[j, l]
                logits = (logits + torch.einsum("bhijd,ikd->bhijk", qwin, rh)[..., :, None]
                          + torch.einsum("bhijd,jld->bhijl", qwin, rw)[..., None, :])
            attn = logits.reshape(B, h, mq, mq, mk * mk).softmax(-1)
            out[:, :, a * mq:(a + 1) * mq, b * mq:(b + 1) * mq] = torch.einsum("bhijn,bhnd->bhijd", attn, vwin)
    out = out[:, :, :qh, :qw]
    if m.residual_pooling:
        out = out + q
    return m.proj(out.permute(0, 2, 3, 1, 4).reshape(B, qh, qw, C))


def _per_window_pool(m, x):
    """The input cut by hand into window x window tiles (the grid must be divisible), ``mvit.pool``
    with m's weights run on each tile, the outputs put side by side."""
    B, H, W, C = x.shape
    M, mq = m.window, m.window // m.stride_q
    assert H % M == 0 and W % M == 0
    pool = attnbench.create("mvit.pool", dim=m.dim, heads=m.heads, pool=m.pool_mode, kernel=m.kernel,
                            stride_q=m.stride_q, stride_kv=m.stride_kv, rel_pos=m.rel_pos,
                            residual_pooling=m.residual_pooling, rel_pos_size=m.rel_pos_size).to(x.dtype).eval()
    pool.load_state_dict(m.state_dict(), strict=True)
    out = x.new_zeros(B, H // m.stride_q, W // m.stride_q, C)
    for a in range(H // M):
        for b in range(W // M):
            out[:, a * mq:(a + 1) * mq, b * mq:(b + 1) * mq] = pool(x[:, a * M:(a + 1) * M, b * M:(b + 1) * M])
    return out


def _window(heads=2, seed=0, **kwargs):
    return randomize_(attnbench.create("mvit.window", dim=8 * heads, heads=heads, **kwargs), seed=seed).eval()


def _random_window_cases(n, seed):
    """(pool, heads, kernel, stride_q, stride_kv, window, rel_pos_size, rel_pos, residual_pooling, h, w):
    windows multiples of both strides, grids divisible by the window or not, smaller than it too."""
    rng = random.Random(seed)
    cases = [("conv", 2, 3, 1, 4, 8, 56, True, True, 16, 24),  # detectron2's stage-1 shape, scaled down
             ("conv", 2, 3, 2, 2, 4, 16, True, True, 13, 9),  # query pooling, ragged grid
             ("max", 1, 3, 1, 1, 3, 16, True, False, 7, 10),
             ("conv", 4, 5, 2, 4, 4, 8, True, True, 3, 2)]  # grid smaller than one window
    while len(cases) < n:
        stride_q, stride_kv = rng.choice([1, 1, 2]), rng.choice([1, 2, 4])
        unit = math.lcm(stride_q, stride_kv)
        window = unit * rng.randint(1, max(1, 8 // unit))
        cases.append((rng.choice(["conv", "avg", "max"]), rng.choice([1, 2, 4]), rng.choice([1, 2, 3, 5]), stride_q,
                      stride_kv, window, rng.choice([8, 16, 56]), rng.random() < 0.8, rng.random() < 0.5,
                      rng.randint(1, 20), rng.randint(1, 20)))
    return cases


@pytest.mark.parametrize("pool,heads,kernel,stride_q,stride_kv,window,rel_pos_size,rel_pos,residual_pooling,h,w",
                         _random_window_cases(16, seed=21))
def test_window_equals_hand_partition(pool, heads, kernel, stride_q, stride_kv, window, rel_pos_size, rel_pos,
                                      residual_pooling, h, w, rand):
    m = _window(heads, seed=h * w + window, pool=pool, kernel=kernel, stride_q=stride_q, stride_kv=stride_kv,
                window=window, rel_pos_size=rel_pos_size, rel_pos=rel_pos, residual_pooling=residual_pooling)
    x = torch.randn(2, h, w, 8 * heads, generator=rand)
    y, _ = assert_same_function(m, m, x, call_b=_window_reference)
    assert y.shape == (2, *m.output_size(h, w), 8 * heads) == (2, *attnbench.create(
        "mvit.pool", dim=8 * heads, heads=heads, kernel=kernel, stride_q=stride_q).output_size(h, w), 8 * heads)


@pytest.mark.parametrize("pool,stride_q,stride_kv,window,tiles", [("conv", 1, 4, 8, (2, 3)), ("conv", 2, 2, 4, (3, 2)),
                                                                  ("avg", 1, 2, 6, (2, 2)), ("max", 2, 4, 4, (1, 3)),
                                                                  ("conv", 1, 1, 5, (2, 2))])
def test_window_is_mvit_pool_per_window_when_pooling_stays_inside(pool, stride_q, stride_kv, window, tiles, rand):
    """With a 1 x 1 pooling kernel (strided sampling, nothing reaching across a window border) on a
    grid divisible by the window, the function is mvit.pool run on each window with the same weights."""
    m = _window(2, seed=window, pool=pool, kernel=1, stride_q=stride_q, stride_kv=stride_kv, window=window,
                rel_pos_size=16)
    x = torch.randn(2, tiles[0] * window, tiles[1] * window, 16, generator=rand)
    assert_same_function(m, m, x, call_b=_per_window_pool)


@pytest.mark.parametrize("pool,kernel", [("conv", 3), ("avg", 3), ("max", 5)])
def test_one_window_is_mvit_pool(pool, kernel, rand):
    """A grid of exactly one window is mvit.pool (same state_dict, loaded strictly both ways)."""
    m = _window(2, seed=1, pool=pool, kernel=kernel, stride_q=2, stride_kv=4, window=8, rel_pos_size=16)
    x = torch.randn(2, 8, 8, 16, generator=rand)
    assert_same_function(m, m, x, call_b=_per_window_pool)
    other = attnbench.create("mvit.pool", dim=16, heads=2, pool=pool, kernel=kernel, stride_q=2, rel_pos_size=16)
    m.load_state_dict(other.state_dict(), strict=True)


def test_pooling_runs_over_the_whole_grid(rand):
    """As in detectron2, Q/K/V are pooled before the grid is cut: a 3 x 3 conv at a window border sees the
    next window, so the function is not mvit.pool per window (which the hand partition does follow)."""
    m = _window(2, seed=3, kernel=3, stride_q=1, stride_kv=2, window=4, rel_pos_size=16)
    x = torch.randn(1, 8, 8, 16, generator=rand)
    assert_same_function(m, m, x, call_b=_window_reference)
    with pytest.raises(AssertionError, match="differ in float64"):
        assert_same_function(m, m, x, call_b=_per_window_pool)


def test_window_mask_is_caught(rand):
    """A reference with windows of window + stride (another partition) does not match."""
    m = _window(2, seed=4, kernel=3, stride_kv=2, window=4, rel_pos_size=16)
    wider = copy.deepcopy(m)
    wider.window = 6
    x = torch.randn(1, 12, 12, 16, generator=rand)
    with pytest.raises(AssertionError, match="differ in float64"):
        assert_same_function(m, wider, x, call_b=_window_reference)


def test_window_locality(rand):
    """Without pooling (kernel 1, strides 1) a changed token changes exactly the outputs of its window."""
    m = to_float64(_window(2, seed=5, kernel=1, stride_kv=1, window=4, rel_pos_size=16))
    x = torch.randn(1, 10, 7, 16, generator=rand, dtype=torch.float64)
    x2 = x.clone()
    x2[0, 5, 2] += 1.0
    with torch.no_grad():
        diff = (m(x2) - m(x)).abs().amax(-1)[0]  # (10, 7)
    inside = torch.zeros(10, 7, dtype=torch.bool)
    inside[4:8, 0:4] = True
    assert (diff[inside] > 0).all() and (diff[~inside] == 0).all()


@pytest.mark.parametrize("kwargs", [{"window": 0}, {"window": 6, "stride_kv": 4}, {"window": 3, "stride_q": 2},
                                    {"pool": "mean"}, {"stride_q": 0}])
def test_window_bad_parameters_raise(kwargs):
    with pytest.raises(ValueError):
        attnbench.create("mvit.window", dim=32, heads=2, **kwargs)


def test_window_flops_and_meta(rand):
    from attnbench.measure import flops as flops_mod
    for b, h, w, kwargs in [(2, 9, 13, {"window": 8, "stride_q": 2}), (1, 16, 16, {"window": 4, "stride_kv": 2}),
                            (1, 7, 5, {"pool": "avg", "window": 8})]:
        def build(kwargs=kwargs):
            return attnbench.create("mvit.window", dim=32, heads=2, **kwargs)
        analytic = build().flops_analytic(b, h, w)
        assert flops_mod.count_flops(build, (b, h, w, 32), torch.float32)["flops_torch"] == analytic
        assert 2 * flops_mod.count_fvcore(build().eval(), torch.randn(b, h, w, 32))["macs_fvcore_matmul"] == analytic
    with torch.device("meta"):
        m = attnbench.create("mvit.window", dim=48, heads=3, stride_q=2, window=8)
        y = m(torch.empty(2, 17, 12, 48, device="meta"))
    assert y.shape == (2, 9, 6, 48) and y.device.type == "meta"
