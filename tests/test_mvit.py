"""mvit.pool matches timm's MViTv2 MultiScaleAttention given the same weights."""

from functools import partial

import pytest
import torch
from timm.models.mvitv2 import MultiScaleAttention as TimmMViTAttention
from torch import nn

import attnbench
from conftest import randomize_


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


def _check_against_timm(ref, ours, x):
    B, H, W, C = x.shape
    y_ref, (hq, wq) = ref(x.reshape(B, H * W, C), [H, W])
    y = ours(x)
    assert y.shape == (B, hq, wq, C)
    torch.testing.assert_close(y, y_ref.reshape(B, hq, wq, C), rtol=1e-4, atol=1e-5)


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


@pytest.mark.parametrize("pool", ["conv", "avg", "max"])
@pytest.mark.parametrize("h,w", [(9, 13), (24, 20), (1, 1)])
def test_other_grids_interpolate_rel_pos(pool, h, w, rand):
    """A grid other than rel_pos_size needs other table lengths: interpolated, finite, and it matters."""
    m = randomize_(attnbench.create("mvit.pool", dim=32, heads=2, pool=pool, stride_q=2, rel_pos_size=16)).eval()
    x = torch.randn(2, h, w, 32, generator=rand)
    y = m(x)
    assert y.shape == (2, *m.output_size(h, w), 32) and torch.isfinite(y).all()
    if h * w > 1:  # with one key the logit bias cancels in the softmax
        with torch.no_grad():
            m.rel_pos_h.mul_(3)
        assert not torch.allclose(m(x), y)  # the (interpolated) table is used


def test_meta_device_and_half_precision(rand):
    with torch.device("meta"):
        m = attnbench.create("mvit.pool", dim=48, heads=3, stride_q=2)
        y = m(torch.empty(2, 16, 12, 48, device="meta"))
    assert y.shape == (2, 8, 6, 48) and y.device.type == "meta"
    for dtype in (torch.bfloat16, torch.float16):
        m = attnbench.create("mvit.pool", dim=48, heads=3, stride_q=2).to(dtype).eval()
        y = m(torch.randn(2, 16, 12, 48, generator=rand).to(dtype))
        assert y.dtype == dtype and torch.isfinite(y).all()


@pytest.mark.parametrize("kwargs", [dict(pool="mean"), dict(pool="conv_unshared"), dict(stride_q=0),
                                    dict(stride_kv=0), dict(kernel=0), dict(rel_pos_size=0)])
def test_bad_parameters_raise(kwargs):
    with pytest.raises(ValueError):
        attnbench.create("mvit.pool", dim=32, heads=2, **kwargs)


def test_heads_must_divide_dim():
    with pytest.raises(ValueError):
        attnbench.create("mvit.pool", dim=30, heads=4)
