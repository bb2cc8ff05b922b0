"""sra.conv and sra.linear match timm's PVTv2 Attention given the same weights (in float64)."""

import random

import pytest
import torch
from timm.models.pvt_v2 import Attention as TimmPvtAttention

import attnbench
from conftest import randomize_
from equivalence import assert_same_function


def _timm_call(ref, x):
    B, H, W, C = x.shape
    return ref(x.reshape(B, H * W, C), (H, W)).reshape(B, H, W, C)


def _random_conv_cases(n, seed):
    """(sr_ratio, dim, heads, h, w): grids at least sr_ratio per side, mostly not multiples of it."""
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        sr, heads = rng.choice([1, 2, 3, 4, 5, 8]), rng.randint(1, 4)
        cases.append((sr, heads * rng.choice([8, 12, 16]), heads, rng.randint(sr, 3 * sr + 4),
                      rng.randint(sr, 3 * sr + 4)))
    return cases


FIXED_CONV = [(sr, *shape) for sr in (1, 2, 4, 8)
              for shape in ((64, 1, 16, 16), (64, 2, 17, 13), (40, 5, 9, 24)) if min(shape[2:]) >= sr]


@pytest.mark.parametrize("sr_ratio,dim,heads,h,w", FIXED_CONV + _random_conv_cases(8, seed=3))
def test_sra_conv_matches_timm(sr_ratio, dim, heads, h, w, rand):
    ref = randomize_(TimmPvtAttention(dim, num_heads=heads, sr_ratio=sr_ratio), seed=sr_ratio).eval()
    ours = attnbench.create("sra.conv", dim=dim, heads=heads, sr_ratio=sr_ratio).eval()
    assert ours.supports(h, w) is None
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, h, w, dim, generator=rand)
    y, _ = assert_same_function(ours, ref, x, call_b=_timm_call)
    assert y.shape == (2, h, w, dim)


def _random_linear_cases(n, seed):
    """(dim, heads, h, w): grids 1..30 per side, smaller and larger than the 7 x 7 pool."""
    rng = random.Random(seed)
    return [(heads * rng.choice([8, 16]), heads, rng.randint(1, 30), rng.randint(1, 30))
            for heads in (rng.randint(1, 4) for _ in range(n))]


@pytest.mark.parametrize("dim,heads,h,w", [(64, 1, 56, 56), (64, 2, 17, 13), (40, 5, 7, 7), (32, 2, 4, 5)]
                         + _random_linear_cases(5, seed=4))
def test_sra_linear_matches_timm(dim, heads, h, w, rand):
    ref = randomize_(TimmPvtAttention(dim, num_heads=heads, linear_attn=True), seed=11).eval()
    ours = attnbench.create("sra.linear", dim=dim, heads=heads).eval()  # timm pools to 7 x 7
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, h, w, dim, generator=rand)
    assert_same_function(ours, ref, x, call_b=_timm_call)


def test_sra_conv_reports_too_small_grid():
    m = attnbench.create("sra.conv", dim=32, heads=2, sr_ratio=8)
    assert m.supports(4, 16) is not None
    assert m.supports(8, 8) is None


def test_bad_parameters_raise():
    with pytest.raises(ValueError):
        attnbench.create("sra.conv", dim=32, heads=2, sr_ratio=0)
    with pytest.raises(ValueError):
        attnbench.create("sra.linear", dim=30, heads=4)
