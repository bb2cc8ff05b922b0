"""local.im2col, local.shift_dwconv and local.slide: neighbourhood attention with zero-padded K/V."""

import copy
import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import attnbench
from attnbench.measure import flops as F
from conftest import randomize_
from equivalence import assert_low_precision_close, assert_same_function, to_float64

VARIANTS = ["local.im2col", "local.shift_dwconv", "local.slide"]


def _reference(m, x):
    """Loops over query positions and their kernel x kernel neighbours; zero k/v outside the image.

    Computes in the dtype of ``x`` (and ``m``'s weights)."""
    B, H, W, C = x.shape
    h, d, r = m.heads, C // m.heads, m.kernel // 2
    q, k, v = m.qkv(x).split(C, dim=-1)  # each (B, H, W, C)
    zero = x.new_zeros(B, C)
    out = x.new_empty(B, H, W, C)
    for i in range(H):
        for j in range(W):
            ks, vs = [], []
            for di in range(-r, r + 1):
                for dj in range(-r, r + 1):
                    inside = 0 <= i + di < H and 0 <= j + dj < W
                    ks.append(k[:, i + di, j + dj] if inside else zero)
                    vs.append(v[:, i + di, j + dj] if inside else zero)
            kn = torch.stack(ks, 1).reshape(B, -1, h, d)  # (B, K, h, d)
            vn = torch.stack(vs, 1).reshape(B, -1, h, d)
            qi = q[:, i, j].reshape(B, 1, h, d)
            attn = ((qi * kn).sum(-1) * d ** -0.5).softmax(dim=1)  # (B, K, h)
            out[:, i, j] = (attn.unsqueeze(-1) * vn).sum(1).reshape(B, C)
    return m.proj(out)


def _slide_reference(m, x):
    """local.slide written out: neighbour j of channel c at (i, j) is sum over the kernel window of
    (one-hot_j + deform[c, j]) weights times k (v) there, zero outside; then softmax over the neighbours."""
    B, H, W, C = x.shape
    h, d, n = m.heads, C // m.heads, m.kernel
    K, r = n * n, n // 2
    weight = (m.merged if m.is_merged else m.shift + m.deform).reshape(C, K, n, n)  # (C, K, window)
    q, k, v = m.qkv(x).split(C, dim=-1)
    kp, vp = (torch.nn.functional.pad(t, (0, 0, r, r, r, r)) for t in (k, v))  # (B, H + 2r, W + 2r, C)
    out = x.new_empty(B, H, W, C)
    for i in range(H):
        for j in range(W):
            kn = torch.einsum("cjab,Babc->Bjc", weight, kp[:, i:i + n, j:j + n]).reshape(B, K, h, d)
            vn = torch.einsum("cjab,Babc->Bjc", weight, vp[:, i:i + n, j:j + n]).reshape(B, K, h, d)
            qi = q[:, i, j].reshape(B, 1, h, d)
            attn = ((qi * kn).sum(-1) * d ** -0.5).softmax(dim=1)  # (B, K, h)
            out[:, i, j] = (attn.unsqueeze(-1) * vn).sum(1).reshape(B, C)
    return m.proj(out)


def _random_cases(n, seed):
    """(kernel, dim, heads, batch, height, width): kernels 1..9, grids smaller and larger than the kernel."""
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        heads = rng.randint(1, 4)
        cases.append((rng.choice([1, 3, 5, 7, 9]), heads * rng.choice([4, 8]), heads, rng.randint(1, 2),
                      rng.randint(1, 9), rng.randint(1, 9)))
    return cases


CASES = [  # kernel, dim, heads, batch, height, width
    (1, 16, 2, 2, 5, 4),
    (3, 24, 3, 2, 6, 5),
    (3, 16, 1, 1, 2, 2),  # grid smaller than the kernel
    (5, 32, 4, 2, 7, 3),
    (5, 16, 2, 1, 3, 4),  # grid smaller than the kernel
    (7, 24, 2, 2, 9, 6),
    (7, 16, 4, 1, 4, 5),  # grid smaller than the kernel
    (7, 8, 1, 1, 1, 1),  # one token: itself and 48 zero neighbours
]


@pytest.mark.parametrize("kernel,dim,heads,b,h,w", CASES + _random_cases(6, seed=8))
def test_im2col_and_shift_dwconv_match_loop_reference(kernel, dim, heads, b, h, w, rand):
    ref = randomize_(attnbench.create("local.im2col", dim=dim, heads=heads, kernel=kernel), seed=kernel).eval()
    conv = attnbench.create("local.shift_dwconv", dim=dim, heads=heads, kernel=kernel).eval()
    conv.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(b, h, w, dim, generator=rand)
    y_im2col, _ = assert_same_function(ref, ref, x, call_b=_reference, what="im2col vs loop reference")
    assert y_im2col.shape == (b, h, w, dim)
    assert_same_function(conv, ref, x, call_b=_reference, what="shift_dwconv vs loop reference")
    assert_same_function(conv, ref, x, what="shift_dwconv vs im2col")


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("kernel,dim,heads,b,h,w", [(3, 24, 3, 2, 6, 5), (5, 16, 2, 1, 3, 4), (1, 8, 1, 1, 3, 2)]
                         + _random_cases(2, seed=9))
def test_slide_matches_loop_reference(kernel, dim, heads, b, h, w, merged, rand):
    """local.slide (random deform), two-path and merged, against its written-out formula."""
    m = randomize_(attnbench.create("local.slide", dim=dim, heads=heads, kernel=kernel), seed=kernel + 1).eval()
    assert m.deform.abs().sum() > 0
    m = to_float64(m)
    if merged:
        m.reparameterize()
    x = torch.randn(b, h, w, dim, generator=rand)
    assert_same_function(m, m, x, call_b=_slide_reference)


def test_shift_buffer_is_not_in_state_dict():
    m = attnbench.create("local.shift_dwconv", dim=16, heads=2, kernel=3)
    assert m.shift.shape == (16 * 9, 1, 3, 3)
    assert set(m.state_dict()) == set(attnbench.create("local.im2col", dim=16, heads=2, kernel=3).state_dict())


@pytest.mark.parametrize("kernel,h,w", [(3, 6, 5), (5, 3, 7), (7, 9, 6)])
def test_slide_reparameterize_keeps_function(kernel, h, w, rand):
    m = to_float64(randomize_(attnbench.create("local.slide", dim=24, heads=3, kernel=kernel), seed=3).eval())
    assert m.deform.abs().sum() > 0
    x = torch.randn(2, h, w, 24, generator=rand)
    two_path = copy.deepcopy(m)
    assert m.reparameterize() is m and m.is_merged and not hasattr(m, "deform")
    m.reparameterize()  # idempotent
    assert "merged" in m.state_dict() and "deform" not in m.state_dict()
    assert_same_function(m, two_path, x)  # merged in float64, so no float32 rounding of shift + deform
    shift = attnbench.create("local.shift_dwconv", dim=24, heads=3, kernel=kernel).eval()
    shift.load_state_dict({k: v for k, v in m.state_dict().items() if k != "merged"}, strict=True)
    with pytest.raises(AssertionError, match="differ in float64"):  # the learnable kernel did something
        assert_same_function(shift, m, x)


@pytest.mark.parametrize("kernel", [1, 3, 7])
def test_slide_with_zero_deform_is_shift_dwconv(kernel, rand):
    m = randomize_(attnbench.create("local.slide", dim=16, heads=2, kernel=kernel), seed=7).eval()
    with torch.no_grad():
        m.deform.zero_()
    shift = attnbench.create("local.shift_dwconv", dim=16, heads=2, kernel=kernel).eval()
    shift.load_state_dict({k: v for k, v in m.state_dict().items() if k != "deform"}, strict=True)
    x = torch.randn(2, 5, 8, 16, generator=rand)
    assert_same_function(m, shift, x)
    assert_same_function(to_float64(m).reparameterize(), shift, x)
    assert torch.count_nonzero(attnbench.create("local.slide", dim=16, heads=2, kernel=kernel).deform) == 0


def _locality_modules(kernel):
    for name in VARIANTS:
        yield name, randomize_(attnbench.create(name, dim=16, heads=2, kernel=kernel), seed=1).eval()
    yield "local.slide (merged)", randomize_(
        attnbench.create("local.slide", dim=16, heads=2, kernel=kernel), seed=1).reparameterize().eval()


@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("pos", [(0, 0), (4, 3), (8, 6)])
def test_locality(kernel, pos, rand):
    """Changing one token changes exactly the outputs with |di|, |dj| <= kernel // 2 from it."""
    H, W, r = 9, 7, kernel // 2
    x = torch.randn(2, H, W, 16, generator=rand)
    x2 = x.clone()
    x2[:, pos[0], pos[1]] = torch.randn(2, 16, generator=rand)
    ii, jj = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    window = ((ii - pos[0]).abs() <= r) & ((jj - pos[1]).abs() <= r)
    for name, m in _locality_modules(kernel):
        with torch.no_grad():
            changed = (m(x) - m(x2)).abs().amax(dim=-1)  # (B, H, W)
        assert (changed[:, ~window] == 0).all(), name
        assert (changed[:, window] > 0).all(), name


@pytest.mark.parametrize("name", VARIANTS)
def test_bad_parameters_raise(name):
    for kernel in (0, -1, 2, 4):
        with pytest.raises(ValueError, match="kernel"):
            attnbench.create(name, dim=16, heads=2, kernel=kernel)
    with pytest.raises(ValueError):
        attnbench.create(name, dim=30, heads=4)


@pytest.mark.parametrize("name", VARIANTS)
def test_meta_device_and_half_precision(name, rand):
    with torch.device("meta"):
        m = attnbench.create(name, dim=16, heads=2, kernel=3)
        if hasattr(m, "reparameterize"):
            m.reparameterize()
        assert m(torch.empty(2, 5, 4, 16, device="meta")).shape == (2, 5, 4, 16)
    m = randomize_(attnbench.create(name, dim=16, heads=2, kernel=3), seed=2).eval()
    x = torch.randn(2, 5, 4, 16, generator=rand)
    for dtype in (torch.bfloat16, torch.float16):  # within the dtype's rounding of the float64 function
        assert assert_low_precision_close(m, x, dtype).shape == (2, 5, 4, 16)


def test_slide_flops_follow_the_form():
    """Before reparameterize(): two convolutions counted; after: one; each equals both counters."""
    b, h, w, dim, heads, kernel = 2, 6, 5, 16, 2, 3
    m = attnbench.create("local.slide", dim=dim, heads=heads, kernel=kernel).eval()
    x = torch.randn(b, h, w, dim)
    counts = []
    for _ in range(2):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            m(x)
        analytic = m.flops_analytic(b, h, w)
        assert counter.get_total_flops() == analytic
        assert 2 * F.count_fvcore(m, x)["macs_fvcore_matmul"] == analytic
        counts.append(analytic)
        m.reparameterize()
    conv = 2 * (2 * b) * dim * kernel ** 2 * h * w * kernel ** 2
    assert counts[0] - counts[1] == conv
    im2col = attnbench.create("local.im2col", dim=dim, heads=heads, kernel=kernel)
    assert counts[1] == im2col.flops_analytic(b, h, w) + conv
    built = F.count_flops(lambda: attnbench.create("local.slide", dim=dim, heads=heads,
                                                   kernel=kernel).reparameterize(), (b, h, w, dim), torch.float32)
    assert built["flops_torch"] == counts[1]
