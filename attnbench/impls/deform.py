"""Deformable attention: keys and values sampled at learned, data-dependent positions.

Both designs map x (B, H, W, C) -> (B, H, W, C), head dim d = C/h, and sample with bilinear
``F.grid_sample`` (zero padding outside the grid). Sampling is counted as 4 MACs per sampled value
(one per neighbour: 8 FLOPs per channel and point; see :mod:`attnbench.measure.flops`).

``deform.dat`` follows ``DAttentionBaseline`` of LeapLabTHU/DAT (models/dat_blocks.py, the current
version of the file) on its default path (``use_pe=True``, ``dwc_pe=False``, ``fixed_pe=False``,
``log_cpb=False``, ``no_off=False``), without the block's norm, MLP and residuals; the defaults are the
paper's stage 3 (DAT-T, CVPR 2022: 3 offset groups, stride 1, 5x5 offset kernel, offset range factor 2):

- q = ``proj_q`` x. The channels are cut into ``groups`` groups of Cg = C/g channels (h/g heads each).
- Offsets, per group, from q: ``offset_dw`` depthwise conv (kernel k, stride s, padding k//2, or 0
  when k == s) -> Hk x Wk map; ``offset_norm`` LayerNorm over Cg; GELU; ``offset_out``
  Linear(Cg, 2, no bias) -> (dy, dx). With ``offset_range_factor`` f >= 0 they are
  tanh(.) * f / (Hk-1), tanh(.) * f / (Wk-1); with f < 0 they are used as they are and the sampling
  position is clamped to [-1, 1].
- Reference points, in grid_sample's normalised coordinates (align_corners=True, -1 and 1 are the
  centres of the first and last pixel of x): ((i + 0.5) / (Hk - 1)) * 2 - 1 for i < Hk, likewise
  along x. These are the reference's numbers; they are not pixel centres (the last one lies beyond
  the grid, where the zero padding takes over), kept so the function is the reference's.
- Each group of x (not q) is sampled at reference + offset: Nk = Hk Wk tokens, then k = ``proj_k``,
  v = ``proj_v`` of the sampled features.
- Relative position bias: ``rpe_table`` (h, 2R-1, 2R-1) sampled bilinearly (align_corners=True) at
  (query - key position) / 2, query positions being (i / (H-1)) * 2 - 1, per head of the group.
  The reference sizes the table by the query grid (R = H = W); here R = ``rpe_size`` is fixed, so one
  module takes any grid: the table spans the displacements of the whole image whatever H and W are,
  and at H = W = R the function is the reference's.
- softmax(q k^T d^-0.5 + bias) v over the Nk keys, then ``proj_out``.
The four projections are Linear layers (the reference's 1x1 convs: same numbers, weights (C, C)).
Grids need H, W >= 2 and Hk, Wk >= 2 (the reference divides by H-1 and Hk-1): :meth:`supports`.

Cost per image (2 FLOPs per MAC, N = H W, Nk = Hk Wk): proj_q and proj_out 4 N C^2, proj_k and
proj_v 4 Nk C^2, offset net 2 k^2 Nk C + 4 Nk C, sampling x 8 Nk C, sampling the bias 8 h N Nk,
attention 4 N Nk C.

``deform.msda`` is the multi-scale deformable attention of Deformable DETR (fundamentalvision/
Deformable-DETR, models/ops/modules/ms_deform_attn.py ``MSDeformAttn`` with the pure-PyTorch core
``ms_deform_attn_core_pytorch``) on one feature level, queries = the tokens of x, as an encoder layer
uses it: each query's reference point is its pixel centre ((j + 0.5)/W, (i + 0.5)/H); per head,
``points`` (P) sampling points at reference + offset / (W, H), offsets (in pixels) from
``sampling_offsets`` Linear(C, h P 2), weights from ``attention_weights`` Linear(C, h P) softmaxed over
the P points; ``value_proj`` x is sampled bilinearly (align_corners=False, zero padding); the
weighted sum over the points (written as a matmul, so the counters see it) goes through
``output_proj``. Parameters start as the reference's ``_reset_parameters`` sets them (offsets on
rings of h directions, uniform weights). Any grid of at least 1 x 1 is taken.

Cost per image: value_proj and output_proj 4 N C^2, sampling_offsets 4 N C h P, attention_weights
2 N C h P, sampling 8 N C P, weighted sum 2 N C P.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register
from ._common import attention_flops, attention_sdpa, check_heads, linear_flops

SAMPLE_FLOPS = 8  # bilinear grid_sample: 4 neighbours, one MAC each, per channel and point


def device_pair(a: float, b: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The (2,) tensor [a, b] made on ``device`` by two fills, not from Python data: no host tensor and
    no host->device copy (``torch.tensor([a, b], device=cuda)`` is a blocking one, a host-device sync in
    every call, and cannot be captured in a CUDA graph). Same values as ``torch.tensor([a, b])`` in
    ``dtype``; used as a tensor operand, the arithmetic is the same as with that tensor (a Python scalar
    operand would not be: CUDA divides by a scalar as a multiplication by its reciprocal)."""
    t = torch.empty(2, dtype=dtype, device=device)
    t[0].fill_(a)
    t[1].fill_(b)
    return t


def sample_flops(points: int, channels: int) -> int:
    """FLOPs of bilinear ``grid_sample`` of ``channels`` values at ``points`` points (8 P C)."""
    return SAMPLE_FLOPS * points * channels


@register("deform.dat", family="deform", algorithm="deform.dat")
class DeformableAttention(nn.Module):
    """DAT deformable attention: keys/values sampled at offsets predicted from the queries, continuous rpe."""

    def __init__(self, dim: int, heads: int, groups: int = 3, stride: int = 1, kernel: int = 5,
                 offset_range_factor: float = 2.0, rpe_size: int = 14, qkv_bias: bool = True):
        """``groups`` offset groups (h/g heads each; must divide ``heads``), the offset net's depthwise
        ``kernel`` and ``stride`` (keys on a grid ``stride`` times coarser), ``offset_range_factor``
        (offsets bounded by that many key-grid cells; negative: unbounded, positions clamped), and
        ``rpe_size`` R (the bias table is (2R-1) x (2R-1) per head)."""
        super().__init__()
        self.head_dim = check_heads(dim, heads)
        if groups < 1 or heads % groups:
            raise ValueError(f"groups must be >= 1 and divide heads {heads}, got {groups}")
        if stride < 1 or kernel < 1:
            raise ValueError(f"stride and kernel must be >= 1, got stride {stride}, kernel {kernel}")
        if rpe_size < 1:
            raise ValueError(f"rpe_size must be >= 1, got {rpe_size}")
        if not math.isfinite(offset_range_factor):
            raise ValueError(f"offset_range_factor must be finite, got {offset_range_factor}")
        self.dim, self.heads, self.groups = dim, heads, groups
        self.stride, self.kernel, self.rpe_size = stride, kernel, rpe_size
        self.offset_range_factor = float(offset_range_factor)
        self.padding = kernel // 2 if kernel != stride else 0
        cg = dim // groups
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_out = nn.Linear(dim, dim)
        self.offset_dw = nn.Conv2d(cg, cg, kernel, stride, self.padding, groups=cg)
        self.offset_norm = nn.LayerNorm(cg)
        self.offset_out = nn.Linear(cg, 2, bias=False)
        self.rpe_table = nn.Parameter(torch.zeros(heads, 2 * rpe_size - 1, 2 * rpe_size - 1))
        nn.init.trunc_normal_(self.rpe_table, std=0.01)

    def key_grid(self, height: int, width: int) -> tuple[int, int]:
        """(Hk, Wk): the offset map's (and so the keys') grid for an H x W input."""
        k, s, p = self.kernel, self.stride, self.padding
        return (height + 2 * p - k) // s + 1, (width + 2 * p - k) // s + 1

    def supports(self, height: int, width: int) -> str | None:
        hk, wk = self.key_grid(height, width)
        if height < 2 or width < 2 or hk < 2 or wk < 2:
            return (f"grid {height}x{width} gives a {hk}x{wk} key grid (kernel {self.kernel}, stride "
                    f"{self.stride}); DAT needs a grid and a key grid of at least 2x2")
        return None

    def offsets(self, q: torch.Tensor) -> torch.Tensor:
        """q (B, H, W, C) -> raw offsets (B*g, Hk, Wk, 2) as (dy, dx), before tanh and scaling."""
        B, H, W, C = q.shape
        g = self.groups
        q = q.reshape(B, H, W, g, C // g).permute(0, 3, 4, 1, 2).reshape(B * g, C // g, H, W)
        t = self.offset_dw(q).permute(0, 2, 3, 1)  # (B*g, Hk, Wk, Cg)
        return self.offset_out(F.gelu(self.offset_norm(t)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, C) -> (B, H, W, C)."""
        B, H, W, C = x.shape
        g, h, d = self.groups, self.heads, self.head_dim
        q = self.proj_q(x)
        off = self.offsets(q)  # (B*g, Hk, Wk, 2)
        Hk, Wk = off.shape[1], off.shape[2]
        n, nk = H * W, Hk * Wk
        opts = {"dtype": x.dtype, "device": x.device}
        ref_y = (torch.arange(Hk, **opts) + 0.5) / (Hk - 1) * 2 - 1
        ref_x = (torch.arange(Wk, **opts) + 0.5) / (Wk - 1) * 2 - 1
        ref = torch.stack(torch.meshgrid(ref_y, ref_x, indexing="ij"), dim=-1)  # (Hk, Wk, 2) as (y, x)
        f = self.offset_range_factor
        if f >= 0:
            pos = off.tanh() * device_pair(f / (Hk - 1), f / (Wk - 1), **opts) + ref
        else:
            pos = (off + ref).clamp(-1.0, 1.0)
        x_groups = x.permute(0, 3, 1, 2).reshape(B * g, C // g, H, W)
        sampled = F.grid_sample(x_groups, pos.flip(-1), mode="bilinear", padding_mode="zeros",
                                align_corners=True)  # (B*g, Cg, Hk, Wk)
        sampled = sampled.reshape(B, C, nk).transpose(1, 2)  # (B, Nk, C), channels group-major
        k = self.proj_k(sampled).reshape(B, nk, h, d).transpose(1, 2)  # (B, h, Nk, d)
        v = self.proj_v(sampled).reshape(B, nk, h, d).transpose(1, 2)
        q = q.reshape(B, n, h, d).transpose(1, 2)  # (B, h, N, d)
        q_y = torch.arange(H, **opts) / (H - 1) * 2 - 1
        q_x = torch.arange(W, **opts) / (W - 1) * 2 - 1
        q_pos = torch.stack(torch.meshgrid(q_y, q_x, indexing="ij"), dim=-1).reshape(1, 1, n, 1, 2)
        disp = (q_pos - pos.reshape(B, g, 1, nk, 2)) * 0.5  # (B, g, N, Nk, 2) as (y, x)
        disp = disp.transpose(0, 1).reshape(g, B * n, nk, 2).flip(-1)
        table = self.rpe_table.reshape(g, h // g, *self.rpe_table.shape[1:])
        bias = F.grid_sample(table, disp, mode="bilinear", padding_mode="zeros", align_corners=True)
        bias = bias.reshape(g, h // g, B, n, nk).permute(2, 0, 1, 3, 4).reshape(B, h, n, nk)
        out = attention_sdpa(q, k, v, bias)  # (B, h, N, d)
        return self.proj_out(out.transpose(1, 2).reshape(B, H, W, C))

    def flops_analytic(self, batch: int, height: int, width: int) -> int:
        c, h = self.dim, self.heads
        hk, wk = self.key_grid(height, width)
        n, nk = batch * height * width, batch * hk * wk  # tokens and sampled keys over the batch
        linears = 2 * linear_flops(n, c, c) + 2 * linear_flops(nk, c, c)
        offset_net = 2 * self.kernel ** 2 * nk * c + linear_flops(nk, c, 2)  # dw conv; Cg -> 2 per group
        sampling = sample_flops(nk, c) + sample_flops(n * hk * wk, h)  # x at the keys; bias table
        return linears + offset_net + sampling + attention_flops(batch, height * width, hk * wk, c)


@register("deform.msda", family="deform", algorithm="deform.msda")
class MultiScaleDeformableAttention(nn.Module):
    """Deformable DETR's deformable attention on one level: per head, P weighted samples around each query."""

    def __init__(self, dim: int, heads: int, points: int = 4):
        """``points`` (P) sampling points per head and query (Deformable DETR: 4)."""
        super().__init__()
        self.head_dim = check_heads(dim, heads)
        if points < 1:
            raise ValueError(f"points must be >= 1, got {points}")
        self.dim, self.heads, self.points = dim, heads, points
        self.sampling_offsets = nn.Linear(dim, heads * points * 2)
        self.attention_weights = nn.Linear(dim, heads * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference's initialisation: point p of head m starts (p+1) pixels out in direction m."""
        h, p = self.heads, self.points
        nn.init.zeros_(self.sampling_offsets.weight)
        angle = torch.arange(h, dtype=torch.float32) * (2.0 * math.pi / h)
        ring = torch.stack([angle.cos(), angle.sin()], -1)
        ring = ring / ring.abs().max(-1, keepdim=True)[0]  # (h, 2), on the unit square
        grid = ring[:, None, :] * torch.arange(1, p + 1, dtype=torch.float32)[None, :, None]  # (h, P, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def supports(self, height: int, width: int) -> str | None:
        if height < 1 or width < 1:
            return f"grid {height}x{width} is empty"
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, C) -> (B, H, W, C)."""
        B, H, W, C = x.shape
        h, d, p, n = self.heads, self.head_dim, self.points, H * W
        opts = {"dtype": x.dtype, "device": x.device}
        value = self.value_proj(x).reshape(B, n, h, d).permute(0, 2, 3, 1).reshape(B * h, d, H, W)
        offsets = self.sampling_offsets(x).reshape(B, n, h, p, 2)  # pixels, (dx, dy)
        weights = self.attention_weights(x).reshape(B, n, h, p).softmax(-1)
        ref_y = (torch.arange(H, **opts) + 0.5) / H
        ref_x = (torch.arange(W, **opts) + 0.5) / W
        ref = torch.stack(torch.meshgrid(ref_x, ref_y, indexing="xy"), dim=-1).reshape(1, n, 1, 1, 2)
        loc = ref + offsets / device_pair(W, H, **opts)  # (B, N, h, P, 2) in [0, 1] inside the grid
        grid = (2 * loc - 1).transpose(1, 2).reshape(B * h, n, p, 2)
        sampled = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros",
                                align_corners=False)  # (B*h, d, N, P)
        weights = weights.transpose(1, 2).reshape(B * h, n, p, 1)
        out = sampled.permute(0, 2, 1, 3) @ weights  # (B*h, N, d, 1)
        out = out.reshape(B, h, n, d).transpose(1, 2).reshape(B, H, W, C)
        return self.output_proj(out)

    def flops_analytic(self, batch: int, height: int, width: int) -> int:
        c, h, p = self.dim, self.heads, self.points
        n = batch * height * width
        linears = 2 * linear_flops(n, c, c) + linear_flops(n, c, 2 * h * p) + linear_flops(n, c, h * p)
        return linears + sample_flops(n * p, c) + 2 * n * c * p  # sampling; weighted sum over the points
