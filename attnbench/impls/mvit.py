"""MViTv2 pooling attention (Li et al., CVPR 2022), without a class token.

Q, K and V come from one ``qkv`` projection and are each pooled per head (depthwise conv + LayerNorm,
average or max pooling), so attention runs between Nq = H'W' pooled queries and Nk pooled keys.
The logits get MViTv2's decomposed relative position terms q·R_h + q·R_w, and the pooled queries
are added to the attention output (residual pooling). The layout (``qkv``, ``proj``, ``pool_q``,
``pool_k``, ``pool_v``, ``norm_q``, ``norm_k``, ``norm_v``, ``rel_pos_h``, ``rel_pos_w``) follows
timm's ``mvitv2.MultiScaleAttention`` so its weights load directly.

Cost (2 FLOPs per MAC, N = HW input tokens, C = dim, k = pool kernel): qkv 6NC^2 + pooling convs
2k^2C(Nq + 2Nk) (conv mode) + relative position 2NqC(kh + kw) + attention 4NqNkC + proj 2NqC^2.

``mvit.window`` is the same module with the pooled grids cut into windows (MViTv2's detection backbone).
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


def _to_windows(t: torch.Tensor, height: int, width: int, window: int) -> torch.Tensor:
    """t (B, h, height*width, d) -> (B*nW, h, window^2, d): the grid zero-padded at bottom/right to
    multiples of ``window`` and cut into non-overlapping windows, row-major within each image."""
    B, h, _, d = t.shape
    t = t.reshape(B, h, height, width, d)
    pad_h, pad_w = -height % window, -width % window
    if pad_h or pad_w:
        t = F.pad(t, (0, 0, 0, pad_w, 0, pad_h))
    nh, nw = (height + pad_h) // window, (width + pad_w) // window
    t = t.reshape(B, h, nh, window, nw, window, d).permute(0, 2, 4, 1, 3, 5, 6)  # (B, nh, nw, h, M, M, d)
    return t.reshape(B * nh * nw, h, window * window, d)


def _from_windows(t: torch.Tensor, height: int, width: int, window: int) -> torch.Tensor:
    """The inverse of :func:`_to_windows`, cropped: (B*nW, h, window^2, d) -> (B, h, height*width, d)."""
    _, h, _, d = t.shape
    nh, nw = -(-height // window), -(-width // window)
    t = t.reshape(-1, nh, nw, h, window, window, d).permute(0, 3, 1, 4, 2, 5, 6)  # (B, h, nh, M, nw, M, d)
    t = t.reshape(-1, h, nh * window, nw * window, d)[:, :, :height, :width]
    return t.reshape(-1, h, height * width, d)


@register("mvit.window", family="mvit", algorithm="mvit.window")
class MViTWindowAttention(MViTPoolAttention):
    """MViTv2 pooling attention within non-overlapping windows, as MViTv2's detection backbone computes it.

    As detectron2's ``MultiScaleAttention`` with ``window_size`` (modeling/backbone/mvit.py): Q, K, V
    are projected and pooled over the WHOLE grid exactly as ``mvit.pool`` does (so a pooling kernel
    reaches across window borders), and only then cut into windows: the pooled query grid into
    Mq x Mq windows, Mq = window // stride_q, the pooled key/value grid into Mk x Mk windows,
    Mk = window // stride_kv, each zero-padded at bottom/right to whole windows (after pooling and
    normalisation: a padded key is a zero vector that still takes part in the softmax, with logit
    0 plus its relative-position term). Query window i attends to key window i only, with MViTv2's
    decomposed relative position terms over the positions inside the windows (tables of
    2 * max(Mq, Mk) - 1 entries, linearly interpolated from the ``rel_pos_size`` ones when the length
    differs). The windows' outputs are put back and cropped to the pooled query grid, the pooled
    queries (whole grid) are added (residual pooling) and ``proj`` applied. Same parameters and
    state_dict layout as ``mvit.pool`` plus ``window``; the output grid is mvit.pool's. As in
    ``mvit.pool`` (timm's convention), a kernel of 1 at stride 1 skips that pooling and its norm, where
    detectron2 would keep a 1 x 1 conv and LayerNorm (its models use kernel 3).

    ``window`` must be a multiple of ``stride_q`` and ``stride_kv`` (detectron2's stages use 56, 28,
    14, 7 with kv strides 4, 2, 1, 1 and query stride 1 or 2; detectron2 floors window // stride and
    would misalign query and key windows otherwise). Then both pooled grids make the same number of
    windows on every grid: ceil(H / window) per side for an odd kernel (a side pools to
    ceil(H / stride)), floor(H / window) + 1 for an even one (floor(H / stride) + 1).

    Cost (nW windows per image, C = dim): mvit.pool's qkv, pooling and proj terms, attention
    4 nW Mq^2 Mk^2 C and relative position 2 nW Mq^2 C (2 Mk), padded windows included.
    """

    def __init__(self, dim: int, heads: int, pool: str = "conv", kernel: int = 3, stride_q: int = 1,
                 stride_kv: int = 4, window: int = 56, rel_pos: bool = True, residual_pooling: bool = True,
                 qkv_bias: bool = True, rel_pos_size: int = 56):
        super().__init__(dim, heads, pool=pool, kernel=kernel, stride_q=stride_q, stride_kv=stride_kv,
                         rel_pos=rel_pos, residual_pooling=residual_pooling, qkv_bias=qkv_bias,
                         rel_pos_size=rel_pos_size)
        if window < 1 or window % stride_q or window % stride_kv:
            raise ValueError(f"window must be a positive multiple of stride_q ({stride_q}) and stride_kv "
                             f"({stride_kv}), got {window}")
        self.window = window
        self.window_q, self.window_kv = window // stride_q, window // stride_kv

    def _num_windows(self, height: int, width: int) -> int:
        """Windows per image for an H x W input grid (the query and the key/value grids make as many)."""
        qh, qw = self.output_size(height, width)
        return -(-qh // self.window_q) * -(-qw // self.window_q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, C) -> (B, H', W', C), (H', W') the pooled query grid (H, W when stride_q is 1)."""
        B, H, W, C = x.shape
        h, d = self.heads, self.head_dim
        mq, mk = self.window_q, self.window_kv
        qkv = self.qkv(x.reshape(B, H * W, C)).reshape(B, H * W, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, N, d)
        q = self._pool(q, H, W, self.pool_q, self.norm_q)  # (B, h, Nq, d), over the whole grid
        k = self._pool(k, H, W, self.pool_k, self.norm_k)  # (B, h, Nk, d)
        v = self._pool(v, H, W, self.pool_v, self.norm_v)
        (qh, qw), (kh, kw) = self.output_size(H, W), self._kv_size(H, W)
        qw_ = _to_windows(q, qh, qw, mq)  # (B*nW, h, Mq^2, d)
        kw_, vw_ = _to_windows(k, kh, kw, mk), _to_windows(v, kh, kw, mk)  # (B*nW, h, Mk^2, d)
        bias = self._rel_pos_bias(qw_, (mq, mq), (mk, mk)) if self.rel_pos else None
        out = _from_windows(attention_sdpa(qw_, kw_, vw_, bias), qh, qw, mq)  # (B, h, Nq, d)
        if self.residual_pooling:
            out = out + q
        out = out.transpose(1, 2).reshape(B, qh, qw, C)
        return self.proj(out)

    def flops_analytic(self, batch: int, height: int, width: int) -> int:
        (qh, qw), (kh, kw) = self.output_size(height, width), self._kv_size(height, width)
        n, nq, nk, c = height * width, qh * qw, kh * kw, self.dim
        mq, mk = self.window_q, self.window_kv
        windows = batch * self._num_windows(height, width)
        flops = (batch * (linear_flops(n, c, 3 * c) + linear_flops(nq, c, c))
                 + attention_flops(windows, mq * mq, mk * mk, c))
        if self.pool_mode == "conv":  # depthwise over the whole grid: k^2 MACs per output element
            k2 = self.kernel ** 2
            flops += 2 * batch * c * k2 * ((nq if self.pool_q is not None else 0)
                                           + (2 * nk if self.pool_k is not None else 0))
        if self.rel_pos:
            flops += 2 * windows * mq * mq * c * (2 * mk)
        return flops
