"""MViTv2 pooling attention (Li et al., CVPR 2022), without a class token.

Q, K and V come from one ``qkv`` projection and are each pooled per head (depthwise conv + LayerNorm,
average or max pooling), so attention runs between Nq = H'W' pooled queries and Nk pooled keys.
The logits get MViTv2's decomposed relative position terms q·R_h + q·R_w, and the pooled queries
are added to the attention output (residual pooling). The layout (``qkv``, ``proj``, ``pool_q``,
``pool_k``, ``pool_v``, ``norm_q``, ``norm_k``, ``norm_v``, ``rel_pos_h``, ``rel_pos_w``) follows
timm's ``mvitv2.MultiScaleAttention`` so its weights load directly.

Cost (2 FLOPs per MAC, N = HW input tokens, C = dim, k = pool kernel): qkv 6NC^2 + pooling convs
2k^2C(Nq + 2Nk) (conv mode) + relative position 2NqC(kh + kw) + attention 4NqNkC + proj 2NqC^2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register
from ._common import attention_flops, attention_sdpa, check_heads, linear_flops

POOL_MODES = ("conv", "avg", "max")
NORM_EPS = 1e-6  # MViTv2's LayerNorm epsilon (timm's MultiScaleVitCfg.norm_eps)


def _pooled_len(n: int, kernel: int, stride: int) -> int:
    """Length of one side after pooling with padding kernel // 2 (unchanged when pooling is skipped)."""
    return (n + 2 * (kernel // 2) - kernel) // stride + 1


def _resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """(L, d) relative-position table -> (length, d), linearly interpolated when L != length."""
    if table.shape[0] == length:
        return table
    t = table.to(torch.promote_types(table.dtype, torch.float32)).t().unsqueeze(0)  # (1, d, L): float32 or wider
    t = F.interpolate(t, size=length, mode="linear")
    return t.squeeze(0).t().to(table.dtype)


def _rel_pos_index(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """(q_len, k_len) indices into a table of 2*max(q_len, k_len) - 1 relative distances.

    Positions are scaled to the finer of the two grids, as in MViTv2.
    """
    q_ratio = max(k_len / q_len, 1.0)
    k_ratio = max(q_len / k_len, 1.0)
    dist = (torch.arange(q_len, device=device, dtype=torch.long).unsqueeze(1) * q_ratio
            - torch.arange(k_len, device=device, dtype=torch.long).unsqueeze(0) * k_ratio)
    dist = dist + (k_len - 1) * k_ratio
    return dist.long()


@register("mvit.pool", family="mvit", algorithm="mvit.pool")
class MViTPoolAttention(nn.Module):
    """MViTv2 pooling attention: per-head pooled Q/K/V, decomposed rel-pos, residual pooling."""

    def __init__(self, dim: int, heads: int, pool: str = "conv", kernel: int = 3, stride_q: int = 1,
                 stride_kv: int = 4, rel_pos: bool = True, residual_pooling: bool = True,
                 qkv_bias: bool = True, rel_pos_size: int = 56):
        super().__init__()
        if pool not in POOL_MODES:
            raise ValueError(f"pool must be one of {', '.join(POOL_MODES)}, got {pool!r}")
        for name, value in (("kernel", kernel), ("stride_q", stride_q), ("stride_kv", stride_kv),
                            ("rel_pos_size", rel_pos_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.dim, self.heads = dim, heads
        self.head_dim = d = check_heads(dim, heads)
        self.pool_mode, self.kernel = pool, kernel
        self.stride_q, self.stride_kv = stride_q, stride_kv
        self.rel_pos, self.residual_pooling = rel_pos, residual_pooling
        self.rel_pos_size = rel_pos_size

        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

        # A pooling op with kernel 1 and stride 1 is the identity and is left out (no norm either).
        self.pool_q = self.pool_k = self.pool_v = None
        self.norm_q = self.norm_k = self.norm_v = None
        pool_q = kernel > 1 or stride_q > 1
        pool_kv = kernel > 1 or stride_kv > 1
        if pool == "conv":
            def conv(stride):  # depthwise over the head dimension, shared by all heads
                return nn.Conv2d(d, d, kernel, stride=stride, padding=kernel // 2, groups=d, bias=False)
            if pool_q:
                self.pool_q, self.norm_q = conv(stride_q), nn.LayerNorm(d, eps=NORM_EPS)
            if pool_kv:
                self.pool_k, self.norm_k = conv(stride_kv), nn.LayerNorm(d, eps=NORM_EPS)
                self.pool_v, self.norm_v = conv(stride_kv), nn.LayerNorm(d, eps=NORM_EPS)
        else:
            op = nn.AvgPool2d if pool == "avg" else nn.MaxPool2d
            if pool_q:
                self.pool_q = op(kernel, stride_q, kernel // 2)
            if pool_kv:
                self.pool_k = op(kernel, stride_kv, kernel // 2)
                self.pool_v = op(kernel, stride_kv, kernel // 2)

        if rel_pos:
            # Sized as timm does from feat_size: a rel_pos_size^2 grid gives rel_pos_size // stride.
            side = max(rel_pos_size // stride_q, rel_pos_size // stride_kv, 1)
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * side - 1, d))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * side - 1, d))
            nn.init.trunc_normal_(self.rel_pos_h, std=0.02)
            nn.init.trunc_normal_(self.rel_pos_w, std=0.02)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The pooled query grid (H', W') for an input grid (H, W)."""
        return _pooled_len(height, self.kernel, self.stride_q), _pooled_len(width, self.kernel, self.stride_q)

    def _kv_size(self, height: int, width: int) -> tuple[int, int]:
        return _pooled_len(height, self.kernel, self.stride_kv), _pooled_len(width, self.kernel, self.stride_kv)

    @staticmethod
    def _pool(t: torch.Tensor, H: int, W: int, pool: nn.Module | None, norm: nn.Module | None) -> torch.Tensor:
        """t (B, h, H*W, d) -> (B, h, H'*W', d), pooled over the grid per head, then normalised."""
        if pool is not None:
            B, h, _, d = t.shape
            y = pool(t.reshape(B * h, H, W, d).permute(0, 3, 1, 2))  # (B*h, d, H', W')
            t = y.reshape(B, h, d, -1).transpose(2, 3)
        return norm(t) if norm is not None else t

    def _rel_pos_bias(self, q: torch.Tensor, q_size: tuple[int, int], k_size: tuple[int, int]) -> torch.Tensor:
        """q (B, h, Nq, d) -> logit bias (B, h, Nq, Nk): q·R_h[dist_h] + q·R_w[dist_w].

        The tables are interpolated to 2*max(q, k) - 1 entries per axis when the grid needs another length.
        """
        (qh, qw), (kh, kw) = q_size, k_size
        B, h, _, d = q.shape
        rh = _resize_rel_pos(self.rel_pos_h, 2 * max(qh, kh) - 1)[_rel_pos_index(qh, kh, q.device)]  # (qh, kh, d)
        rw = _resize_rel_pos(self.rel_pos_w, 2 * max(qw, kw) - 1)[_rel_pos_index(qw, kw, q.device)]  # (qw, kw, d)
        r_q = q.reshape(B, h, qh, qw, d)
        bias_h = r_q @ rh.transpose(1, 2)  # (B, h, qh, qw, d) @ (qh, d, kh) -> (B, h, qh, qw, kh)
        bias_w = (r_q.transpose(2, 3) @ rw.transpose(1, 2)).transpose(2, 3)  # -> (B, h, qh, qw, kw)
        return (bias_h.unsqueeze(-1) + bias_w.unsqueeze(-2)).reshape(B, h, qh * qw, kh * kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, C) -> (B, H', W', C), (H', W') the pooled query grid (H, W when stride_q is 1)."""
        B, H, W, C = x.shape
        h, d = self.heads, self.head_dim
        qkv = self.qkv(x.reshape(B, H * W, C)).reshape(B, H * W, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, N, d)
        q = self._pool(q, H, W, self.pool_q, self.norm_q)  # (B, h, Nq, d)
        k = self._pool(k, H, W, self.pool_k, self.norm_k)  # (B, h, Nk, d)
        v = self._pool(v, H, W, self.pool_v, self.norm_v)
        q_size, k_size = self.output_size(H, W), self._kv_size(H, W)
        bias = self._rel_pos_bias(q, q_size, k_size) if self.rel_pos else None
        out = attention_sdpa(q, k, v, bias)  # softmax(q k^T / sqrt(d) + bias) v, (B, h, Nq, d)
        if self.residual_pooling:
            out = out + q
        out = out.transpose(1, 2).reshape(B, q_size[0], q_size[1], C)
        return self.proj(out)

    def flops_analytic(self, batch: int, height: int, width: int) -> int:
        (qh, qw), (kh, kw) = self.output_size(height, width), self._kv_size(height, width)
        n, nq, nk, c = height * width, qh * qw, kh * kw, self.dim
        flops = batch * (linear_flops(n, c, 3 * c) + linear_flops(nq, c, c)) + attention_flops(batch, nq, nk, c)
        if self.pool_mode == "conv":  # depthwise: k^2 MACs per output element
            k2 = self.kernel ** 2
            flops += 2 * batch * c * k2 * ((nq if self.pool_q is not None else 0)
                                           + (2 * nk if self.pool_k is not None else 0))
        if self.rel_pos:
            flops += 2 * batch * nq * c * (kh + kw)
        return flops
