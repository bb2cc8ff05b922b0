"""swin.window, swin.shift_pad and swin.shift_cyclic: agreement, timm equivalence, locality, FLOPs, errors."""

import random

import pytest
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention, window_partition, window_reverse

import attnbench
from attnbench.measure import flops as flops_mod
from conftest import randomize_
from equivalence import assert_low_precision_close, assert_same_function

VARIANTS = ["swin.window", "swin.shift_pad", "swin.shift_cyclic"]
SHIFTED = ["swin.shift_pad", "swin.shift_cyclic"]


def _pad(x, window):
    """Zero-pad x (B, H, W, C) at bottom/right to multiples of the window, as Swin does."""
    return F.pad(x, (0, 0, 0, -x.shape[2] % window, 0, -x.shape[1] % window))


def _random_cases(n, seed=0):
    """(batch, heads, dim, window, shift, h, w): windows 3..7, every shift, grids divisible or not."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        window = rng.randint(3, 7)
        heads = rng.choice([1, 2, 3, 4])
        h, w = (rng.randint(window + 1, 3 * window + 2) for _ in range(2))
        if i % 3 == 0:  # every third case divisible by the window
            h, w = window * rng.randint(2, 3), window * rng.randint(2, 3)
        cases.append((rng.randint(2, 3), heads, 8 * heads, window, rng.randint(1, window - 1), h, w))
    return cases


@pytest.mark.parametrize("batch,heads,dim,window,shift,h,w", _random_cases(10))
def test_shift_pad_equals_shift_cyclic(batch, heads, dim, window, shift, h, w, rand):
    cyclic = randomize_(attnbench.create("swin.shift_cyclic", dim=dim, heads=heads, window=window, shift=shift),
                        seed=window * 10 + shift).eval()
    pad = attnbench.create("swin.shift_pad", dim=dim, heads=heads, window=window, shift=shift).eval()
    pad.load_state_dict(cyclic.state_dict(), strict=True)
    x = torch.randn(batch, h, w, dim, generator=rand)
    _, y = assert_same_function(pad, cyclic, x)
    assert y.shape == (batch, h, w, dim)


def test_shifted_variants_differ_from_window():
    """The agreement above is not trivial: shifting changes the function."""
    m = randomize_(attnbench.create("swin.window", dim=16, heads=2, window=4), seed=3).eval()
    s = attnbench.create("swin.shift_cyclic", dim=16, heads=2, window=4).eval()
    s.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(1, 8, 8, 16)
    with pytest.raises(AssertionError, match="differ in float64"):
        assert_same_function(m, s, x)
    assert (m(x) - s(x)).abs().max() > 1e-2


def _random_window_cases(n, seed):
    """(dim, heads, window, h, w): windows 2..8, grids smaller than, equal to and not multiples of the window."""
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        window, heads = rng.randint(2, 8), rng.randint(1, 4)
        cases.append((heads * rng.choice([4, 8]), heads, window, rng.randint(1, 3 * window + 1),
                      rng.randint(1, 3 * window + 1)))
    return cases


def _timm_window_call(window):
    """timm's WindowAttention over Swin's windows of x (B, H, W, C): pad, partition, attend, reverse, crop."""
    def call(ref, x):
        B, h, w, dim = x.shape
        xp = _pad(x, window)
        wins = window_partition(xp, (window, window)).reshape(-1, window * window, dim)
        out = ref(wins).reshape(-1, window, window, dim)
        return window_reverse(out, (window, window), xp.shape[1], xp.shape[2])[:, :h, :w]
    return call


@pytest.mark.parametrize("dim,heads,window,h,w", [(32, 2, 7, 14, 14), (48, 3, 7, 16, 12), (24, 4, 4, 9, 10),
                                                  (16, 1, 3, 3, 5)] + _random_window_cases(6, seed=5))
def test_window_matches_timm_window_attention(dim, heads, window, h, w, rand):
    ref = randomize_(WindowAttention(dim, num_heads=heads, window_size=window), seed=window).eval()
    ours = attnbench.create("swin.window", dim=dim, heads=heads, window=window).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, h, w, dim, generator=rand)
    y, _ = assert_same_function(ours, ref, x, call_b=_timm_window_call(window))
    assert y.shape == (2, h, w, dim)


def _random_block_cases(n, seed):
    """(dim, heads, window, shift, h, w): every shift (-1 the default), grids divisible by the window or not."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        window, heads = rng.randint(2, 7), rng.randint(1, 4)
        h, w = (rng.randint(2, 3 * window + 1) for _ in range(2))
        if i % 3 == 0:
            h, w = window * rng.randint(1, 3), window * rng.randint(1, 3)
        cases.append((heads * rng.choice([4, 8]), heads, window, rng.choice([-1, *range(1, window)]), h, w))
    return cases


@pytest.mark.parametrize("dim,heads,window,shift,h,w", [
    (32, 2, 7, -1, 14, 14), (48, 3, 7, 2, 21, 14), (24, 4, 4, 1, 8, 12), (16, 1, 5, 4, 10, 15),
    (48, 3, 7, -1, 16, 12), (24, 2, 4, 3, 9, 10), (16, 2, 3, 1, 4, 11),
] + _random_block_cases(6, seed=6))
@pytest.mark.parametrize("name", SHIFTED)
def test_shifted_match_timm_block(name, dim, heads, window, shift, h, w, rand):
    """timm's SwinTransformerBlock._attn (roll, region mask, window attention, roll back).

    timm rolls before padding a grid not divisible by the window; Swin (and this package) pads first.
    On such grids timm is given the grid padded by hand, so it sees a divisible grid and computes Swin's
    function; always_partition keeps it from dropping the shift when a padded side equals the window.
    """
    x = torch.randn(2, h, w, dim, generator=rand)
    xp = _pad(x, window)
    block = SwinTransformerBlock(dim, input_resolution=tuple(xp.shape[1:3]), num_heads=heads, window_size=window,
                                 shift_size=window // 2 if shift == -1 else shift, always_partition=True).eval()
    randomize_(block.attn, seed=shift + 7)
    ours = attnbench.create(name, dim=dim, heads=heads, window=window, shift=shift).eval()
    ours.load_state_dict(block.attn.state_dict(), strict=True)
    assert block.attn_mask is not None  # timm shifts (with its region mask) on this grid
    assert_same_function(ours, block, x, call_b=lambda ref, x: ref._attn(_pad(x, window))[:, :h, :w])


def _window_ids(n, window, shift):
    """(n,) index of the window (along one axis) that each position falls in; shifted windows start at shift."""
    return (torch.arange(n) + (window - shift) % window) // window


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("window,shift,h,w", [(4, 2, 8, 8), (3, 1, 7, 11), (5, 4, 12, 9)])
def test_locality(name, window, shift, h, w):
    """Changing one token changes exactly the outputs of its (shifted) window, in its image only."""
    kwargs = {"window": window} if name == "swin.window" else {"window": window, "shift": shift}
    m = randomize_(attnbench.create(name, dim=16, heads=2, **kwargs), seed=1).double().eval()
    s = 0 if name == "swin.window" else shift
    rows, cols = _window_ids(h, window, s), _window_ids(w, window, s)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, h, w, 16, generator=g, dtype=torch.float64)
    y = m(x)
    for i, j in [(0, 0), (h - 1, w - 1), (max(s - 1, 0), s), (h // 2, w - 1)]:
        x2 = x.clone()
        x2[1, i, j] += torch.randn(16, generator=g, dtype=torch.float64)
        changed = (m(x2) - y).abs().amax(-1) > 1e-9  # (B, H, W); cross-region leaks are ~exp(-100)
        expected = torch.zeros(2, h, w, dtype=torch.bool)
        expected[1] = (rows[:, None] == rows[i]) & (cols[None, :] == cols[j])
        assert torch.equal(changed, expected), (name, i, j)


@pytest.mark.parametrize("name", SHIFTED)
def test_default_shift_is_half_window(name):
    assert attnbench.get_spec(name).params == {"window": 7, "shift": -1, "qkv_bias": True}
    assert attnbench.create(name, dim=16, heads=2, window=6).shift == 3
    assert attnbench.create(name, dim=16, heads=2, window=7).shift == 3


def test_layout_is_shared_and_loads_across_variants():
    models = [randomize_(attnbench.create(n, dim=24, heads=3, window=5), seed=2) for n in VARIANTS]
    keys = {n: set(m.state_dict()) for n, m in zip(VARIANTS, models)}
    assert all(k == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "relative_position_bias_table"}
               for k in keys.values())
    for a in models:
        for name in VARIANTS:
            attnbench.create(name, dim=24, heads=3, window=5).load_state_dict(a.state_dict(), strict=True)


def test_shifted_variants_run_on_grids_no_larger_than_the_window():
    """Swin-T stage 4 (7 x 7 grid, window 7): padding makes 4 windows, cyclic shift 1 with 4 regions."""
    pad = randomize_(attnbench.create("swin.shift_pad", dim=16, heads=2, window=7), seed=3).eval()
    cyc = attnbench.create("swin.shift_cyclic", dim=16, heads=2, window=7).eval()
    cyc.load_state_dict(pad.state_dict())
    x = torch.randn(2, 7, 7, 16, dtype=torch.float64)
    assert_same_function(pad, cyc, x)
    assert pad.flops_analytic(1, 7, 7) > cyc.flops_analytic(1, 7, 7)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("window,shift,h,w", [(3, 1, 10, 7), (4, 3, 9, 13), (5, 2, 15, 10), (7, 3, 56, 80)])
def test_flops_counted_on_meta_match_analytic(name, window, shift, h, w):
    """Non-default windows and shifts, grids divisible and not (test_flops covers the defaults)."""
    kwargs = {"window": window} if name == "swin.window" else {"window": window, "shift": shift}
    build = lambda: attnbench.create(name, dim=32, heads=2, **kwargs)  # noqa: E731
    counted = flops_mod.count_flops(build, (2, h, w, 32), torch.float32)
    assert counted["count_message"] == ""
    assert counted["flops_torch"] == build().flops_analytic(2, h, w)


def test_padding_variant_does_more_windows():
    pad = attnbench.create("swin.shift_pad", dim=32, heads=2, window=7)
    cyclic = attnbench.create("swin.shift_cyclic", dim=32, heads=2, window=7)
    window = attnbench.create("swin.window", dim=32, heads=2, window=7)
    assert cyclic.flops_analytic(1, 56, 56) == window.flops_analytic(1, 56, 56)
    assert pad.flops_analytic(1, 56, 56) * 64 == cyclic.flops_analytic(1, 56, 56) * 81  # 9 x 9 vs 8 x 8 windows
    assert pad.flops_analytic(1, 20, 15) * 9 == cyclic.flops_analytic(1, 20, 15) * 16  # padded to 21 x 21


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_and_meta(name, dtype, rand):
    """float16 / bfloat16 outputs are the float64 function within the dtype's rounding."""
    m = randomize_(attnbench.create(name, dim=32, heads=2, window=4), seed=4).eval()
    x = torch.randn(2, 9, 10, 32, generator=rand)
    assert assert_low_precision_close(m, x, dtype).shape == (2, 9, 10, 32)
    with torch.device("meta"):
        mm = attnbench.create(name, dim=32, heads=2, window=4)
    assert mm(torch.empty(2, 9, 10, 32, device="meta")).shape == (2, 9, 10, 32)


def test_bad_parameters_raise():
    for name in VARIANTS:
        with pytest.raises(ValueError, match="window"):
            attnbench.create(name, dim=32, heads=2, window=0)
        with pytest.raises(ValueError, match="divisible"):
            attnbench.create(name, dim=30, heads=4)
    for name in SHIFTED:
        for shift in (0, 7, 9, -2):
            with pytest.raises(ValueError, match="shift"):
                attnbench.create(name, dim=32, heads=2, window=7, shift=shift)
        with pytest.raises(ValueError, match="shift"):  # window 1: the default shift window // 2 is 0
            attnbench.create(name, dim=32, heads=2, window=1)
