"""One dense reference for every sparse attention pattern: ordinary softmax attention over a boolean
mask of the allowed (query, key) pairs, in float64.

:func:`dense_attention` is the only attention here. Per algorithm, a builder (:data:`BUILDERS`) takes a
module and an input and returns a :class:`Pattern`: the query, key and value vectors from the module's
own weights, the (Nq, Nk) mask of allowed pairs (per head where the heads differ), an additive bias
and the step from the attention output to the module's output (proj, crop, LePE, residual). Each mask
is written from the pattern's definition in its paper, with no call into the implementation's own
partition or index code:

- ``swin.window``: the grid zero-padded at bottom/right to multiples of M; (p, p') allowed iff
  row // M and col // M agree; bias = the table entry of the offset (dr, dc).
- ``swin.shift``: Swin's cyclic shift: positions rolled by -s on the padded grid, regular windows
  there, and pairs of one window allowed only within one region (rows not wrapped / wrapped, the same
  for columns); same bias by offset. (That is windows offset by s: :func:`test_cyclic_regions_are_offset_windows`.)
- ``local``: the kernel x kernel neighbourhood, |dr| <= k//2 and |dc| <= k//2; a neighbour outside the
  image is a zero key/value vector that still takes part: K extra zero keys, key j allowed for a query
  whose neighbour j is outside.
- ``local.slide``: the same neighbourhood, but neighbour slot j of a query is the learned mix
  sum_o (onehot + deform)[c, j, o] k_c(p + o) of its kernel window (Slide-Transformer's deformed
  shifting): the keys are the N*K slots, each allowed for its own query only.
- ``local.neighborhood``: NAT/DiNAT: per axis, the k members of the query's dilation group nearest to
  it, the window shifted inward at the borders; bias rpb[(key - query)/d + k - 1] per axis.
- ``cswin.cross``: the first half of the heads allowed within a horizontal stripe (row // s), the second
  within a vertical one (col // s), grid zero-padded to multiples of s; LePE (3x3 depthwise conv of V
  inside the stripe) added after attention.
- ``mvit.window``: MViTv2 pooled Q, K, V (the module's pooling ops, whole grid); query (i, j) of the
  pooled query grid allowed with key (i', j') of the zero-padded pooled key grid iff
  i // Mq == i' // Mk and j // Mq == j' // Mk; bias = MViTv2's decomposed relative position terms.

Every registered implementation whose ``algorithm`` is in the table is checked (read from the registry,
so a new form of one of these algorithms is covered when it is registered), in its training and its
reparameterized form, on fixed and random grids, divisible and not.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import attnbench
from attnbench import registry
from conftest import randomize_
from equivalence import assert_close64, assert_same_function


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                    bias: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """softmax over the allowed keys of (q k^T * scale + bias), times v.

    q (B, h, Nq, d), k and v (B, h, Nk, d); ``allowed`` (bool) and ``bias`` broadcast to (B, h, Nq, Nk);
    ``scale`` defaults to d^-0.5. Every query must have at least one allowed key.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q @ k.transpose(-2, -1)) * scale
    if bias is not None:
        logits = logits + bias
    allowed = allowed.expand_as(logits)
    assert allowed.any(-1).all(), "a query with no allowed key"
    return logits.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@dataclass
class Pattern:
    q: torch.Tensor  # (B, h, Nq, d)
    k: torch.Tensor  # (B, h, Nk, d)
    v: torch.Tensor  # (B, h, Nk, d)
    allowed: torch.Tensor  # bool, broadcast to (B, h, Nq, Nk)
    bias: torch.Tensor | None  # broadcast to (B, h, Nq, Nk)
    finish: Callable[[torch.Tensor], torch.Tensor]  # attention output (B, h, Nq, d) -> module output


def reference(algorithm: str, m, x: torch.Tensor, **geometry) -> torch.Tensor:
    """The module's function computed by :func:`dense_attention` on its algorithm's pattern."""
    p = BUILDERS[algorithm](m, x, **geometry)
    return p.finish(dense_attention(p.q, p.k, p.v, p.allowed, p.bias))


# --- shared pieces -----------------------------------------------------------------------------------

def grid(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of each token of a height x width grid, row-major, each (height*width,)."""
    return (torch.arange(height).repeat_interleave(width), torch.arange(width).repeat(height))


def zero_pad(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """x (B, H, W, C) zero-padded at bottom/right to multiples of ``multiple``."""
    B, H, W, C = x.shape
    out = x.new_zeros(B, -(-H // multiple) * multiple, -(-W // multiple) * multiple, C)
    out[:, :H, :W] = x
    return out


def heads_of(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, heads, N, C / heads)."""
    B, N, C = t.shape
    return t.reshape(B, N, heads, C // heads).transpose(1, 2)


def qkv_heads(m, x: torch.Tensor):
    """x (B, H, W, C) -> q, k, v (B, h, H*W, d) from the module's ``qkv`` Linear(C, 3C)."""
    B, H, W, C = x.shape
    q, k, v = m.qkv(x.reshape(B, H * W, C)).split(C, dim=-1)
    return heads_of(q, m.heads), heads_of(k, m.heads), heads_of(v, m.heads)


def merge_heads(out: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h, height*width, d) -> (B, height, width, h*d)."""
    B, h, _, d = out.shape
    return out.transpose(1, 2).reshape(B, height, width, h * d)


def offset_bias(table: torch.Tensor, dr: torch.Tensor, dc: torch.Tensor, span: int) -> torch.Tensor:
    """Swin's relative position bias: ``table`` ((2*span - 1)^2, h) looked up at offsets (dr, dc), -> (h, ...);
    0 for an offset outside the table (possible only with a deliberately wrong mask)."""
    inside = (dr.abs() < span) & (dc.abs() < span)
    idx = ((dr + span - 1) * (2 * span - 1) + dc + span - 1).clamp(0, table.shape[0] - 1)
    return torch.where(inside, table[idx].movedim(-1, 0), 0.0)


# --- swin.window, swin.shift ---------------------------------------------------------------------------

def swin_pattern(m, x, window=None, shift=None):
    """W-MSA (shift 0) or SW-MSA by Swin's cyclic shift and region mask, on the zero-padded grid."""
    H, W = x.shape[1:3]
    M = m.window if window is None else window
    s = getattr(m, "shift", 0) if shift is None else shift
    xp = zero_pad(x, M)
    Hp, Wp = xp.shape[1:3]
    q, k, v = qkv_heads(m, xp)
    r, c = grid(Hp, Wp)

    def window_and_region(pos, length):  # after the roll by -s: the regular window, and which piece of it
        rolled = (pos - s) % length
        region = (rolled >= length - M).long() + (rolled >= length - s).long() if s else torch.zeros_like(pos)
        return rolled // M, region

    (wr, gr), (wc, gc) = window_and_region(r, Hp), window_and_region(c, Wp)
    def same(t):
        return t[:, None] == t[None, :]

    allowed = same(wr) & same(gr) & same(wc) & same(gc)
    bias = offset_bias(m.relative_position_bias_table, r[:, None] - r[None, :], c[:, None] - c[None, :], m.window)
    return Pattern(q, k, v, allowed, bias, lambda out: m.proj(merge_heads(out, Hp, Wp))[:, :H, :W])


def swin_window_pattern(m, x, window=None):
    return swin_pattern(m, x, window=window, shift=0)


# --- local (zero-padded neighbourhoods), local.slide ------------------------------------------------

def kernel_offsets(kernel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dr, dc) of the kernel x kernel neighbours, row-major, each (kernel^2,)."""
    r = kernel // 2
    return grid(kernel, kernel)[0] - r, grid(kernel, kernel)[1] - r


def local_pattern(m, x, kernel=None):
    """Each query's kernel x kernel neighbourhood; a neighbour outside the image is a zero key and value
    that takes part: K zero keys after the H*W real ones, zero key j allowed where neighbour j is outside."""
    B, H, W = x.shape[:3]
    kernel = m.kernel if kernel is None else kernel
    q, k, v = qkv_heads(m, x)
    r, c = grid(H, W)
    dr, dc = kernel_offsets(kernel)
    near = ((r[:, None] - r[None, :]).abs() <= kernel // 2) & ((c[:, None] - c[None, :]).abs() <= kernel // 2)
    nr, nc = r[:, None] + dr[None, :], c[:, None] + dc[None, :]  # (N, K) neighbour positions
    outside = (nr < 0) | (nr >= H) | (nc < 0) | (nc >= W)
    zeros = k.new_zeros(B, m.heads, kernel * kernel, k.shape[-1])
    return Pattern(q, torch.cat([k, zeros], 2), torch.cat([v, zeros], 2), torch.cat([near, outside], 1), None,
                   lambda out: m.proj(merge_heads(out, H, W)))


def slide_pattern(m, x, learned=True):
    """Slide-Transformer's deformed shifting: neighbour slot j of a query at p is, per channel c,
    sum over kernel offsets o of (onehot_j + deform)[c, j, o] * k_c(p + o) (zero outside the image), the
    same for v; the N*K slots are the keys, each allowed for its own query only. ``learned=False``
    leaves ``deform`` out (plain shifting: the function of ``local``)."""
    B, H, W, C = x.shape
    kernel = m.kernel
    K, rad = kernel * kernel, kernel // 2
    sd = m.state_dict()
    onehot = torch.eye(K, dtype=x.dtype).reshape(1, K, K).repeat(C, 1, 1).reshape(C * K, 1, kernel, kernel)
    if not learned:
        weights = onehot
    elif "merged" in sd:  # reparameterized: one convolution, merged = onehot + deform
        weights = sd["merged"]
    else:
        weights = onehot + sd["deform"]
    weights = weights.reshape(C, K, K)  # (channel, slot j, offset o row-major)
    q, k, v = m.qkv(x).split(C, dim=-1)  # (B, H, W, C)
    dr, dc = kernel_offsets(kernel)

    def slots(t):  # (B, H, W, C) -> (B, h, N*K, d): query p's slots at rows p*K .. p*K + K - 1
        padded = F.pad(t, (0, 0, rad, rad, rad, rad))
        out = t.new_zeros(B, H, W, K, C)
        for o in range(K):
            moved = padded[:, rad + dr[o]:rad + dr[o] + H, rad + dc[o]:rad + dc[o] + W]  # t at p + o
            out = out + moved[:, :, :, None, :] * weights[:, :, o].t()  # (K, C) per slot
        return heads_of(out.reshape(B, H * W * K, C), m.heads)

    allowed = torch.arange(H * W)[:, None] == torch.arange(H * W * K)[None, :] // K
    return Pattern(heads_of(q.reshape(B, H * W, C), m.heads), slots(k), slots(v), allowed, None,
                   lambda out: m.proj(merge_heads(out, H, W)))


# --- local.neighborhood (NAT / DiNAT) ------------------------------------------------------------------

def nat_axis(length: int, kernel: int, dilation: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(length, length) allowed and bias index along one axis: query i's window is the ``kernel``
    members of its dilation group (positions = i mod d) nearest to it, moved inward at the borders so it
    always holds ``kernel`` of them; a key's bias index is its offset from the query in dilated steps
    plus kernel - 1."""
    allowed = torch.zeros(length, length, dtype=torch.bool)
    for i in range(length):
        group = list(range(i % dilation, length, dilation))
        n = group.index(i)
        start = min(max(n - kernel // 2, 0), len(group) - kernel)
        allowed[i, group[start:start + kernel]] = True
    pos = torch.arange(length)
    index = torch.div(pos[None, :] - pos[:, None], dilation, rounding_mode="floor") + kernel - 1
    return allowed, index.clamp(0, 2 * kernel - 2)


def neighborhood_pattern(m, x, kernel=None, dilation=None):
    H, W = x.shape[1:3]
    kernel = m.kernel if kernel is None else kernel
    dilation = m.dilation if dilation is None else dilation
    q, k, v = qkv_heads(m, x)
    r, c = grid(H, W)
    (ar, ir), (ac, ic) = nat_axis(H, kernel, dilation), nat_axis(W, kernel, dilation)
    allowed = ar[r][:, r] & ac[c][:, c]
    rpb = m.rpb  # (h, 2k'-1, 2k'-1), k' the module's kernel
    span = rpb.shape[-1]
    bias = rpb[:, ir[r][:, r].clamp(max=span - 1), ic[c][:, c].clamp(max=span - 1)]  # (h, N, N)
    return Pattern(q, k, v, allowed, bias, lambda out: m.proj(merge_heads(out, H, W)))


# --- cswin.cross ----------------------------------------------------------------------------------------

def cswin_pattern(m, x, stripe=None):
    """Heads of the first channel half within horizontal stripes (stripe rows, full width), of the second
    within vertical stripes, on the grid zero-padded to multiples of the stripe; then LePE: a 3x3
    depthwise conv of V inside each stripe (a neighbour across the stripe's border counts as zero)."""
    H, W, C = x.shape[1:]
    s = m.stripe if stripe is None else stripe
    xp = zero_pad(x, s)
    Hp, Wp = xp.shape[1:3]
    q, k, v = qkv_heads(m, xp)
    r, c = grid(Hp, Wp)
    h = m.heads
    same_rows = (r[:, None] // s) == (r[None, :] // s)
    same_cols = (c[:, None] // s) == (c[None, :] // s)
    allowed = torch.stack([same_rows] * (h // 2) + [same_cols] * (h // 2))  # (h, N, N)
    sd = m.state_dict()
    v_img = m.qkv(xp)[..., 2 * C:]  # (B, Hp, Wp, C)

    def lepe(vh, weight, b, stripe_of):  # vh (B, Hp, Wp, C/2); stripe_of: position -> stripe label
        out = b.expand_as(vh).clone()
        padded = F.pad(vh, (0, 0, 1, 1, 1, 1))
        for a in (-1, 0, 1):
            for e in (-1, 0, 1):
                rr, cc = r + a, c + e
                inside = (rr >= 0) & (rr < Hp) & (cc >= 0) & (cc < Wp)
                same = stripe_of(rr.clamp(0, Hp - 1), cc.clamp(0, Wp - 1)) == stripe_of(r, c)
                ok = (inside & same).reshape(Hp, Wp)
                moved = padded[:, 1 + a:1 + a + Hp, 1 + e:1 + e + Wp]
                out = out + moved * weight[:, 0, a + 1, e + 1] * ok[None, :, :, None]
        return out

    half = C // 2
    lepe_h = lepe(v_img[..., :half], sd["lepe_h.weight"], sd["lepe_h.bias"], lambda rr, cc: rr // s)
    lepe_v = lepe(v_img[..., half:], sd["lepe_v.weight"], sd["lepe_v.bias"], lambda rr, cc: cc // s)

    def finish(out):
        return m.proj(merge_heads(out, Hp, Wp) + torch.cat([lepe_h, lepe_v], -1))[:, :H, :W]

    return Pattern(q, k, v, allowed, None, finish)


# --- mvit.window -----------------------------------------------------------------------------------------

def mvit_rel_table(table: torch.Tensor, length: int) -> torch.Tensor:
    """MViTv2: the (L, d) table linearly interpolated (half-pixel centres) to ``length`` entries."""
    if table.shape[0] == length:
        return table
    return F.interpolate(table.t()[None], size=length, mode="linear")[0].t()


def mvit_rel_index(q_pos: torch.Tensor, k_pos: torch.Tensor, q_len: int, k_len: int) -> torch.Tensor:
    """MViTv2's index of (query position, key position) inside a q_len / k_len window: both scaled to the
    finer grid, their difference shifted so the smallest is 0."""
    q_scale, k_scale = max(k_len / q_len, 1.0), max(q_len / k_len, 1.0)
    return (q_pos[:, None] * q_scale - k_pos[None, :] * k_scale + (k_len - 1) * k_scale).long()


def mvit_window_pattern(m, x, window=None):
    B, H, W, C = x.shape
    M = m.window if window is None else window
    h, d = m.heads, C // m.heads
    q, k, v = (t.reshape(B, h, H, W, d) for t in qkv_heads(m, x))

    def pool(t, op, norm):  # the module's own pooling over the whole grid
        if op is not None:
            t = op(t.reshape(B * h, H, W, d).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            t = t.reshape(B, h, *t.shape[1:])
        return norm(t) if norm is not None else t

    q, k, v = pool(q, m.pool_q, m.norm_q), pool(k, m.pool_k, m.norm_k), pool(v, m.pool_v, m.norm_v)
    mq, mk = M // m.stride_q, M // m.stride_kv
    (qh, qw), (kh, kw) = q.shape[2:4], k.shape[2:4]
    khp, kwp = -(-kh // mk) * mk, -(-kw // mk) * mk  # the key grid padded with zero vectors
    kp, vp = (F.pad(t, (0, 0, 0, kwp - kw, 0, khp - kh)) for t in (k, v))
    qr, qc = grid(qh, qw)
    kr, kc = grid(khp, kwp)
    allowed = ((qr[:, None] // mq) == (kr[None, :] // mk)) & ((qc[:, None] // mq) == (kc[None, :] // mk))
    q = q.reshape(B, h, qh * qw, d)
    bias = None
    if m.rel_pos:
        length = 2 * max(mq, mk) - 1
        rh = mvit_rel_table(m.rel_pos_h, length)[mvit_rel_index(qr % mq, kr % mk, mq, mk)]  # (Nq, Nk, d)
        rw = mvit_rel_table(m.rel_pos_w, length)[mvit_rel_index(qc % mq, kc % mk, mq, mk)]
        bias = torch.einsum("bhnd,nkd->bhnk", q, rh + rw)

    def finish(out):
        if m.residual_pooling:
            out = out + q
        return m.proj(merge_heads(out, qh, qw))

    return Pattern(q, kp.reshape(B, h, khp * kwp, d), vp.reshape(B, h, khp * kwp, d), allowed, bias, finish)


BUILDERS = {
    "swin.window": swin_window_pattern,
    "swin.shift": swin_pattern,
    "local": local_pattern,
    "local.slide": slide_pattern,
    "local.neighborhood": neighborhood_pattern,
    "cswin.cross": cswin_pattern,
    "mvit.window": mvit_window_pattern,
}
SPARSE_FAMILIES = ("swin", "local", "cswin")

# algorithm -> (params, heads, batch, height, width): fixed cases, divisible and not, plus random ones
FIXED = {
    "swin.window": [({"window": 4}, 2, 2, 8, 12), ({"window": 3}, 3, 1, 7, 10), ({"window": 5}, 1, 1, 4, 6)],
    "swin.shift": [({"window": 4, "shift": 2}, 2, 2, 8, 8), ({"window": 4, "shift": 1}, 3, 1, 9, 7),
                   ({"window": 3}, 2, 1, 5, 10), ({"window": 5, "shift": 3}, 1, 1, 4, 4)],
    "local": [({"kernel": 3}, 2, 2, 6, 7), ({"kernel": 5}, 1, 1, 4, 9), ({"kernel": 3}, 3, 1, 1, 5)],
    "local.slide": [({"kernel": 3}, 2, 2, 6, 7), ({"kernel": 5}, 1, 1, 5, 4)],
    "local.neighborhood": [({"kernel": 3, "dilation": 1}, 2, 1, 7, 9), ({"kernel": 3, "dilation": 2}, 2, 2, 6, 11),
                           ({"kernel": 5, "dilation": 1}, 1, 1, 5, 8), ({"kernel": 3, "dilation": 3}, 3, 1, 10, 9)],
    "cswin.cross": [({"stripe": 2}, 2, 2, 6, 7), ({"stripe": 3}, 4, 1, 9, 6), ({"stripe": 4}, 2, 1, 3, 5)],
    "mvit.window": [({"window": 4, "stride_kv": 2, "rel_pos_size": 16}, 2, 2, 9, 13),
                    ({"window": 8, "stride_q": 2, "stride_kv": 4, "rel_pos_size": 16}, 2, 1, 16, 12),
                    ({"window": 3, "kernel": 1, "stride_kv": 1, "rel_pos_size": 8}, 1, 1, 7, 5),
                    ({"window": 4, "pool": "avg", "stride_kv": 4}, 3, 1, 6, 10)],
}


def _random_case(algorithm: str, rng: random.Random):
    heads = rng.choice([2, 4]) if algorithm == "cswin.cross" else rng.choice([1, 2, 3])
    h, w = rng.randint(3, 13), rng.randint(3, 13)
    if algorithm == "swin.window":
        params = {"window": rng.randint(2, 5)}
    elif algorithm == "swin.shift":
        window = rng.randint(2, 5)
        params = {"window": window, "shift": rng.randint(1, window - 1)}
    elif algorithm in ("local", "local.slide"):
        params = {"kernel": rng.choice([3, 5])}
    elif algorithm == "local.neighborhood":
        kernel, dilation = rng.choice([3, 5]), rng.choice([1, 2])
        params = {"kernel": kernel, "dilation": dilation}
        h, w = max(h, kernel * dilation), max(w, kernel * dilation)
    elif algorithm == "cswin.cross":
        params = {"stripe": rng.randint(1, 4)}
    else:
        stride_kv = rng.choice([1, 2])
        params = {"window": stride_kv * rng.randint(2, 3), "stride_kv": stride_kv, "rel_pos_size": 16,
                  "kernel": rng.choice([1, 3])}
    return params, heads, rng.randint(1, 2), h, w


def cases(algorithm: str):
    rng = random.Random(algorithm)
    return FIXED[algorithm] + [_random_case(algorithm, rng)]


def _builtin(spec) -> bool:
    return spec.cls.__module__.startswith("attnbench.impls.")


IMPLS = sorted(name for name, spec in registry.specs().items() if spec.algorithm in BUILDERS)
CHECKS = [(name, i) for name in IMPLS for i in range(len(cases(registry.get_spec(name).algorithm)))]


def _build(name, params, heads, seed=0):
    m = attnbench.create(name, dim=8 * heads, heads=heads, **params)
    return randomize_(m, seed=seed).eval()


@pytest.mark.parametrize("name,case", CHECKS, ids=[f"{n}-{i}" for n, i in CHECKS])
def test_equals_dense_masked_attention(name, case):
    spec = registry.get_spec(name)
    params, heads, batch, h, w = cases(spec.algorithm)[case]
    m = _build(name, params, heads, seed=case)
    reason = m.supports(h, w) if spec.has("supports") else None
    assert reason is None, reason  # the cases are chosen to fit every form
    x = torch.randn(batch, h, w, 8 * heads, generator=torch.Generator().manual_seed(case))
    forms = [m]
    if spec.has("reparameterize"):
        merged = randomize_(_build(name, params, heads), seed=case)
        forms.append(merged.reparameterize() or merged)
    for form in forms:
        y, _ = assert_same_function(form, form, x, call_b=lambda mod, xx: reference(spec.algorithm, mod, xx))
        assert y.shape[0] == batch and y.shape[-1] == 8 * heads


def test_table_covers_every_sparse_form():
    """Every built-in implementation of the sparse families (and mvit.window) has a dense reference."""
    missing = {name: spec.algorithm for name, spec in registry.specs().items()
               if _builtin(spec) and (spec.family in SPARSE_FAMILIES or spec.name == "mvit.window")
               and spec.algorithm not in BUILDERS}
    assert not missing, f"no dense reference for {missing}: add the pattern to BUILDERS"
    assert set(BUILDERS) == {spec.algorithm for spec in registry.specs().values() if spec.algorithm in BUILDERS}
    assert set(FIXED) == set(BUILDERS)
    assert {"swin.window", "swin.shift_pad", "swin.shift_cyclic", "local.im2col", "local.shift_dwconv",
            "local.slide", "local.neighborhood_naive", "local.neighborhood", "cswin.cross", "mvit.window"} <= set(IMPLS)


WRONG = [  # (implementation, its params, the reference's wrong geometry, heads, height, width)
    ("swin.window", {"window": 4}, {"window": 5}, 2, 10, 10),
    ("swin.window", {"window": 4}, {"window": 3}, 2, 12, 12),
    ("swin.shift_pad", {"window": 4, "shift": 2}, {"shift": 1}, 2, 8, 8),
    ("swin.shift_cyclic", {"window": 4, "shift": 2}, {"shift": 0}, 2, 8, 8),  # plain windows
    ("local.im2col", {"kernel": 3}, {"kernel": 5}, 2, 7, 7),
    ("local.slide", {"kernel": 3}, {"learned": False}, 2, 7, 7),  # the learned shifts left out
    ("local.neighborhood", {"kernel": 3, "dilation": 2}, {"dilation": 1}, 2, 9, 8),
    ("local.neighborhood_naive", {"kernel": 5}, {"kernel": 3}, 2, 9, 8),
    ("cswin.cross", {"stripe": 2}, {"stripe": 3}, 2, 6, 6),
    ("mvit.window", {"window": 4, "stride_kv": 2, "rel_pos_size": 16}, {"window": 6}, 2, 12, 12),
]


@pytest.mark.parametrize("name,params,wrong,heads,h,w", WRONG, ids=[f"{w[0]}-{i}" for i, w in enumerate(WRONG)])
def test_a_wrong_mask_is_caught(name, params, wrong, heads, h, w):
    """The reference with another pattern parameter (a window of M+1, ...) does not match: the masks are
    what the comparison checks."""
    algorithm = registry.get_spec(name).algorithm
    m = _build(name, params, heads, seed=2)
    x = torch.randn(1, h, w, 8 * heads, generator=torch.Generator().manual_seed(3))
    assert_same_function(m, m, x, call_b=lambda mod, xx: reference(algorithm, mod, xx))
    with pytest.raises(AssertionError, match="differ in float64"):
        assert_same_function(m, m, x, call_b=lambda mod, xx: reference(algorithm, mod, xx, **wrong))


@pytest.mark.parametrize("window", [2, 3, 4, 7])
def test_cyclic_regions_are_offset_windows(window):
    """Swin's cyclic shift with its region mask = windows whose boundaries sit at shift + multiples of M
    (what swin.shift_pad cuts, padding M - shift at the top): one algorithm, on every padded length."""
    for shift in range(1, window):
        for length in range(window, 4 * window + 1, window):
            pos = torch.arange(length)
            rolled = (pos - shift) % length
            cyclic = (rolled // window) * 3 + (rolled >= length - window).long() + (rolled >= length - shift).long()
            offset = torch.div(pos - shift, window, rounding_mode="floor")
            assert torch.equal(cyclic[:, None] == cyclic[None, :], offset[:, None] == offset[None, :])


def test_pattern_sizes():
    """Keys per query, as each paper counts them."""
    m = _build("swin.window", {"window": 3}, 1)
    assert (swin_window_pattern(m, torch.zeros(1, 6, 9, 8)).allowed.sum(-1) == 9).all()
    m = _build("local.im2col", {"kernel": 5}, 1)
    assert (local_pattern(m, torch.zeros(1, 4, 7, 8)).allowed.sum(-1) == 25).all()  # real + zero keys
    for kernel, dil, h, w in [(3, 1, 3, 5), (3, 2, 7, 9), (5, 2, 10, 11)]:
        m = _build("local.neighborhood_naive", {"kernel": kernel, "dilation": dil}, 1)
        assert (neighborhood_pattern(m, torch.zeros(1, h, w, 8)).allowed.sum(-1) == kernel ** 2).all()
    m = _build("cswin.cross", {"stripe": 2}, 2)
    a = cswin_pattern(m, torch.zeros(1, 4, 6, 16)).allowed
    assert (a[0].sum(-1) == 2 * 6).all() and (a[1].sum(-1) == 4 * 2).all()
    m = _build("mvit.window", {"window": 4, "stride_kv": 2, "kernel": 1}, 1)
    assert (mvit_window_pattern(m, torch.zeros(1, 5, 6, 8)).allowed.sum(-1) == 4).all()


def test_dense_attention_is_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    all_keys = torch.ones(5, 5, dtype=torch.bool)
    assert_close64(dense_attention(q, k, v, all_keys), F.scaled_dot_product_attention(q, k, v))
    first_two = torch.zeros(5, 5, dtype=torch.bool)
    first_two[:, :2] = True
    assert_close64(dense_attention(q, k, v, first_two), F.scaled_dot_product_attention(q, k[:, :, :2], v[:, :, :2]))
    with pytest.raises(AssertionError, match="no allowed key"):
        dense_attention(q, k, v, torch.zeros(5, 5, dtype=torch.bool))
    assert math.isclose(dense_attention(q, k, v, all_keys, scale=0.0)[0, 0, 0, 0].item(), v[0, 0, :, 0].mean().item())
