"""deform.dat and deform.msda against written-out references (float64), and their offsets at work.

The references below loop over queries, heads, keys and sampling points in plain Python and
interpolate by hand (4 neighbours, zeros outside the grid); they call neither grid_sample nor
convolution nor the modules' own methods, only read the modules' parameters.
"""

import math

import pytest
import torch

import attnbench
from conftest import randomize_
from equivalence import assert_close64, assert_same_function


def bilinear(img, py, px):
    """img (C, H, W) at pixel coordinates (py, px): the 4 neighbours weighted, zeros outside."""
    _, H, W = img.shape
    y0, x0 = math.floor(py), math.floor(px)
    out = img.new_zeros(img.shape[0])
    for yy in (y0, y0 + 1):
        for xx in (x0, x0 + 1):
            if 0 <= yy < H and 0 <= xx < W:
                out = out + (1 - abs(py - yy)) * (1 - abs(px - xx)) * img[:, yy, xx]
    return out


def corners_pixel(coord, size):
    """grid_sample's normalised coordinate -> pixel, align_corners=True (-1, 1: first and last pixel)."""
    return (coord + 1) / 2 * (size - 1)


def lin(layer, t):
    return t @ layer.weight.T + (0 if layer.bias is None else layer.bias)


def softmax(logits):
    e = [math.exp(v - max(logits)) for v in logits]
    return [v / sum(e) for v in e]


def dat_reference(m, x):
    """DAT's DAttentionBaseline, default rpe path, written out; x (B, H, W, C) float64."""
    B, H, W, C = x.shape
    g, h, k, s, f = m.groups, m.heads, m.kernel, m.stride, m.offset_range_factor
    cg, hg, d = C // g, h // g, C // h
    pad = k // 2 if k != s else 0
    hk, wk = (H + 2 * pad - k) // s + 1, (W + 2 * pad - k) // s + 1
    table_side = 2 * m.rpe_size - 1
    out = torch.zeros_like(x)
    for b in range(B):
        q = lin(m.proj_q, x[b])  # (H, W, C)
        positions = {}  # (group, key) -> (y, x), normalised
        sampled = x.new_zeros(hk * wk, C)
        for gi in range(g):
            ch = slice(gi * cg, (gi + 1) * cg)
            for i in range(hk):
                for j in range(wk):
                    acc = m.offset_dw.bias.clone()  # depthwise conv, the same for every group
                    for a in range(k):
                        for c in range(k):
                            yy, xx = i * s - pad + a, j * s - pad + c
                            if 0 <= yy < H and 0 <= xx < W:
                                acc = acc + m.offset_dw.weight[:, 0, a, c] * q[yy, xx, ch]
                    mu = acc.mean()
                    t = (acc - mu) / torch.sqrt(((acc - mu) ** 2).mean() + m.offset_norm.eps)
                    t = t * m.offset_norm.weight + m.offset_norm.bias
                    t = 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))  # exact GELU
                    dy, dx = (m.offset_out.weight @ t).tolist()
                    ry, rx = (i + 0.5) / (hk - 1) * 2 - 1, (j + 0.5) / (wk - 1) * 2 - 1
                    if f >= 0:
                        py, px = ry + math.tanh(dy) * f / (hk - 1), rx + math.tanh(dx) * f / (wk - 1)
                    else:
                        py, px = min(max(ry + dy, -1.0), 1.0), min(max(rx + dx, -1.0), 1.0)
                    positions[gi, i * wk + j] = (py, px)
                    img = x[b, :, :, ch].permute(2, 0, 1)
                    sampled[i * wk + j, ch] = bilinear(img, corners_pixel(py, H), corners_pixel(px, W))
        keys, values = lin(m.proj_k, sampled), lin(m.proj_v, sampled)
        for qi in range(H):
            for qj in range(W):
                qy, qx = qi / (H - 1) * 2 - 1, qj / (W - 1) * 2 - 1
                res = x.new_zeros(C)
                for head in range(h):
                    hs = slice(head * d, (head + 1) * d)
                    table = m.rpe_table[head][None]
                    logits = []
                    for key in range(hk * wk):
                        py, px = positions[head // hg, key]
                        bias = bilinear(table, corners_pixel((qy - py) / 2, table_side),
                                        corners_pixel((qx - px) / 2, table_side))
                        logits.append((q[qi, qj, hs] @ keys[key, hs]).item() / math.sqrt(d) + bias.item())
                    for key, a in enumerate(softmax(logits)):
                        res[hs] += a * values[key, hs]
                out[b, qi, qj] = lin(m.proj_out, res)
    return out


def msda_reference(m, x):
    """Deformable DETR's MSDeformAttn on one level, queries = tokens, written out; x (B, H, W, C) float64."""
    B, H, W, C = x.shape
    h, p = m.heads, m.points
    d = C // h
    out = torch.zeros_like(x)
    for b in range(B):
        value = lin(m.value_proj, x[b])
        for i in range(H):
            for j in range(W):
                off = lin(m.sampling_offsets, x[b, i, j]).reshape(h, p, 2)
                logits = lin(m.attention_weights, x[b, i, j]).reshape(h, p)
                res = x.new_zeros(C)
                for head in range(h):
                    hs = slice(head * d, (head + 1) * d)
                    img = value[:, :, hs].permute(2, 0, 1)
                    for pt, a in enumerate(softmax(logits[head].tolist())):
                        ox, oy = off[head, pt].tolist()
                        lx, ly = (j + 0.5) / W + ox / W, (i + 0.5) / H + oy / H  # in [0, 1]
                        res[hs] += a * bilinear(img, ly * H - 0.5, lx * W - 0.5)  # align_corners=False
                out[b, i, j] = lin(m.output_proj, res)
    return out


# (params, heads, dim, batch, H, W): stride 1 and a table larger than the grid (the defaults); the
# table at the grid's size (the reference exactly) with a grid divisible by the stride; kernel ==
# stride (no padding) on grids not divisible by it, clamped positions; stride 3 with 3 groups.
DAT_CASES = [
    ({}, 3, 12, 1, 5, 6),
    ({"groups": 2, "stride": 2, "kernel": 3, "rpe_size": 6}, 4, 16, 2, 6, 6),
    ({"groups": 1, "stride": 2, "kernel": 2, "offset_range_factor": -1.0, "rpe_size": 4}, 2, 8, 1, 7, 5),
    ({"groups": 3, "stride": 3, "kernel": 5, "offset_range_factor": 3.0, "rpe_size": 5, "qkv_bias": False},
     3, 12, 1, 8, 7),
]


@pytest.mark.parametrize("params,heads,dim,b,h,w", DAT_CASES)
def test_dat_equals_written_out_reference(params, heads, dim, b, h, w):
    m = randomize_(attnbench.create("deform.dat", dim=dim, heads=heads, **params), seed=h * w).eval()
    with torch.no_grad():
        m.offset_out.weight.mul_(4)  # offsets that reach well past the key cells (and the borders)
    assert m.supports(h, w) is None
    x = torch.randn(b, h, w, dim, generator=torch.Generator().manual_seed(dim))
    assert_same_function(m, m, x, call_b=dat_reference)


# (points, heads, dim, batch, H, W, offset scale): a few points, the reference's 4, one row
MSDA_CASES = [(4, 2, 16, 2, 5, 7, 4.0), (3, 3, 12, 1, 6, 6, 1.0), (2, 1, 8, 1, 1, 4, 1.0)]


@pytest.mark.parametrize("points,heads,dim,b,h,w,scale", MSDA_CASES)
def test_msda_equals_written_out_reference(points, heads, dim, b, h, w, scale):
    m = randomize_(attnbench.create("deform.msda", dim=dim, heads=heads, points=points), seed=h + w).eval()
    with torch.no_grad():
        m.sampling_offsets.weight.mul_(scale)
        m.sampling_offsets.bias.mul_(scale)
    x = torch.randn(b, h, w, dim, generator=torch.Generator().manual_seed(dim))
    assert_same_function(m, m, x, call_b=msda_reference)


def test_msda_starts_as_the_reference_initialises():
    """Point p of head m starts (p+1) pixels out along direction m (4 heads: +x, +y, -x, -y), uniform weights."""
    m = attnbench.create("deform.msda", dim=16, heads=4, points=3)
    bias = m.sampling_offsets.bias.reshape(4, 3, 2)
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    expected = directions[:, None, :] * torch.tensor([1.0, 2.0, 3.0])[None, :, None]
    assert torch.allclose(bias, expected, atol=1e-6)
    assert not m.sampling_offsets.weight.any() and not m.attention_weights.weight.any()


OFFSET_NET = {"deform.dat": ("offset_out", ["offset_dw.weight", "offset_norm.weight", "offset_out.weight"]),
              "deform.msda": ("sampling_offsets", ["sampling_offsets.weight", "sampling_offsets.bias"])}


@pytest.mark.parametrize("name", sorted(OFFSET_NET))
def test_offsets_change_the_output_and_get_gradients(name):
    last, trained = OFFSET_NET[name]
    m = randomize_(attnbench.create(name, dim=12, heads=3), seed=3).double()
    x = torch.randn(2, 7, 6, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = m(x)
    still = attnbench.create(name, dim=12, heads=3).double()
    still.load_state_dict(m.state_dict())
    with torch.no_grad():
        for p in getattr(still, last).parameters():
            p.zero_()  # every key / sampling point at its reference position
    y_still = still(x)
    assert (y - y_still).abs().max() > 1e-2 * y.abs().max(), "the offsets do not change the output"
    y.square().sum().backward()
    grads = dict(m.named_parameters())
    for pname in trained:
        g = grads[pname].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().max() > 0, pname


@pytest.mark.parametrize("name", sorted(OFFSET_NET))
def test_offset_gradients_match_finite_differences(name):
    """The gradient through the sampling positions (grid_sample's grid) is the function's own."""
    last = OFFSET_NET[name][0]
    m = randomize_(attnbench.create(name, dim=6, heads=3, **({"groups": 1} if name == "deform.dat" else {})),
                   seed=4).double()
    x = torch.randn(1, 4, 5, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    weight = getattr(m, last).weight

    def f(w):
        with torch.no_grad():
            weight.copy_(w)
        return m(x)

    w0 = weight.detach().clone()
    y0 = f(w0)
    loss_grad = torch.autograd.grad(m(x).mul(y0.detach()).sum(), weight)[0]
    for idx in [(0, 0), (1, 2), (weight.shape[0] - 1, weight.shape[1] - 1)]:
        e = torch.zeros_like(w0)
        e[idx] = 1e-6
        numeric = ((f(w0 + e) - f(w0 - e)) * y0).sum() / 2e-6
        f(w0)
        assert_close64(loss_grad[idx].reshape(1), numeric.reshape(1), tol=1e-5, what=f"d/d{last}{idx}")


def test_dat_supports_and_key_grid():
    m = attnbench.create("deform.dat", dim=12, heads=3, stride=4, kernel=4)
    assert m.key_grid(8, 13) == (2, 3)
    assert m.supports(8, 13) is None
    assert "key grid" in m.supports(7, 13)  # 1 x 3 keys: the reference divides by Hk - 1
    assert "2x2" in attnbench.create("deform.dat", dim=12, heads=3).supports(1, 9)
    assert attnbench.create("deform.msda", dim=12, heads=3).supports(1, 1) is None


@pytest.mark.parametrize("name,params,words", [
    ("deform.dat", {"groups": 2}, "groups"),
    ("deform.dat", {"stride": 0}, "stride"),
    ("deform.dat", {"kernel": 0}, "kernel"),
    ("deform.dat", {"rpe_size": 0}, "rpe_size"),
    ("deform.dat", {"offset_range_factor": math.inf}, "offset_range_factor"),
    ("deform.msda", {"points": 0}, "points"),
])
def test_bad_parameters_are_value_errors(name, params, words):
    with pytest.raises(ValueError, match=words):
        attnbench.create(name, dim=12, heads=3, **params)


def test_analytic_flops_terms():
    """The closed forms, term by term, at one shape (the counters agree with them in test_flops)."""
    b, h, w, c, heads = 2, 8, 6, 12, 3
    m = attnbench.create("deform.dat", dim=c, heads=heads, stride=2, kernel=3)
    n, nk = h * w, 4 * 3
    expected = b * (4 * n * c * c + 4 * nk * c * c + 2 * 9 * nk * c + 4 * nk * c + 8 * nk * c
                    + 8 * heads * n * nk + 4 * n * nk * c)
    assert m.flops_analytic(b, h, w) == expected
    p = 4
    m = attnbench.create("deform.msda", dim=c, heads=heads, points=p)
    assert m.flops_analytic(b, h, w) == b * n * (4 * c * c + 6 * c * heads * p + 10 * c * p)


class _Sample(torch.nn.Module):
    """Bilinear sampling of x (B, C, H, W) at points made from x, nothing else counted."""

    def forward(self, x):
        return torch.nn.functional.grid_sample(x, x[:, :2].permute(0, 2, 3, 1).tanh(), align_corners=False)


def test_grid_sample_is_counted_by_both_counters_on_meta():
    """4 MACs per sampled value (8 FLOPs), in torch's counter and fvcore's, forward and backward."""
    from attnbench.measure import flops as F

    b, c, h, w = 2, 5, 3, 4
    counted = F.count_flops(_Sample, (b, c, h, w), torch.float32, train=True)
    assert counted["count_message"] == "" and counted["fvcore_message"] == ""
    assert counted["flops_torch"] == 8 * b * c * h * w == 2 * counted["macs_fvcore_matmul"]
    assert counted["flops_torch_fwd_bwd"] == counted["flops_torch"] * (1 + 1 + 2)  # input grad + 2 coordinates
    assert F.fvcore_by_operator(_Sample(), torch.randn(b, c, h, w)) == {"grid_sampler": b * c * h * w * 4}
    with pytest.raises(NotImplementedError, match="interpolation mode 2"):
        F.grid_sample_macs((1, 2, 3, 3, 3), 2)  # no bicubic count for 5-D input: an error, not 0
