"""Global multi-head self-attention (ViT): every token attends to every token.

Cost (2 FLOPs per MAC, N = H*W tokens, C = dim): qkv 6NC^2 + attention 4N^2C + proj 2NC^2.
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register
from ._common import attention_flops, attention_math, attention_sdpa, check_heads, linear_flops


class _GlobalMHA(nn.Module):
    """Shared layout: ``qkv`` Linear(C, 3C) and ``proj`` Linear(C, C), as in timm's ViT ``Attention``."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.head_dim = check_heads(dim, heads)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, C) -> (B, H, W, C)."""
        B, H, W, C = x.shape
        N = H * W
        qkv = self.qkv(x.reshape(B, N, C)).reshape(B, N, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, N, d)
        out = self._attend(q, k, v).transpose(1, 2).reshape(B, H, W, C)
        return self.proj(out)

    def flops_analytic(self, batch: int, height: int, width: int) -> int:
        n, c = height * width, self.dim
        return batch * (linear_flops(n, c, 3 * c) + linear_flops(n, c, c)) + attention_flops(batch, n, n, c)


@register("mha.sdpa", algorithm="mha")
class MHASdpa(_GlobalMHA):
    """Global MHSA with fused F.scaled_dot_product_attention (backend chosen by torch)."""

    def _attend(self, q, k, v):
        return attention_sdpa(q, k, v)


@register("mha.math", algorithm="mha")
class MHAMath(_GlobalMHA):
    """Global MHSA written out: softmax(QK^T/sqrt(d))V with the N x N matrix materialised."""

    def _attend(self, q, k, v):
        return attention_math(q, k, v)
