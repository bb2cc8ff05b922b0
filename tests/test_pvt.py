"""sra.conv and sra.linear match timm's PVTv2 Attention given the same weights."""

import pytest
import torch
from timm.models.pvt_v2 import Attention as TimmPvtAttention

import attnbench
from conftest import randomize_


def _timm_out(ref, x):
    B, H, W, C = x.shape
    return ref(x.reshape(B, H * W, C), (H, W)).reshape(B, H, W, C)


@pytest.mark.parametrize("sr_ratio", [1, 2, 4, 8])
@pytest.mark.parametrize("dim,heads,h,w", [(64, 1, 16, 16), (64, 2, 17, 13), (40, 5, 9, 24)])
def test_sra_conv_matches_timm(sr_ratio, dim, heads, h, w, rand):
    if min(h, w) < sr_ratio:
        pytest.skip("grid smaller than the reduction")
    ref = randomize_(TimmPvtAttention(dim, num_heads=heads, sr_ratio=sr_ratio), seed=sr_ratio).eval()
    ours = attnbench.create("sra.conv", dim=dim, heads=heads, sr_ratio=sr_ratio).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, h, w, dim, generator=rand)
    torch.testing.assert_close(ours(x), _timm_out(ref, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dim,heads,h,w", [(64, 1, 56, 56), (64, 2, 17, 13), (40, 5, 7, 7), (32, 2, 4, 5)])
def test_sra_linear_matches_timm(dim, heads, h, w, rand):
    ref = randomize_(TimmPvtAttention(dim, num_heads=heads, linear_attn=True), seed=11).eval()
    ours = attnbench.create("sra.linear", dim=dim, heads=heads).eval()  # timm pools to 7 x 7
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, h, w, dim, generator=rand)
    torch.testing.assert_close(ours(x), _timm_out(ref, x), rtol=1e-4, atol=1e-5)


def test_sra_conv_reports_too_small_grid():
    m = attnbench.create("sra.conv", dim=32, heads=2, sr_ratio=8)
    assert m.supports(4, 16) is not None
    assert m.supports(8, 8) is None


def test_bad_parameters_raise():
    with pytest.raises(ValueError):
        attnbench.create("sra.conv", dim=32, heads=2, sr_ratio=0)
    with pytest.raises(ValueError):
        attnbench.create("sra.linear", dim=30, heads=4)
