"""cswin.cross: dense masked reference, the microsoft/CSWin-Transformer code, locality, FLOPs, errors."""

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnbench
from conftest import randomize_
from equivalence import assert_close64, assert_same_function


def _cases(n, seed=0):
    """(batch, heads, dim, stripe, h, w): stripes 1..7, heads 2/4, grids divisible by the stripe or not."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        stripe = 1 + i % 7
        heads = rng.choice([2, 4])
        h, w = rng.randint(stripe, 3 * stripe + 2), rng.randint(stripe, 3 * stripe + 2)
        if i % 3 == 0:
            h, w = stripe * rng.randint(1, 3), stripe * rng.randint(1, 3)
        h, w = min(h, 16), min(w, 16)
        cases.append((rng.randint(1, 2), heads, 4 * heads * rng.choice([1, 2]), stripe, h, w))
    return cases


def _lepe_sliced(v, weight, bias, stripe_rows, stripe_cols):
    """Depthwise 3x3 conv (padding 1) of v (B, Hp, Wp, c) inside each stripe_rows x stripe_cols window,
    written as explicit slices: out[i, j] = b + sum_{a, e} w[a, e] * v[i + a - 1, j + e - 1] within the window."""
    B, Hp, Wp, c = v.shape
    out = torch.zeros_like(v)
    for r0 in range(0, Hp, stripe_rows):
        for c0 in range(0, Wp, stripe_cols):
            win = v[:, r0:r0 + stripe_rows, c0:c0 + stripe_cols]  # (B, sh, sw, c)
            padded = F.pad(win, (0, 0, 1, 1, 1, 1))  # zero border around this window only
            acc = bias.expand_as(win).clone()
            for a in range(3):
                for e in range(3):
                    acc = acc + weight[:, 0, a, e] * padded[:, a:a + stripe_rows, e:e + stripe_cols]
            out[:, r0:r0 + stripe_rows, c0:c0 + stripe_cols] = acc
    return out


def _dense_reference(m, x):
    """cswin.cross from the definition: full attention per half with an N x N 'same stripe' mask."""
    B, H, W, C = x.shape
    s, heads = m.stripe, m.heads
    Hp, Wp = -(-H // s) * s, -(-W // s) * s
    xp = torch.zeros(B, Hp, Wp, C, dtype=x.dtype)
    xp[:, :H, :W] = x
    q, k, v = m.qkv(xp).reshape(B, Hp, Wp, 3, C).unbind(3)  # each (B, Hp, Wp, C)
    rows = torch.arange(Hp)[:, None].expand(Hp, Wp).reshape(-1)
    cols = torch.arange(Wp)[None, :].expand(Hp, Wp).reshape(-1)
    same_row_stripe = (rows[:, None] // s) == (rows[None, :] // s)
    same_col_stripe = (cols[:, None] // s) == (cols[None, :] // s)
    h2, d, c = heads // 2, C // heads, C // 2
    outs = []
    for half, mask, conv, (sh, sw) in ((0, same_row_stripe, m.lepe_h, (s, Wp)),
                                       (1, same_col_stripe, m.lepe_v, (Hp, s))):
        sl = slice(half * c, (half + 1) * c)
        qh, kh, vh = (t[..., sl].reshape(B, Hp * Wp, h2, d).transpose(1, 2) for t in (q, k, v))
        logits = (qh @ kh.transpose(-2, -1)) * d ** -0.5
        logits = logits.masked_fill(~mask, float("-inf"))
        att = (logits.softmax(-1) @ vh).transpose(1, 2).reshape(B, Hp, Wp, c)
        outs.append(att + _lepe_sliced(v[..., sl], conv.weight, conv.bias, sh, sw))
    return m.proj(torch.cat(outs, -1))[:, :H, :W]


@pytest.mark.parametrize("batch,heads,dim,stripe,h,w", _cases(14))
def test_equals_dense_masked_reference(batch, heads, dim, stripe, h, w, rand):
    m = randomize_(attnbench.create("cswin.cross", dim=dim, heads=heads, stripe=stripe), seed=stripe).eval()
    x = torch.randn(batch, h, w, dim, generator=rand)
    y, _ = assert_same_function(m, m, x, call_b=_dense_reference)
    assert y.shape == (batch, h, w, dim)


# --- the reference code, microsoft/CSWin-Transformer models/cswin.py, written out ------------------

def img2windows(img, H_sp, W_sp):
    B, C, H, W = img.shape
    img_reshape = img.view(B, C, H // H_sp, H_sp, W // W_sp, W_sp)
    return img_reshape.permute(0, 2, 4, 3, 5, 1).contiguous().reshape(-1, H_sp * W_sp, C)


def windows2img(img_splits_hw, H_sp, W_sp, H, W):
    B = int(img_splits_hw.shape[0] / (H * W / H_sp / W_sp))
    img = img_splits_hw.view(B, H // H_sp, W // W_sp, H_sp, W_sp, -1)
    return img.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, H, W, -1)


class LePEAttention(nn.Module):
    """The reference's LePEAttention (attn_drop 0), idx 0: H_sp = resolution, W_sp = split_size (vertical);
    idx 1: H_sp = split_size, W_sp = resolution (horizontal)."""

    def __init__(self, dim, resolution, idx, split_size=7, num_heads=8):
        super().__init__()
        self.dim, self.resolution, self.split_size, self.num_heads = dim, resolution, split_size, num_heads
        self.scale = (dim // num_heads) ** -0.5
        if idx == 0:
            H_sp, W_sp = resolution, split_size
        else:
            W_sp, H_sp = resolution, split_size
        self.H_sp, self.W_sp = H_sp, W_sp
        self.get_v = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim)

    def im2cswin(self, x):
        B, N, C = x.shape
        H = W = int(np.sqrt(N))
        x = x.transpose(-2, -1).contiguous().view(B, C, H, W)
        x = img2windows(x, self.H_sp, self.W_sp)
        return x.reshape(-1, self.H_sp * self.W_sp, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3).contiguous()

    def get_lepe(self, x, func):
        B, N, C = x.shape
        H = W = int(np.sqrt(N))
        x = x.transpose(-2, -1).contiguous().view(B, C, H, W)
        H_sp, W_sp = self.H_sp, self.W_sp
        x = x.view(B, C, H // H_sp, H_sp, W // W_sp, W_sp)
        x = x.permute(0, 2, 4, 1, 3, 5).contiguous().reshape(-1, C, H_sp, W_sp)
        lepe = func(x)
        lepe = lepe.reshape(-1, self.num_heads, C // self.num_heads, H_sp * W_sp).permute(0, 1, 3, 2).contiguous()
        x = x.reshape(-1, self.num_heads, C // self.num_heads, self.H_sp * self.W_sp).permute(0, 1, 3, 2).contiguous()
        return x, lepe

    def forward(self, qkv):
        q, k, v = qkv[0], qkv[1], qkv[2]
        H = W = self.resolution
        B, L, C = q.shape
        assert L == H * W
        q, k = self.im2cswin(q), self.im2cswin(k)
        v, lepe = self.get_lepe(v, self.get_v)
        q = q * self.scale
        attn = nn.functional.softmax(q @ k.transpose(-2, -1), dim=-1, dtype=q.dtype)
        x = (attn @ v) + lepe
        x = x.transpose(1, 2).reshape(-1, self.H_sp * self.W_sp, C)
        return windows2img(x, self.H_sp, self.W_sp, H, W).view(B, -1, C)


class RefCSWinAttention(nn.Module):
    """CSWinBlock's attention part (no norm, MLP, residual), branch_num 2: attns[0] on the first C/2 channels."""

    def __init__(self, dim, reso, num_heads, split_size):
        super().__init__()
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.attns = nn.ModuleList([LePEAttention(dim // 2, reso, i, split_size, num_heads // 2) for i in range(2)])

    def forward(self, x):
        B, L, C = x.shape
        qkv = self.qkv(x).reshape(B, -1, 3, C).permute(2, 0, 1, 3)
        x1 = self.attns[0](qkv[:, :, :, :C // 2])
        x2 = self.attns[1](qkv[:, :, :, C // 2:])
        return self.proj(torch.cat([x1, x2], dim=2))


def _swap_halves(t, dim, axis):
    """Swap the two C/2 halves of each C-sized block of ``t`` along ``axis``."""
    blocks = t.shape[axis] // dim
    t = t.unflatten(axis, (blocks, 2, dim // 2))
    return t.flip(axis + 1).flatten(axis, axis + 2)


def _reference_from(m, reso):
    """The reference block holding m's weights: its attns[0] (vertical) is m's second half, attns[1] m's first."""
    ref = RefCSWinAttention(m.dim, reso, m.heads, m.stripe)
    with torch.no_grad():
        ref.qkv.weight.copy_(_swap_halves(m.qkv.weight, m.dim, 0))
        ref.qkv.bias.copy_(_swap_halves(m.qkv.bias, m.dim, 0))
        ref.proj.weight.copy_(_swap_halves(m.proj.weight, m.dim, 1))
        ref.proj.bias.copy_(m.proj.bias)
        ref.attns[0].get_v.load_state_dict(m.lepe_v.state_dict())
        ref.attns[1].get_v.load_state_dict(m.lepe_h.state_dict())
    return ref


@pytest.mark.parametrize("heads,stripe,mult", [(2, 1, 3), (2, 2, 4), (4, 3, 2), (4, 7, 2), (2, 4, 3), (4, 5, 2)])
def test_equals_reference_code(heads, stripe, mult, rand):
    dim, reso = 8 * heads, stripe * mult
    m = randomize_(attnbench.create("cswin.cross", dim=dim, heads=heads, stripe=stripe), seed=heads + stripe).eval()
    ref = _reference_from(m, reso).eval()
    x = torch.randn(2, reso, reso, dim, generator=rand)
    assert_same_function(m, ref, x, call_b=lambda r, x: r(x.flatten(1, 2)).reshape(x.shape))


def test_reference_branch_order_matters(rand):
    """The half swap above is needed: the reference's first branch is the vertical one."""
    m = randomize_(attnbench.create("cswin.cross", dim=16, heads=2, stripe=2), seed=1).eval().double()
    ref = RefCSWinAttention(16, 6, 2, 2).double()
    ref.load_state_dict({"qkv.weight": m.qkv.weight, "qkv.bias": m.qkv.bias, "proj.weight": m.proj.weight,
                         "proj.bias": m.proj.bias, **{f"attns.0.get_v.{k}": t for k, t in m.lepe_h.state_dict().items()},
                         **{f"attns.1.get_v.{k}": t for k, t in m.lepe_v.state_dict().items()}})
    x = torch.randn(1, 6, 6, 16, generator=rand, dtype=torch.float64)
    with torch.no_grad():
        assert (m(x) - ref(x.flatten(1, 2)).reshape(x.shape)).abs().max() > 1e-3


@pytest.mark.parametrize("stripe,h,w", [(3, 9, 12), (4, 10, 7), (2, 5, 5)])
def test_locality(stripe, h, w, rand):
    """One changed token changes the first half only in its row stripe, the second only in its column stripe."""
    dim = 16
    m = randomize_(attnbench.create("cswin.cross", dim=dim, heads=4, stripe=stripe), seed=stripe).eval().double()
    m.proj = nn.Identity()  # look at the attention output before proj
    x = torch.randn(1, h, w, dim, generator=rand, dtype=torch.float64)
    i, j = h - 2, 1
    x2 = x.clone()
    x2[0, i, j] += torch.randn(dim, generator=rand, dtype=torch.float64)
    with torch.no_grad():
        diff = (m(x2) - m(x)).abs()[0]  # (h, w, C)
    rows = (torch.arange(h) // stripe == i // stripe)[:, None].expand(h, w)
    cols = (torch.arange(w) // stripe == j // stripe)[None, :].expand(h, w)
    first, second = diff[..., :dim // 2].amax(-1), diff[..., dim // 2:].amax(-1)
    assert first[~rows].max() == 0 and second[~cols].max() == 0
    assert (first[rows] > 0).all() and (second[cols] > 0).all()  # and the whole stripe sees it


def test_flops_match_counters():
    from attnbench.measure import flops as flops_mod
    for b, h, w, dim, heads, stripe in [(2, 9, 13, 32, 4, 3), (1, 14, 14, 16, 2, 7), (1, 5, 8, 24, 2, 1)]:
        build = lambda: attnbench.create("cswin.cross", dim=dim, heads=heads, stripe=stripe)  # noqa: E731
        m = build().eval()
        analytic = m.flops_analytic(b, h, w)
        assert flops_mod.count_flops(build, (b, h, w, dim), torch.float32)["flops_torch"] == analytic
        assert 2 * flops_mod.count_fvcore(m, torch.randn(b, h, w, dim))["macs_fvcore_matmul"] == analytic


@pytest.mark.parametrize("heads,stripe", [(1, 7), (3, 7), (5, 7), (0, 7), (4, 0), (4, -1)])
def test_bad_constructor_values(heads, stripe):
    with pytest.raises(ValueError):
        attnbench.create("cswin.cross", dim=40 * max(heads, 1), heads=heads, stripe=stripe)


def test_dim_not_divisible_by_heads():
    with pytest.raises(ValueError):
        attnbench.create("cswin.cross", dim=30, heads=4)


def test_float64_gradients_match_dense_reference(rand):
    m = randomize_(attnbench.create("cswin.cross", dim=16, heads=2, stripe=3), seed=9).double()
    x = torch.randn(2, 7, 5, 16, generator=rand, dtype=torch.float64, requires_grad=True)
    g1 = torch.autograd.grad(m(x).square().sum(), x)[0]
    g2 = torch.autograd.grad(_dense_reference(m, x).square().sum(), x)[0]
    assert_close64(g1, g2, what="input gradients")
