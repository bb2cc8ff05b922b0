"""PVT spatial-reduction attention (SRA) and PVTv2's linear SRA.

Queries come from every token; keys and values from a reduced copy of the feature map, so the
attention matrix is N x M with M << N. The layout (``q``, ``kv``, ``proj``, ``sr``, ``norm``)
follows timm's ``pvt_v2.Attention`` so its weights load directly.
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register
from ._common import attention_flops, attention_sdpa, check_heads, linear_flops


class _SRA(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.head_dim = check_heads(dim, heads)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, C) -> key/value source (B, M, C)."""
        raise NotImplementedError

    def _kv_tokens(self, height: int, width: int) -> int:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, C) -> (B, H, W, C)."""
        B, H, W, C = x.shape
        h, d = self.heads, self.head_dim
        q = self.q(x.reshape(B, H * W, C)).reshape(B, H * W, h, d).transpose(1, 2)
        src = self._reduce(x)
        k, v = self.kv(src).reshape(B, -1, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        out = attention_sdpa(q, k, v).transpose(1, 2).reshape(B, H, W, C)
        return self.proj(out)

    def _extra_flops(self, batch: int, height: int, width: int) -> int:
        return 0

    def flops_analytic(self, batch: int, height: int, width: int) -> int:
        n, m, c = height * width, self._kv_tokens(height, width), self.dim
        return (batch * (linear_flops(n, c, c) + linear_flops(m, c, 2 * c) + linear_flops(n, c, c))
                + attention_flops(batch, n, m, c) + self._extra_flops(batch, height, width))


@register("sra.conv", family="sra", algorithm="sra.conv")
class SRAConv(_SRA):
    """PVT spatial-reduction attention: K/V from a Conv2d(kernel=stride=sr_ratio) + LayerNorm."""

    def __init__(self, dim: int, heads: int, sr_ratio: int = 8, qkv_bias: bool = True):
        super().__init__(dim, heads, qkv_bias)
        if sr_ratio < 1:
            raise ValueError(f"sr_ratio must be >= 1, got {sr_ratio}")
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def supports(self, height: int, width: int) -> str | None:
        if min(height, width) < self.sr_ratio:
            return f"token grid {height}x{width} is smaller than sr_ratio {self.sr_ratio}"
        return None

    def _kv_tokens(self, height: int, width: int) -> int:
        r = self.sr_ratio
        return (height // r) * (width // r)

    def _reduce(self, x):
        B, H, W, C = x.shape
        if self.sr_ratio == 1:
            return x.reshape(B, H * W, C)
        y = self.sr(x.permute(0, 3, 1, 2))  # (B, C, H/R, W/R)
        return self.norm(y.flatten(2).transpose(1, 2))

    def _extra_flops(self, batch, height, width):
        if self.sr_ratio == 1:
            return 0
        r, c = self.sr_ratio, self.dim
        return 2 * batch * self._kv_tokens(height, width) * c * c * r * r


@register("sra.linear", family="sra", algorithm="sra.linear")
class SRALinear(_SRA):
    """PVTv2 linear SRA: K/V source average-pooled to pool_size^2 tokens, 1x1 conv, LayerNorm, GELU."""

    def __init__(self, dim: int, heads: int, pool_size: int = 7, qkv_bias: bool = True):
        super().__init__(dim, heads, qkv_bias)
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        self.pool_size = pool_size
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.sr = nn.Conv2d(dim, dim, kernel_size=1)
        self.norm = nn.LayerNorm(dim)
        self.act = nn.GELU()

    def _kv_tokens(self, height: int, width: int) -> int:
        return self.pool_size ** 2

    def _reduce(self, x):
        y = self.sr(self.pool(x.permute(0, 3, 1, 2)))  # (B, C, P, P)
        return self.act(self.norm(y.flatten(2).transpose(1, 2)))

    def _extra_flops(self, batch, height, width):
        return 2 * batch * self.pool_size ** 2 * self.dim * self.dim
