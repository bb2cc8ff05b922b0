"""Neighbourhood attention (NAT, Hassani et al., CVPR 2023) with dilation (DiNAT, Hassani & Shi, 2022).

Each query (i, j) attends to exactly kernel x kernel keys (K = kernel^2), with a learnable relative
position bias. Layout: ``qkv`` Linear(C, 3C), ``rpb`` (heads, 2*kernel-1, 2*kernel-1) (zeros at init,
as in NAT) and ``proj`` Linear(C, C); both registered forms have this one state_dict layout.

The window (per axis, rows and columns alike; L = grid side, k = kernel, d = dilation, r = k // 2):
positions are split into d dilation groups by ``g = i mod d``; group g holds ``g, g+d, g+2d, ...``
(``Lg = len(range(g, L, d))`` of them) and query i is number ``ig = i // d`` in its group. Its window
is the k consecutive group members starting at ``s = min(max(ig - r, 0), Lg - k)``: centred on the
query, CLAMPED inside the image at the borders (shifted, never zero-padded). Key a (0 <= a < k) of
the window is position ``g + (s + a) * d``. This needs Lg >= k in every group, i.e. k * d <= L
(``supports`` gives a reason otherwise).

Relative position bias (the NATTEN rule): key a of query i's window takes, on this axis, the table
index ``pb_start(i) + a`` with NATTEN's ``get_pb_start``:
``r + (i < r) * (r - i) + (i + r >= L) * (L - i - 1 - r)`` for d = 1 and, for d > 1,
``k - 1 - i // d`` when ``i - r*d < 0``, ``(L - i - 1) // d`` when ``i + r*d >= L``, else ``r``
(NATTEN ``natten/csrc/include/natten/cpu/naive/natten_cpu_commons.h`` ``get_pb_start`` /
``get_window_start``, used by its CPU reference kernels ``pointwise_neighborhood_2d`` with rpb, as
NAT's original ``natten2dqkrpb`` does). Written in group coordinates that is exactly
``index = (key_g - ig) + k - 1 = (key - query) / d + k - 1``: the key's offset from the query in
dilated steps, shifted so the query's own position maps to k - 1 (``rpb[:, k-1, k-1]``); at the
borders the offsets range over [-(k-1), k-1], which is why the table has 2k - 1 entries per axis.
The bias is ``rpb[head, index_row, index_col]``, added to the scaled logits q.k * d_head^-0.5 before
the softmax over the K keys. tests/test_neighborhood.py checks this closed form against NATTEN's
formulas written out.

- ``local.neighborhood_naive``: a precomputed (N, K) key index table (N = H*W) and (N, K) bias index
  table; K and V gathered per query (B, h, N, K, d) and the (1 x K) attention row of each query.
- ``local.neighborhood`` ("blocked"): per dilation group, queries in tiles of t x t (t =
  ``tile``, padded at the end of each axis to whole tiles); each tile attends to the (t+k-1)^2 region
  (or the whole group axis when shorter) covering all its queries' clamped windows, with an additive
  mask (-inf outside each query's exact window) plus the bias. Large dense matmuls instead of N tiny
  ones, and no per-query gather over the batch: only the region gather, (T/t)^2 ~ 3x the input.

FLOPs (2 per MAC, N = H*W, C = dim): qkv 6NC^2 + proj 2NC^2 + attention. The naive form computes
the attention matmuls over exactly K keys per query: 4NKC. The blocked form's ``flops_analytic``
counts the pairs it COMPUTES ("computed pairs" convention: what torch's FlopCounterMode and fvcore
count): 4 C * sum over dilation groups of (P_rows * P_cols), with P = n_tiles * t * T per group axis
(padded queries and masked keys included); ``flops_useful`` gives the unmasked count 4NKC, which
equals the naive form's ``flops_analytic`` attention part.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..registry import register
from ._common import attention_flops, check_heads, linear_flops
from ._flex import FlexPlans, layout_block, run_flex


def window_starts(length: int, kernel: int, dilation: int) -> list[tuple[int, int, int]]:
    """Per position i of an axis: (g, ig, s), its dilation group, its number in the group and the
    group number of its window's first key (clamped: ``min(max(ig - r, 0), Lg - k)``)."""
    out = []
    r = kernel // 2
    for i in range(length):
        g, ig = i % dilation, i // dilation
        lg = len(range(g, length, dilation))
        out.append((g, ig, min(max(ig - r, 0), lg - kernel)))
    return out


def axis_tables(length: int, kernel: int, dilation: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(length, kernel) key positions and (length, kernel) bias indices (in [0, 2k-2]) of one axis."""
    keys, bias = [], []
    for g, ig, s in window_starts(length, kernel, dilation):
        keys.append([g + (s + a) * dilation for a in range(kernel)])
        bias.append([s + a - ig + kernel - 1 for a in range(kernel)])
    return torch.tensor(keys, dtype=torch.long), torch.tensor(bias, dtype=torch.long)


def too_small(kernel: int, dilation: int, height: int, width: int) -> str | None:
    if kernel * dilation > min(height, width):
        return (f"neighbourhood attention needs kernel * dilation = {kernel * dilation} <= the grid side "
                f"in each direction, got {height} x {width}")
    return None


class _NeighborhoodAttention(nn.Module):
    """Shared layout, checks and FLOPs."""

    def __init__(self, dim: int, heads: int, kernel: int = 7, dilation: int = 1, qkv_bias: bool = True):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.head_dim = check_heads(dim, heads)
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel must be odd and >= 1, got {kernel}")
        if dilation < 1:
            raise ValueError(f"dilation must be >= 1, got {dilation}")
        self.kernel, self.dilation = kernel, dilation
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.rpb = nn.Parameter(torch.zeros(heads, 2 * kernel - 1, 2 * kernel - 1))
        self.proj = nn.Linear(dim, dim)
        self._tables: dict = {}

    def supports(self, height: int, width: int) -> str | None:
        return too_small(self.kernel, self.dilation, height, width)

    def _check(self, height: int, width: int) -> None:
        reason = self.supports(height, width)
        if reason is not None:
            raise ValueError(reason)

    def _qkv(self, x: torch.Tensor):
        """x (B, H, W, C) -> q (scaled), k, v, each (B, h, H, W, d)."""
        B, H, W, C = x.shape
        qkv = self.qkv(x).reshape(B, H, W, 3, self.heads, self.head_dim).permute(3, 0, 4, 1, 2, 5)
        return qkv[0] * self.head_dim ** -0.5, qkv[1], qkv[2]

    def _linear_flops(self, batch: int, height: int, width: int) -> int:
        n, c = height * width, self.dim
        return batch * (linear_flops(n, c, 3 * c) + linear_flops(n, c, c))

    def flops_useful(self, batch: int, height: int, width: int) -> int:
        """FLOPs over exactly kernel^2 keys per query (the unmasked pairs), linears included."""
        return (self._linear_flops(batch, height, width)
                + attention_flops(batch, height * width, self.kernel ** 2, self.dim))


@register("local.neighborhood_naive", family="local", algorithm="local.neighborhood")
class NeighborhoodNaive(_NeighborhoodAttention):
    """Neighbourhood attention (NAT/DiNAT: clamped dilated kernel x kernel windows, NATTEN relative position bias), per-query gather.

    x (B, H, W, C) -> (B, H, W, C); needs kernel * dilation <= H and <= W.
    """

    def _index(self, H: int, W: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (H, W, "naive", str(device))
        if key not in self._tables:
            kr, br = axis_tables(H, self.kernel, self.dilation)
            kc, bc = axis_tables(W, self.kernel, self.dilation)
            k, m = self.kernel, 2 * self.kernel - 1
            keys = (kr[:, None, :, None] * W + kc[None, :, None, :]).reshape(H * W, k * k)
            bias = (br[:, None, :, None] * m + bc[None, :, None, :]).reshape(H * W, k * k)
            self._tables[key] = (keys.to(device), bias.to(device))  # per device: no copy per call
        return self._tables[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        self._check(H, W)
        h, d, N = self.heads, self.head_dim, H * W
        q, k, v = (t.reshape(B, h, N, d) for t in self._qkv(x))
        keys, bias_idx = self._index(H, W, x.device)
        kn = k[:, :, keys]  # (B, h, N, K, d)
        vn = v[:, :, keys]
        bias = self.rpb.reshape(h, -1)[:, bias_idx]  # (h, N, K)
        logits = (q.unsqueeze(-2) @ kn.transpose(-2, -1)).squeeze(-2) + bias  # (B, h, N, K)
        attn = logits.softmax(dim=-1)
        out = (attn.unsqueeze(-2) @ vn).reshape(B, h, H, W, d).permute(0, 2, 3, 1, 4).reshape(B, H, W, C)
        return self.proj(out)

    def flops_analytic(self, batch: int, height: int, width: int) -> int:
        return self.flops_useful(batch, height, width)


def _blocked_axis(length: int, kernel: int, dilation: int, tile: int):
    """Per dilation group g of an axis: (g, Lg, n_tiles, T, query_rows (n_tiles*t,), key_rows (n_tiles, T),
    bias index (n_tiles*t, T) with -1 outside the query's window). Padded queries repeat the group's last."""
    r = kernel // 2
    out = []
    for g in range(min(dilation, length)):
        lg = len(range(g, length, dilation))
        t = min(tile, lg)
        n = math.ceil(lg / t)
        T = min(t + kernel - 1, lg)
        qrows, krows, bias = [], [], []
        for ti in range(n):
            q0 = ti * t
            s0 = min(max(q0 - r, 0), lg - kernel)
            region = min(max(s0, 0), lg - T)
            krows.append(list(range(region, region + T)))
            for a in range(t):
                iq = min(q0 + a, lg - 1)
                qrows.append(iq)
                s = min(max(iq - r, 0), lg - kernel)
                bias.append([(kg - iq + kernel - 1) if s <= kg < s + kernel else -1
                             for kg in range(region, region + T)])
        out.append((g, lg, n, t, T, torch.tensor(qrows), torch.tensor(krows), torch.tensor(bias)))
    return out


@register("local.neighborhood", family="local", algorithm="local.neighborhood")
class Neighborhood(_NeighborhoodAttention):
    """Neighbourhood attention (NAT/DiNAT), blocked: tiles of queries attend to a tile-plus-halo region, masked to each window.

    x (B, H, W, C) -> (B, H, W, C); same function and state_dict as ``local.neighborhood_naive``.
    ``flops_analytic`` counts the computed pairs (masked ones included); ``flops_useful`` the K per query.
    """

    tile = 8  # queries per tile side, within one dilation group

    def _plan(self, H: int, W: int, device="cpu"):
        """Per axis, per dilation group: sizes and index tensors on ``device`` (cached per device)."""
        key = (H, W, self.tile, str(device))
        if key not in self._tables:
            self._tables[key] = tuple(
                [(g, lg, n, t, T, qr.to(device), kr.to(device), br.to(device))
                 for g, lg, n, t, T, qr, kr, br in _blocked_axis(L, self.kernel, self.dilation, self.tile)]
                for L in (H, W))
        return self._tables[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        self._check(H, W)
        h, d, m = self.heads, self.head_dim, 2 * self.kernel - 1
        dil, dev = self.dilation, x.device
        q, kt, vt = self._qkv(x)  # (B, h, H, W, d)
        out = q.new_empty(B, h, H, W, d) if dil > 1 else None
        rows, cols = self._plan(H, W, dev)
        for gr, lr, nr, tr, Tr, qr_, kr_, br in rows:
            for gc, lc, nc, tc, Tc, qc_, kc_, bc in cols:
                if dil > 1:
                    qg, kg, vg = (t[:, :, gr::dil, gc::dil] for t in (q, kt, vt))  # (B, h, lr, lc, d)
                else:
                    qg, kg, vg = q, kt, vt
                # queries (B, h, nr, nc, tr*tc, d); keys/values (B, h, nr, nc, Tr*Tc, d)
                qb = qg[:, :, qr_[:, None], qc_[None, :]].reshape(B, h, nr, tr, nc, tc, d)
                qb = qb.transpose(3, 4).reshape(B, h, nr, nc, tr * tc, d)
                ri, ci = kr_[:, None, :, None], kc_[None, :, None, :]
                kb = kg[:, :, ri, ci].reshape(B, h, nr, nc, Tr * Tc, d)
                vb = vg[:, :, ri, ci].reshape(B, h, nr, nc, Tr * Tc, d)
                bias = self._bias(br.reshape(nr, tr, Tr), bc.reshape(nc, tc, Tc), m, dev)  # (h, nr, nc, tr*tc, Tr*Tc)
                attn = (qb @ kb.transpose(-2, -1) + bias).softmax(dim=-1)
                ob = (attn @ vb).reshape(B, h, nr, nc, tr, tc, d).permute(0, 1, 2, 4, 3, 5, 6)
                ob = ob.reshape(B, h, nr * tr, nc * tc, d)[:, :, :lr, :lc]
                if dil > 1:
                    out[:, :, gr::dil, gc::dil] = ob
                else:
                    out = ob
        out = out.permute(0, 2, 3, 1, 4).reshape(B, H, W, C)
        return self.proj(out)

    def _bias(self, br: torch.Tensor, bc: torch.Tensor, m: int, dev) -> torch.Tensor:
        """rpb gathered for (row tile, col tile, query, key) with -inf outside each query's window."""
        nr, tr, Tr = br.shape
        nc, tc, Tc = bc.shape
        R = br[:, None, :, None, :, None]
        Cc = bc[None, :, None, :, None, :]
        allowed = (R >= 0) & (Cc >= 0)
        idx = R.clamp(min=0) * m + Cc.clamp(min=0)  # (nr, nc, tr, tc, Tr, Tc)
        vals = self.rpb.reshape(self.heads, -1)[:, idx]
        vals = vals.masked_fill(~allowed, float("-inf"))
        return vals.reshape(self.heads, nr, nc, tr * tc, Tr * Tc)

    def computed_pairs(self, height: int, width: int) -> int:
        """Query-key pairs the blocked form computes (padded queries and masked keys included)."""
        rows, cols = self._plan(height, width)
        pr = sum(n * t * T for _, _, n, t, T, *_ in rows)
        pc = sum(n * t * T for _, _, n, t, T, *_ in cols)
        return pr * pc

    def flops_analytic(self, batch: int, height: int, width: int) -> int:
        return self._linear_flops(batch, height, width) + 4 * batch * self.dim * self.computed_pairs(height, width)


class _FlexAxis:
    """One axis (length L) of :func:`nat_flex_rule`'s tile-major layout: dilation groups g = i mod d of
    ``lmax = ceil(L / d)`` or fewer members, cut into tiles of ``t = min(tile, lmax)``; queries: group
    coordinates [0, ``pq``), pq = lmax rounded up to whole tiles; keys: group coordinates [-r, pk - r),
    pk = lmax + r rounded up to whole tiles, so that key tile j covers [j t - r, (j + 1) t - r) and an
    interior query tile's keys [i t - r, i t + t + r) lie in ceil((t + 2r) / t) key tiles (i, i + 1, ...)."""

    def __init__(self, length: int, kernel: int, dilation: int, tile: int, pow2: bool = False):
        self.length, self.d, self.r = length, dilation, kernel // 2
        lmax = -(-length // dilation)
        self.t = min(tile, 1 << (lmax - 1).bit_length() if pow2 else lmax)
        self.pq = -(-lmax // self.t) * self.t
        self.pk = -(-(lmax + self.r) // self.t) * self.t

    def members(self, g):
        """Members of dilation group g (tensor or int)."""
        return (self.length - g + self.d - 1) // self.d


def nat_flex_rule(height: int, width: int, kernel: int, dilation: int, tile: int = 4, pow2: bool = False):
    """The tile-major layout of ``local.neighborhood_flex``: (mask_fn, bias_index_fn, q_len, kv_len, block,
    q_src, kv_src, q_inv).

    Sequences: dilation group pairs (gr, gc) one after the other (d^2 segments); within one, the group's
    sub-grid (rows gr, gr + d, ...; columns likewise) in tr x tc tiles (per axis ``t = min(tile, ceil(L /
    d))``), tiles row-major, tokens row-major within a tile, every segment padded at bottom/right to
    whole tiles of the largest group (:class:`_FlexAxis`). Keys: the same with the sub-grid's tiling
    offset by r = kernel // 2 (key tiles start r before query tiles), so an interior query tile's
    windows fall in ceil((t + 2r) / t)^2 key tiles. Block size tr * tc: a block is a tile. Padding positions
    (outside the grid) are never allowed, as keys or as queries (their outputs are dropped).

    ``mask_fn``: the clamped dilated windows of the module docstring, per axis, in group coordinates;
    ``bias_index_fn`` gives (row, col) indices into ``rpb[head]``, clamped to [0, 2k-2] (only masked pairs
    are ever outside). ``q_src`` (q_len,), ``kv_src`` (kv_len,): the row-major grid token at each sequence
    position (padding: a clamped stand-in, masked); ``q_inv`` (H*W,): each grid token's query position.
    ``pow2``: a tile side shrinks only to a power of two (>= the group's side), for the CUDA layout,
    whose 128-token blocks must hold whole tiles.
    """
    k, d, r = kernel, dilation, kernel // 2
    ar, ac = _FlexAxis(height, k, d, tile, pow2), _FlexAxis(width, k, d, tile, pow2)
    tr, tc = ar.t, ac.t
    block = tr * tc
    q_seg, k_seg = ar.pq * ac.pq, ar.pk * ac.pk
    q_cols, k_cols = ac.pq // tc, ac.pk // tc  # tiles a row

    def decode(idx, seg, cols, offset):  # -> group (gr, gc) and group coordinates (ir, ic)
        if d == 1:  # one group: fewer ops in the kernel's inner loop (mask_mod and score_mod run per pair)
            g, rem = 0, idx
        else:
            g, rem = idx // seg, idx % seg
        t, w = rem // block, rem % block
        return g // d, g % d, (t // cols) * tr + w // tc - offset, (t % cols) * tc + w % tc - offset

    def mask_fn(q_idx, kv_idx):
        qgr, qgc, qi, qj = decode(q_idx, q_seg, q_cols, 0)
        kgr, kgc, ki, kj = decode(kv_idx, k_seg, k_cols, r)
        ok = None if d == 1 else (qgr == kgr) & (qgc == kgc)
        for qa, ka, g, ax in ((qi, ki, qgr, ar), (qj, kj, qgc, ac)):
            lg = ax.members(g)
            s = (qa - r).clamp(min=0)
            s = s.clamp(max=lg - k) if d == 1 else torch.minimum(s, lg - k)  # the window's first key (group coordinates)
            m = (qa < lg) & (ka >= s) & (ka < s + k)
            ok = m if ok is None else ok & m
        return ok

    def bias_index(q_idx, kv_idx):
        _, _, qi, qj = decode(q_idx, q_seg, q_cols, 0)
        _, _, ki, kj = decode(kv_idx, k_seg, k_cols, r)
        return (ki - qi + k - 1).clamp(0, 2 * k - 2), (kj - qj + k - 1).clamp(0, 2 * k - 2)

    def sources(n, seg, cols, offset):
        gr, gc, i, j = decode(torch.arange(n), seg, cols, offset)
        lr, lc = torch.as_tensor(ar.members(gr)), torch.as_tensor(ac.members(gc))
        valid = (i >= 0) & (i < lr) & (j >= 0) & (j < lc)
        i, j = torch.minimum(i.clamp(min=0), lr - 1), torch.minimum(j.clamp(min=0), lc - 1)
        return (gr + i * d) * width + gc + j * d, valid

    q_len, kv_len = d * d * q_seg, d * d * k_seg
    q_src, q_valid = sources(q_len, q_seg, q_cols, 0)
    kv_src, _ = sources(kv_len, k_seg, k_cols, r)
    q_inv = torch.empty(height * width, dtype=torch.long)
    q_inv[q_src[q_valid]] = torch.arange(q_len)[q_valid]
    return mask_fn, bias_index, q_len, kv_len, block, q_src, kv_src, q_inv


@register("local.neighborhood_flex", family="local", algorithm="local.neighborhood")
class NeighborhoodFlex(FlexPlans, _NeighborhoodAttention):
    """Neighbourhood attention (NAT/DiNAT) by FlexAttention in tile-major order: clamped dilated windows as a block mask, NATTEN bias as score_mod.

    x (B, H, W, C) -> (B, H, W, C); same function and state_dict as ``local.neighborhood_naive``; needs
    kernel * dilation <= H and <= W. q, k and v (from ``qkv`` on the H*W tokens) are gathered into
    :func:`nat_flex_rule`'s layout: per dilation group, t x t query tiles (t = ``tile`` = 4, or the
    group's side when smaller), contiguous, block size t^2, keys in the same tiling offset by
    r = kernel // 2, so an interior query tile needs ceil((t + 2r) / t)^2 key blocks (3 x 3 at
    kernel 7: 144 keys per query, 2.9x the 49 unmasked) instead of the ~5 rows of 128-token blocks
    (12.6x) of a row-major order; one flex call, run as
    :func:`attnbench.impls._flex.run_flex` describes; the output gathered back to the grid.
    FLOPs: ``flops_analytic`` counts the blocks the kernel COMPUTES (t^2 x t^2 tiles of the (Nq, Nk)
    scores holding an allowed pair, padding rows and keys of a computed block included),
    4 C B * computed_pairs plus the linears on H*W tokens (torch's counter on meta gives the same);
    ``flops_useful`` the unmasked pairs, 4 N K C. fvcore cannot trace flex (NaN + message).
    """

    # query tile side, within one dilation group. With keys offset by r, a tile's windows span
    # ceil((t + 2r) / t) key tiles per axis; at kernel 7 on this 2-core CPU, 56 x 56, batch 8, t = 4 (block 16,
    # 9 key blocks, 2.8x the unmasked pairs) timed 159 ms, t = 3: 187, 6: 226, 8: 256 (5.2x the pairs), 2: 265
    tile = 4
    cuda_tile = 8  # the CUDA layout: 8 x 8 tiles (a power of two), two to a 128-token block

    def __init__(self, dim: int, heads: int, kernel: int = 7, dilation: int = 1, qkv_bias: bool = True):
        super().__init__(dim, heads, kernel, dilation, qkv_bias)
        self._init_flex()

    def _tiles(self, height: int, width: int, device="cpu"):
        """:func:`nat_flex_rule` for this grid in the layout of a call on ``device`` (cpu: ``tile``, one tile
        a block; cuda: ``cuda_tile``, 128-token blocks), its index tensors on ``device`` (cached per device)."""
        layout = self._layout(device)
        cuda = layout == "cuda"
        tile = self.cuda_tile if cuda else self.tile
        key = (height, width, "flex", tile, cuda, str(device))
        if key not in self._tables:
            *fns, q_len, kv_len, tokens, q_src, kv_src, q_inv = nat_flex_rule(
                height, width, self.kernel, self.dilation, tile, pow2=cuda)
            block = layout_block(layout, tokens)[1]
            self._tables[key] = (*fns, q_len, kv_len, block, q_src.to(device), kv_src.to(device), q_inv.to(device))
        return self._tables[key]

    def _plan(self, height: int, width: int, device="cpu"):
        mask_fn, _, q_len, kv_len, block, *_ = self._tiles(height, width, device)
        return self._flex_plan((height, width, self.kernel, self.dilation, block, q_len), mask_fn, q_len, kv_len,
                               device, block=block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        self._check(H, W)
        h, d, N = self.heads, self.head_dim, H * W
        _, bias_index, q_len, kv_len, _, q_src, kv_src, q_inv = self._tiles(H, W, x.device)
        q, kv = self.qkv(x).reshape(B, N, 3 * C).split([C, 2 * C], dim=-1)  # q unscaled
        q = q.index_select(1, q_src).reshape(B, q_len, h, d).transpose(1, 2)  # (B, h, Nq, d), tile-major
        kv = kv.index_select(1, kv_src).reshape(B, kv_len, 2, h, d).permute(2, 0, 3, 1, 4)  # (2, B, h, Nk, d)
        rpb = self.rpb

        def score_mod(score, b, head, q_idx, kv_idx):
            ir, ic = bias_index(q_idx, kv_idx)
            return score + rpb[head, ir, ic]

        out = run_flex(self, q, kv[0], kv[1], self._plan(H, W, x.device), score_mod)  # (B, h, Nq, d)
        out = out.transpose(1, 2).reshape(B, q_len, C).index_select(1, q_inv)  # (B, N, C), row-major
        return self.proj(out.reshape(B, H, W, C))

    def computed_pairs(self, height: int, width: int) -> int:
        """Query-key pairs in the t^2 x t^2 blocks computed, per image (padding rows and keys included)."""
        return self._plan(height, width).computed_pairs

    def flops_analytic(self, batch: int, height: int, width: int) -> int:
        return self._linear_flops(batch, height, width) + 4 * batch * self.dim * self.computed_pairs(height, width)
