"""Local (sliding-window, neighbourhood) attention, as in Slide-Transformer (Pan et al., CVPR 2023).

Each query attends to the kernel x kernel neighbourhood of keys/values centred on it (K = kernel^2
keys per query). At the borders the neighbours outside the image are ZERO key/value vectors (k = 0
and v = 0 after the qkv projection): they are not masked, so each takes part in the softmax with
logit 0. No positional bias. Layout: ``qkv`` Linear(C, 3C) and ``proj`` Linear(C, C).

Three ways to gather the neighbourhoods of K and V, each giving (B, C*K, H, W), channel c*K + j
holding channel c of the j-th neighbour (row-major over the kernel window):

- ``local.im2col``: ``F.unfold`` (Im2Col) with padding kernel//2.
- ``local.shift_dwconv``: Slide-Transformer's "shift as depthwise convolution": a depthwise
  convolution (groups = C, C*K output channels) with fixed one-hot kernels, one per neighbour.
- ``local.slide``: Slide-Transformer's deformed shifting: the one-hot convolution plus a parallel
  depthwise convolution with learnable kernels (``deform``, shared by K and V), summed;
  ``reparameterize()`` merges them into one convolution for inference.

Cost (2 FLOPs per MAC, N = H*W, C = dim, K = kernel^2): qkv 6NC^2 + attention 4NKC + proj 2NC^2,
plus, for the convolution variants, 4NCK^2 per depthwise convolution (one conv on K and V
stacked along the batch: 2 * 2B * C*K * N * K). FLOP convention: gathering with im2col is a copy and
counts 0 FLOPs (neither torch's FlopCounterMode nor fvcore counts ``im2col``), whereas the one-hot
convolution of ``local.shift_dwconv`` is counted as a convolution (as both counters do) although it
only moves data; ``local.im2col`` and ``local.shift_dwconv`` compute the same function with
different FLOP counts. ``local.slide`` counts two convolutions before ``reparameterize()`` and one
after (the runner reparameterizes before forward-mode measurements and FLOP counting).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register
from ._common import attention_flops, check_heads, linear_flops


def one_hot_shift_kernels(dim: int, kernel: int) -> torch.Tensor:
    """Depthwise weights (dim*kernel^2, 1, kernel, kernel): output channel c*K + j copies neighbour j of channel c.

    Built with torch ops on the current default device (meta included).
    """
    kk = kernel * kernel
    return torch.eye(kk).reshape(kk, 1, kernel, kernel).repeat(dim, 1, 1, 1)


class _LocalAttention(nn.Module):
    """Shared layout and attention; subclasses gather neighbourhoods in ``_neighbours``."""

    def __init__(self, dim: int, heads: int, kernel: int = 7, qkv_bias: bool = True):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.head_dim = check_heads(dim, heads)
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel must be odd and >= 1, got {kernel}")
        self.kernel = kernel
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _neighbours(self, kv: torch.Tensor) -> torch.Tensor:
        """kv (2B, C, H, W) -> neighbourhoods (2B, C*kernel^2, H, W) or (2B, C*kernel^2, H*W), zero outside."""
        raise NotImplementedError

    def _gather_flops(self, batch: int, height: int, width: int) -> int:
        return 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, C) -> (B, H, W, C)."""
        B, H, W, C = x.shape
        h, d, kk, N = self.heads, self.head_dim, self.kernel ** 2, H * W
        q, kv = self.qkv(x.reshape(B, N, C)).split([C, 2 * C], dim=-1)
        q = q.reshape(B, N, h, 1, d).transpose(1, 2) * d ** -0.5  # (B, h, N, 1, d)
        kv = kv.reshape(B, H, W, 2, C).permute(3, 0, 4, 1, 2).reshape(2 * B, C, H, W)
        nb = self._neighbours(kv).reshape(2, B, h, d, kk, N)
        k = nb[0].permute(0, 1, 4, 2, 3)  # (B, h, N, d, K)
        v = nb[1].permute(0, 1, 4, 3, 2)  # (B, h, N, K, d)
        attn = (q @ k).softmax(dim=-1)  # (B, h, N, 1, K)
        out = (attn @ v).reshape(B, h, N, d).transpose(1, 2).reshape(B, H, W, C)
        return self.proj(out)

    def flops_analytic(self, batch: int, height: int, width: int) -> int:
        n, c = height * width, self.dim
        return (batch * (linear_flops(n, c, 3 * c) + linear_flops(n, c, c))
                + attention_flops(batch, n, self.kernel ** 2, c) + self._gather_flops(batch, height, width))

    def _shift_conv_flops(self, batch: int, height: int, width: int) -> int:
        """One depthwise (C -> C*K) kernel x kernel convolution over K and V (2B images)."""
        kk = self.kernel ** 2
        return 2 * (2 * batch) * self.dim * kk * height * width * kk


@register("local.im2col", family="local", algorithm="local")
class LocalIm2Col(_LocalAttention):
    """Local kernel x kernel attention, zero-padded K/V neighbourhoods gathered with F.unfold (Im2Col).

    x (B, H, W, C) -> (B, H, W, C); per query a (1 x kernel^2) attention row.
    """

    def _neighbours(self, kv):
        return F.unfold(kv, self.kernel, padding=self.kernel // 2)  # (2B, C*K, H*W)


@register("local.shift_dwconv", family="local", algorithm="local")
class LocalShiftConv(_LocalAttention):
    """Local kernel x kernel attention, K/V neighbourhoods shifted by a depthwise conv with one-hot kernels.

    x (B, H, W, C) -> (B, H, W, C). The one-hot weights ``shift`` (C*kernel^2, 1, kernel, kernel)
    are a non-persistent buffer: the state_dict is that of ``local.im2col``.
    """

    def __init__(self, dim: int, heads: int, kernel: int = 7, qkv_bias: bool = True):
        super().__init__(dim, heads, kernel, qkv_bias)
        self.register_buffer("shift", one_hot_shift_kernels(dim, kernel), persistent=False)

    def _conv(self, kv: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(kv, weight, padding=self.kernel // 2, groups=self.dim)

    def _neighbours(self, kv):
        return self._conv(kv, self.shift)  # (2B, C*K, H, W)

    def _gather_flops(self, batch, height, width):
        return self._shift_conv_flops(batch, height, width)


@register("local.slide", family="local", algorithm="local.slide")
class LocalSlide(LocalShiftConv):
    """Slide-Transformer local attention: one-hot shift conv + learnable depthwise conv (deformed shifting).

    x (B, H, W, C) -> (B, H, W, C). Neighbourhoods = conv(K/V, shift) + conv(K/V, deform), both
    depthwise with weights (C*kernel^2, 1, kernel, kernel); ``deform`` is a parameter shared by K and
    V, initialised to zeros (so at init the module computes ``local.shift_dwconv``'s function).
    ``reparameterize()`` replaces both by one convolution with weight ``merged = shift + deform``
    (and removes ``deform``); ``flops_analytic`` counts two convolutions before and one after.
    """

    def __init__(self, dim: int, heads: int, kernel: int = 7, qkv_bias: bool = True):
        super().__init__(dim, heads, kernel, qkv_bias)
        self.deform = nn.Parameter(torch.zeros_like(self.shift))
        self.register_parameter("merged", None)  # set by reparameterize()

    @property
    def is_merged(self) -> bool:
        return self.merged is not None

    @torch.no_grad()
    def reparameterize(self) -> "LocalSlide":
        """Merge the fixed and learnable paths into one convolution, in place (for inference); idempotent."""
        if self.merged is None:
            self.merged = nn.Parameter(self.shift + self.deform, requires_grad=self.deform.requires_grad)
            del self.deform
        return self

    def _neighbours(self, kv):
        if self.merged is not None:
            return self._conv(kv, self.merged)
        return self._conv(kv, self.shift) + self._conv(kv, self.deform)

    def _gather_flops(self, batch, height, width):
        return (1 if self.is_merged else 2) * self._shift_conv_flops(batch, height, width)
