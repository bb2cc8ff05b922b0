"""mha.sdpa and mha.math compute the same function, and match timm's ViT Attention."""

import pytest
import torch
from timm.layers import Attention as TimmAttention

import attnbench
from conftest import randomize_


@pytest.mark.parametrize("dim,heads,h,w,batch", [(96, 3, 7, 7, 2), (64, 4, 5, 9, 1), (48, 1, 12, 3, 3),
                                                 (128, 8, 16, 16, 1)])
def test_sdpa_equals_math(dim, heads, h, w, batch, rand):
    sdpa = randomize_(attnbench.create("mha.sdpa", dim=dim, heads=heads), seed=dim + heads).eval()
    math = attnbench.create("mha.math", dim=dim, heads=heads).eval()
    math.load_state_dict(sdpa.state_dict(), strict=True)
    x = torch.randn(batch, h, w, dim, generator=rand)
    y1, y2 = sdpa(x), math(x)
    assert y1.shape == (batch, h, w, dim)
    torch.testing.assert_close(y1, y2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["mha.sdpa", "mha.math"])
@pytest.mark.parametrize("dim,heads", [(96, 3), (64, 8)])
def test_matches_timm_vit_attention(name, dim, heads, rand):
    ref = randomize_(TimmAttention(dim, num_heads=heads, qkv_bias=True), seed=7).eval()
    ours = attnbench.create(name, dim=dim, heads=heads).eval()
    ours.load_state_dict(ref.state_dict(), strict=False)
    assert set(ours.state_dict()) <= set(ref.state_dict())
    x = torch.randn(2, 6, 5, dim, generator=rand)
    want = ref(x.reshape(2, 30, dim)).reshape(2, 6, 5, dim)
    torch.testing.assert_close(ours(x), want, rtol=1e-4, atol=1e-5)


def test_qkv_bias_off_has_no_bias():
    m = attnbench.create("mha.sdpa", dim=32, heads=2, qkv_bias=False)
    assert m.qkv.bias is None and m.proj.bias is not None


def test_backward_agrees(rand):
    sdpa = randomize_(attnbench.create("mha.sdpa", dim=32, heads=2), seed=3)
    math = attnbench.create("mha.math", dim=32, heads=2)
    math.load_state_dict(sdpa.state_dict())
    x = torch.randn(1, 4, 4, 32, generator=rand)
    g = torch.randn(1, 4, 4, 32, generator=rand)
    sdpa(x).backward(g)
    math(x).backward(g)
    for (n, p1), (_, p2) in zip(sdpa.named_parameters(), math.named_parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-5, msg=n)
