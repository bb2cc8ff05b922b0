"""local.neighborhood_naive and local.neighborhood: NAT / DiNAT neighbourhood attention (clamped dilated
windows, NATTEN's relative position bias), against a written-out loop reference and a dense masked one."""

import random

import pytest
import torch

import attnbench
from attnbench.impls.neighborhood import axis_tables
from attnbench.runner import run_suite
from conftest import make_suite, randomize_
from equivalence import assert_close64, assert_same_function, to_float64

FORMS = ["local.neighborhood_naive", "local.neighborhood"]


# --- NATTEN's index rules, written out as NATTEN states them (natten_cpu_commons.h) -----------------
# get_window_start and get_pb_start, checked term by term against SHI-Labs/NATTEN at commit 63606e6
# (natten/src/cpp/natten_cpu_commons.h, the 0.14 series with relative position bias; read through fetch).

def natten_window_start(i, length, kernel, dilation):
    r = kernel // 2
    if dilation <= 1:
        return max(i - r, 0) + (i + r >= length) * (length - i - r - 1)
    if i - r * dilation < 0:
        return i % dilation
    if i + r * dilation >= length:
        imodd = i % dilation
        a = (length // dilation) * dilation
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * r * dilation
        return a + imodd - kernel * dilation
    return i - r * dilation


def natten_pb_start(i, length, kernel, dilation):
    r = kernel // 2
    if dilation <= 1:
        return r + (i < r) * (r - i) + (i + r >= length) * (length - i - 1 - r)
    if i - r * dilation < 0:
        return kernel - 1 - i // dilation
    if i + r * dilation >= length:
        return (length - i - 1) // dilation
    return r


def window(i, length, kernel, dilation):
    """[(key position, bias index)] of query i along one axis: key a at start + a*d, bias pb_start + a."""
    s, pb = natten_window_start(i, length, kernel, dilation), natten_pb_start(i, length, kernel, dilation)
    return [(s + a * dilation, pb + a) for a in range(kernel)]


def loop_reference(m, x):
    """For each query (i, j), its kernel x kernel keys and biases from NATTEN's rules, softmax, weighted sum
    (vectorised over batch and heads only)."""
    B, H, W, C = x.shape
    h, d, k, dil = m.heads, C // m.heads, m.kernel, m.dilation
    q, kk, v = m.qkv(x).split(C, dim=-1)
    out = x.new_empty(B, H, W, C)
    for i in range(H):
        for j in range(W):
            logits, vals = [], []
            qi = q[:, i, j].reshape(B, h, d) * d ** -0.5
            for ki, bi in window(i, H, k, dil):
                for kj, bj in window(j, W, k, dil):
                    assert 0 <= ki < H and 0 <= kj < W and 0 <= bi < 2 * k - 1 and 0 <= bj < 2 * k - 1
                    logits.append((qi * kk[:, ki, kj].reshape(B, h, d)).sum(-1) + m.rpb[:, bi, bj])
                    vals.append(v[:, ki, kj].reshape(B, h, d))
            attn = torch.stack(logits, -1).softmax(-1)  # (B, h, K)
            out[:, i, j] = (attn.unsqueeze(-1) * torch.stack(vals, 2)).sum(2).reshape(B, C)
    return m.proj(out)


def dense_mask_and_bias(m, H, W):
    """(N, N) allowed pairs and (h, N, N) bias (-inf where not allowed), from NATTEN's rules."""
    N, k, dil = H * W, m.kernel, m.dilation
    allowed = torch.zeros(N, N, dtype=torch.bool)
    bias = torch.full((m.heads, N, N), float("-inf"), dtype=m.rpb.dtype)
    for i in range(H):
        for j in range(W):
            for ki, bi in window(i, H, k, dil):
                for kj, bj in window(j, W, k, dil):
                    allowed[i * W + j, ki * W + kj] = True
                    bias[:, i * W + j, ki * W + kj] = m.rpb[:, bi, bj]
    return allowed, bias


def dense_reference(m, x):
    B, H, W, C = x.shape
    h, d = m.heads, C // m.heads
    q, k, v = m.qkv(x.reshape(B, H * W, C)).reshape(B, H * W, 3, h, d).permute(2, 0, 3, 1, 4)
    _, bias = dense_mask_and_bias(m, H, W)
    attn = ((q * d ** -0.5) @ k.transpose(-2, -1) + bias).softmax(-1)
    return m.proj((attn @ v).transpose(1, 2).reshape(B, H, W, C))


def _cases(n, seed):
    """(kernel, dilation, heads, batch, height, width), grid sides from kernel*dilation up."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k, dil = rng.choice([3, 5, 7]), rng.choice([1, 2, 3])
        if k * dil > 15:
            dil = 1
        out.append((k, dil, rng.randint(1, 3), rng.randint(1, 2), k * dil + rng.randint(0, 4),
                    k * dil + rng.randint(0, 4)))
    return out


CASES = [  # kernel, dilation, heads, batch, height, width
    (3, 1, 1, 2, 3, 3),  # grid side == kernel
    (3, 1, 2, 1, 5, 8),
    (5, 1, 3, 2, 5, 9),  # one side == kernel
    (7, 1, 2, 1, 7, 7),  # the whole grid is every query's window
    (7, 1, 3, 1, 11, 9),
    (3, 2, 2, 2, 6, 7),  # one side == kernel * dilation
    (3, 3, 1, 1, 10, 9),  # 9 == kernel * dilation; 10 % 3 != 0: dilation groups of unequal length
    (5, 2, 3, 1, 11, 10),
    (3, 2, 1, 1, 13, 6),
] + _cases(6, seed=3)


def _pair(kernel, dilation, heads, seed=0):
    dim = 8 * heads
    naive = randomize_(attnbench.create(FORMS[0], dim=dim, heads=heads, kernel=kernel, dilation=dilation),
                       seed=seed).eval()
    fast = attnbench.create(FORMS[1], dim=dim, heads=heads, kernel=kernel, dilation=dilation).eval()
    fast.load_state_dict(naive.state_dict(), strict=True)
    return naive, fast


def test_index_rule_is_nattens():
    """The module's closed form (group clamp, bias = (key - query)/d + k - 1) equals NATTEN's formulas."""
    for kernel in (1, 3, 5, 7):
        for dil in (1, 2, 3, 4):
            for length in range(kernel * dil, kernel * dil + 12):
                keys, bias = axis_tables(length, kernel, dil)
                for i in range(length):
                    assert [(a, b) for a, b in zip(keys[i].tolist(), bias[i].tolist())] \
                        == window(i, length, kernel, dil), (kernel, dil, length, i)
                    assert bias[i, 0].item() + kernel // 2 == (keys[i, kernel // 2].item() - i) // dil + kernel - 1


@pytest.mark.parametrize("kernel,dilation,heads,batch,h,w", CASES)
def test_both_forms_equal_the_loop_reference(kernel, dilation, heads, batch, h, w):
    naive, fast = _pair(kernel, dilation, heads, seed=h * w)
    x = torch.randn(batch, h, w, 8 * heads, generator=torch.Generator().manual_seed(h + w))
    for m in (naive, fast):
        assert_same_function(m, naive, x, call_b=loop_reference)


@pytest.mark.parametrize("kernel,dilation,heads,batch,h,w", CASES[::2])
def test_both_forms_equal_dense_masked_attention(kernel, dilation, heads, batch, h, w):
    naive, fast = _pair(kernel, dilation, heads, seed=1)
    x = torch.randn(batch, h, w, 8 * heads, generator=torch.Generator().manual_seed(7))
    for m in (naive, fast):
        assert_same_function(m, naive, x, call_b=dense_reference)


def test_the_bias_matters():
    """A zero rpb gives another function (the reference is not passing by ignoring the bias)."""
    naive, _ = _pair(3, 2, 2)
    zero = to_float64(naive)
    with torch.no_grad():
        zero.rpb.zero_()
    x = torch.randn(1, 7, 8, 16, dtype=torch.float64)
    with torch.no_grad(), pytest.raises(AssertionError, match="differ in float64"):
        assert_close64(zero(x), to_float64(naive)(x))


@pytest.mark.parametrize("kernel,dilation,h,w", [(3, 1, 3, 5), (5, 1, 9, 6), (7, 1, 7, 12), (3, 2, 6, 9),
                                                 (3, 3, 10, 11), (5, 2, 13, 10)])
def test_every_query_has_exactly_kernel_squared_keys(kernel, dilation, h, w):
    m = attnbench.create(FORMS[0], dim=8, heads=1, kernel=kernel, dilation=dilation)
    allowed, _ = dense_mask_and_bias(m, h, w)
    kk = kernel * kernel
    assert (allowed.sum(1) == kk).all()  # corners and edges included
    keys, _ = m._index(h, w, "cpu")  # the naive form's table: kk distinct keys, the mask's
    assert keys.shape == (h * w, kk)
    for n in range(h * w):
        assert len(set(keys[n].tolist())) == kk
        assert set(keys[n].tolist()) == set(allowed[n].nonzero().flatten().tolist())
    fast = attnbench.create(FORMS[1], dim=8, heads=1, kernel=kernel, dilation=dilation)
    for axis, length in zip(fast._plan(h, w), (h, w)):  # the blocked form's mask: kernel keys per query per axis
        for g, lg, n, t, T, qrows, krows, bias in axis:
            assert ((bias >= 0).sum(1) == kernel).all()


@pytest.mark.parametrize("form", FORMS)
def test_locality(form):
    """Changing one token changes exactly the outputs of the queries whose windows contain it."""
    kernel, dil, h, w = 3, 2, 9, 8
    m = to_float64(randomize_(attnbench.create(form, dim=16, heads=2, kernel=kernel, dilation=dil), seed=3).eval())
    allowed, _ = dense_mask_and_bias(m, h, w)
    x = torch.randn(1, h, w, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = m(x)
        for p in [(0, 0), (4, 3), (8, 7), (1, 6)]:
            x2 = x.clone()
            x2[0, p[0], p[1]] += 1.0
            diff = (m(x2) - y).abs().amax(-1).reshape(h * w)
            touched = allowed[:, p[0] * w + p[1]]
            assert (diff[touched] > 1e-8).all(), p
            assert (diff[~touched] <= 1e-12 * y.abs().max()).all(), p


@pytest.mark.parametrize("form", FORMS)
def test_supports_needs_kernel_times_dilation(form):
    m = attnbench.create(form, dim=16, heads=2, kernel=5, dilation=2)
    assert m.supports(10, 10) is None and m.supports(10, 23) is None
    assert "kernel * dilation" in m.supports(9, 12) and m.supports(12, 9) is not None
    assert attnbench.create(form, dim=16, heads=2).supports(6, 14) is not None  # kernel 7
    with pytest.raises(ValueError, match="kernel \\* dilation"):
        m(torch.randn(1, 9, 12, 16))


def test_suite_records_too_small_grids_as_unsupported(tmp_path):
    entry = {"local.neighborhood": {"kernel": 5, "dilation": 2}}
    res = run_suite(make_suite([entry, "local.neighborhood_naive"], resolution=(16, 40), patch=4),
                    out=tmp_path / "r", progress=False)
    st = {(r["impl"], r["resolution"]): r["status"] for r in res.rows}
    assert st == {("local.neighborhood", 16): "unsupported", ("local.neighborhood", 40): "ok",
                  ("local.neighborhood_naive", 16): "unsupported", ("local.neighborhood_naive", 40): "ok"}, st
    assert all("kernel * dilation" in r["message"] for r in res.rows if r["status"] == "unsupported")


def test_state_dict_layout_is_shared():
    naive, fast = _pair(5, 2, 3, seed=4)
    assert list(naive.state_dict()) == list(fast.state_dict())
    assert sorted(naive.state_dict()) == ["proj.bias", "proj.weight", "qkv.bias", "qkv.weight", "rpb"]
    assert naive.state_dict()["rpb"].shape == (3, 9, 9)
    back = attnbench.create(FORMS[0], dim=24, heads=3, kernel=5, dilation=2).eval()
    back.load_state_dict(randomize_(fast, seed=9).state_dict(), strict=True)  # fast -> naive
    x = torch.randn(2, 11, 12, 24, generator=torch.Generator().manual_seed(1))
    assert_same_function(fast, back, x)


def test_flops_conventions():
    """Naive: exactly kernel^2 keys per query. Blocked: the pairs it computes; flops_useful is the naive count."""
    for k, dil, h, w in [(7, 1, 56, 56), (3, 2, 13, 9), (5, 1, 5, 17)]:
        naive = attnbench.create(FORMS[0], dim=96, heads=3, kernel=k, dilation=dil)
        fast = attnbench.create(FORMS[1], dim=96, heads=3, kernel=k, dilation=dil)
        lin = 2 * h * w * 96 * 96 * 4
        assert naive.flops_analytic(2, h, w) == naive.flops_useful(2, h, w) == 2 * (lin + 4 * h * w * k * k * 96)
        assert fast.flops_useful(2, h, w) == naive.flops_analytic(2, h, w)
        assert fast.flops_analytic(2, h, w) == 2 * (lin + 4 * 96 * fast.computed_pairs(h, w))
        assert fast.computed_pairs(h, w) >= h * w * k * k
