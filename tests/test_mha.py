"""mha.sdpa and mha.math compute the same function, and match timm's ViT Attention (in float64)."""

import random

import pytest
import torch
from timm.layers import Attention as TimmAttention

import attnbench
from conftest import randomize_
from equivalence import assert_close64, assert_same_function, to_float64


def _random_shapes(n, seed):
    """(dim, heads, h, w, batch): head dims 4..32, grids 1..17 per side (seeded)."""
    rng = random.Random(seed)
    shapes = []
    for _ in range(n):
        heads = rng.randint(1, 8)
        shapes.append((heads * rng.choice([4, 8, 12, 16, 32]), heads, rng.randint(1, 17), rng.randint(1, 17),
                       rng.randint(1, 3)))
    return shapes


FIXED = [(96, 3, 7, 7, 2), (64, 4, 5, 9, 1), (48, 1, 12, 3, 3), (128, 8, 16, 16, 1)]


@pytest.mark.parametrize("dim,heads,h,w,batch", FIXED + _random_shapes(6, seed=101))
def test_sdpa_equals_math(dim, heads, h, w, batch, rand):
    sdpa = randomize_(attnbench.create("mha.sdpa", dim=dim, heads=heads), seed=dim + heads).eval()
    math = attnbench.create("mha.math", dim=dim, heads=heads).eval()
    math.load_state_dict(sdpa.state_dict(), strict=True)
    x = torch.randn(batch, h, w, dim, generator=rand)
    y1, _ = assert_same_function(sdpa, math, x)
    assert y1.shape == (batch, h, w, dim)


def _timm_call(ref, x):
    B, H, W, C = x.shape
    return ref(x.reshape(B, H * W, C)).reshape(B, H, W, C)


@pytest.mark.parametrize("name", ["mha.sdpa", "mha.math"])
@pytest.mark.parametrize("dim,heads,h,w,batch", [(96, 3, 6, 5, 2), (64, 8, 6, 5, 2)] + _random_shapes(3, seed=202))
def test_matches_timm_vit_attention(name, dim, heads, h, w, batch, rand):
    ref = randomize_(TimmAttention(dim, num_heads=heads, qkv_bias=True), seed=7).eval()
    ours = attnbench.create(name, dim=dim, heads=heads).eval()
    ours.load_state_dict(ref.state_dict(), strict=False)
    assert set(ours.state_dict()) <= set(ref.state_dict())
    x = torch.randn(batch, h, w, dim, generator=rand)
    assert_same_function(ours, ref, x, call_b=_timm_call)


def test_qkv_bias_off_has_no_bias():
    m = attnbench.create("mha.sdpa", dim=32, heads=2, qkv_bias=False)
    assert m.qkv.bias is None and m.proj.bias is not None


@pytest.mark.parametrize("dim,heads,h,w,batch", [(32, 2, 4, 4, 1), (24, 3, 5, 3, 2)])
def test_backward_agrees(dim, heads, h, w, batch, rand):
    """Input and parameter gradients of sdpa and math agree in float64."""
    sdpa = to_float64(randomize_(attnbench.create("mha.sdpa", dim=dim, heads=heads), seed=3))
    math = to_float64(attnbench.create("mha.math", dim=dim, heads=heads))
    math.load_state_dict(sdpa.state_dict())
    x = torch.randn(batch, h, w, dim, generator=rand, dtype=torch.float64)
    g = torch.randn(batch, h, w, dim, generator=rand, dtype=torch.float64)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    sdpa(xs[0]).backward(g)
    math(xs[1]).backward(g)
    assert_close64(xs[0].grad, xs[1].grad, what="input gradients")
    names = [n for n, _ in sdpa.named_parameters()]
    assert names == [n for n, _ in math.named_parameters()]
    for (n, p1), (_, p2) in zip(sdpa.named_parameters(), math.named_parameters()):
        assert_close64(p1.grad, p2.grad, what=f"gradient of {n}")
