"""CSWin Transformer cross-shaped window self-attention (Dong et al., CVPR 2022).

``cswin.cross`` follows ``LePEAttention`` and ``CSWinBlock`` of microsoft/CSWin-Transformer
(models/cswin.py), without the block's norm, MLP and residuals: x (B, H, W, C) -> ``qkv``
Linear(C, 3C); each of q, k, v is cut along channels into two halves of C/2 channels and h/2 heads
(head dim d = C/h, scale d^-0.5):

- the first half attends within horizontal stripes: ``stripe`` (sw) full rows, sw x Wp tokens;
- the second half within vertical stripes: sw full columns, Hp x sw tokens.

Inside each stripe, attention is softmax(q k^T d^-0.5) v plus LePE, the locally-enhanced positional
encoding: a depthwise 3x3 convolution (with bias, padding 1) of V, applied per stripe window as the
reference's ``get_lepe`` does (V reshaped to (B', C/2, stripe_h, stripe_w)), so it does not reach
across stripe borders. One such conv per half: ``lepe_h``, ``lepe_v``. The two halves are
concatenated along channels (horizontal first) and go through ``proj`` Linear(C, C).

Half order: this file follows the paper (first half horizontal). The reference code's branch
``attns[0]`` (idx 0: H_sp = resolution, W_sp = split_size) is the *vertical* one; loading its
weights here means swapping the two halves of q, k, v and of proj's input columns.

Grids not divisible by ``stripe``: zero-padded at bottom/right to Hp x Wp, multiples of ``stripe``,
as Swin does for windows (the reference requires divisibility). The padded tokens are zeros before
``qkv`` and take part as keys and in the LePE conv of both halves (a horizontal stripe is sw x Wp,
a vertical one Hp x sw); the output is cropped back to H x W.

Cost per image on the padded grid (2 FLOPs per MAC, P = Hp Wp tokens, C = dim): qkv 6 P C^2,
proj 2 P C^2, attention 4 (Hp/sw)(sw Wp)^2 (C/2) + 4 (Wp/sw)(Hp sw)^2 (C/2), LePE 2 * 9 P C.
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register
from ._common import attention_flops, attention_sdpa, check_heads, linear_flops
from .swin import pad_to_multiple


def stripe_partition(x: torch.Tensor, sh: int, sw: int) -> torch.Tensor:
    """x (B, H, W, ...), H and W multiples of sh, sw -> (B*nS, sh*sw, ...); windows row-major per image."""
    B, H, W = x.shape[:3]
    rest = x.shape[3:]
    x = x.reshape(B, H // sh, sh, W // sw, sw, *rest)
    x = x.permute(0, 1, 3, 2, 4, *range(5, 5 + len(rest)))
    return x.reshape(-1, sh * sw, *rest)


def stripe_reverse(windows: torch.Tensor, sh: int, sw: int, height: int, width: int) -> torch.Tensor:
    """windows (B*nS, sh*sw, ...) -> (B, H, W, ...); the inverse of :func:`stripe_partition`."""
    rest = windows.shape[2:]
    x = windows.reshape(-1, height // sh, width // sw, sh, sw, *rest)
    x = x.permute(0, 1, 3, 2, 4, *range(5, 5 + len(rest)))
    return x.reshape(-1, height, width, *rest)


@register("cswin.cross", family="cswin", algorithm="cswin.cross")
class CSWinCross(nn.Module):
    """CSWin cross-shaped window attention: half the heads in horizontal stripes, half in vertical, LePE."""

    def __init__(self, dim: int, heads: int, stripe: int = 7, qkv_bias: bool = True):
        super().__init__()
        if stripe < 1:
            raise ValueError(f"stripe must be >= 1, got {stripe}")
        if heads < 2 or heads % 2:
            raise ValueError(f"cswin splits the heads in two halves: heads must be even and >= 2, got {heads}")
        self.dim, self.heads, self.stripe = dim, heads, stripe
        self.head_dim = check_heads(dim, heads)
        half = dim // 2
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.lepe_h = nn.Conv2d(half, half, kernel_size=3, padding=1, groups=half)  # reference attns[1].get_v
        self.lepe_v = nn.Conv2d(half, half, kernel_size=3, padding=1, groups=half)  # reference attns[0].get_v
        self.proj = nn.Linear(dim, dim)

    def _stripe_attention(self, qkv: torch.Tensor, sh: int, sw: int, lepe: nn.Conv2d) -> torch.Tensor:
        """qkv (B, Hp, Wp, 3, C/2) -> (B, Hp, Wp, C/2): attention + LePE within sh x sw windows."""
        B, Hp, Wp, _, c = qkv.shape
        h, d, n = self.heads // 2, self.head_dim, sh * sw
        win = stripe_partition(qkv, sh, sw)  # (B', n, 3, c)
        q, k, v = win.reshape(-1, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # each (B', h, n, d)
        out = attention_sdpa(q, k, v).transpose(1, 2).reshape(-1, n, c)  # (B', n, c)
        v_img = win[:, :, 2].transpose(1, 2).reshape(-1, c, sh, sw)  # (B', c, sh, sw)
        out = out + lepe(v_img).reshape(-1, c, n).transpose(1, 2)
        return stripe_reverse(out, sh, sw, Hp, Wp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, C) -> (B, H, W, C)."""
        B, H, W, C = x.shape
        s = self.stripe
        x = pad_to_multiple(x, s)  # (B, Hp, Wp, C)
        Hp, Wp = x.shape[1], x.shape[2]
        qkv = self.qkv(x).reshape(B, Hp, Wp, 3, 2, C // 2)
        out_h = self._stripe_attention(qkv[..., 0, :], s, Wp, self.lepe_h)
        out_v = self._stripe_attention(qkv[..., 1, :], Hp, s, self.lepe_v)
        out = self.proj(torch.cat([out_h, out_v], dim=-1))
        return out[:, :H, :W]

    def flops_analytic(self, batch: int, height: int, width: int) -> int:
        s, c = self.stripe, self.dim
        hp, wp = -(-height // s) * s, -(-width // s) * s
        tokens = batch * hp * wp
        linears = linear_flops(tokens, c, 3 * c) + linear_flops(tokens, c, c)
        attn = (attention_flops(batch * hp // s, s * wp, s * wp, c // 2)
                + attention_flops(batch * wp // s, hp * s, hp * s, c // 2))
        lepe = 2 * 9 * tokens * c  # two depthwise 3x3 convs over C/2 channels each
        return linears + attn + lepe
