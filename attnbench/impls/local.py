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
from ._flex import FlexPlans, layout_block, run_flex


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


def halo_tiles(t: torch.Tensor, tile: int, halo: int) -> torch.Tensor:
    """t (B, Hp + 2*halo, Wp + 2*halo, D), Hp and Wp multiples of ``tile`` -> a view
    (B, Hp/tile, Wp/tile, S, S, D), S = tile + 2*halo: tile (i, j) with its halo (no copy)."""
    B, Hh, Wh, D = t.shape
    s = tile + 2 * halo
    nr, nc = (Hh - 2 * halo) // tile, (Wh - 2 * halo) // tile
    sb, sh, sw, sd = t.stride()
    return t.as_strided((B, nr, nc, s, s, D), (sb, tile * sh, tile * sw, sh, sw, sd))


def tile_neighbourhood_mask(tile: int, kernel: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(tile^2, S^2) additive mask, S = tile + kernel - 1: 0 where key (ky, kx) of the halo region is in
    the kernel x kernel window of query (a, b) of the tile (0 <= ky - a < kernel, same for x), else -inf."""
    a = torch.arange(tile, device=device)
    k = torch.arange(tile + kernel - 1, device=device)
    inside = ((k[None, :] - a[:, None]) >= 0) & ((k[None, :] - a[:, None]) < kernel)  # (tile, S)
    allowed = (inside[:, None, :, None] & inside[None, :, None, :]).reshape(tile * tile, -1)
    return torch.zeros(allowed.shape, device=device, dtype=dtype).masked_fill_(~allowed, float("-inf"))


@register("local.blocked", family="local", algorithm="local")
class LocalBlocked(_LocalAttention):
    """Local kernel x kernel attention (zero K/V outside the image), blocked: tiles of queries attend to their tile plus halo with fused SDPA.

    x (B, H, W, C) -> (B, H, W, C); same function and state_dict as ``local.im2col``. The queries are
    cut into t x t tiles (t = ``tile``, the grid padded at bottom/right to whole tiles: Hp x Wp);
    K and V are zero-padded by r = kernel // 2 around the image (plus the tile padding), and each
    tile attends to its S x S region, S = t + 2r, of that grid with one additive mask (t^2, S^2),
    -inf outside each query's exact window and the same for every tile: the zero keys inside a
    window are real keys (logit 0), as in ``local.im2col``. The regions are one copy of K and V,
    S^2 / t^2 times their size. FLOPs: ``flops_analytic`` counts the pairs COMPUTED,
    4 C * B * (Hp/t)(Wp/t) t^2 S^2 for attention (what torch's counter and fvcore see);
    ``flops_useful`` the unmasked pairs, 4 B N K C (N = H*W, K = kernel^2), as ``local.im2col`` counts.
    """

    def __init__(self, dim: int, heads: int, kernel: int = 7, tile: int = 8, qkv_bias: bool = True):
        super().__init__(dim, heads, kernel, qkv_bias)
        if tile < 1:
            raise ValueError(f"tile must be >= 1, got {tile}")
        self.tile = tile
        self._mask_cache: dict = {}

    def _tile_mask(self, device, dtype) -> torch.Tensor:
        key = (str(device), dtype)
        if torch.jit.is_tracing():
            return tile_neighbourhood_mask(self.tile, self.kernel, device, dtype)
        if key not in self._mask_cache:
            self._mask_cache[key] = tile_neighbourhood_mask(self.tile, self.kernel, device, dtype)
        return self._mask_cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, C) -> (B, H, W, C)."""
        B, H, W, C = x.shape
        t, r, h, d = self.tile, self.kernel // 2, self.heads, self.head_dim
        nr, nc = -(-H // t), -(-W // t)
        ph, pw = nr * t - H, nc * t - W
        s = t + 2 * r
        q, kv = self.qkv(x).split([C, 2 * C], dim=-1)  # (B, H, W, C), (B, H, W, 2C)
        if ph or pw:
            q = F.pad(q, (0, 0, 0, pw, 0, ph))
        q = q.reshape(B, nr, t, nc, t, h, d).permute(0, 1, 3, 5, 2, 4, 6).reshape(B * nr * nc, h, t * t, d)
        kv = F.pad(kv, (0, 0, r, r + pw, r, r + ph))  # (B, Hp + 2r, Wp + 2r, 2C), zeros outside the image
        kv = halo_tiles(kv, t, r).reshape(B, nr, nc, s, s, 2, h, d)
        kv = kv.permute(5, 0, 1, 2, 6, 3, 4, 7).reshape(2, B * nr * nc, h, s * s, d)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=self._tile_mask(x.device, q.dtype))
        out = out.reshape(B, nr, nc, h, t, t, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, nr * t, nc * t, C)
        return self.proj(out[:, :H, :W])

    def computed_pairs(self, height: int, width: int) -> int:
        """Query-key pairs computed per image: (Hp/t)(Wp/t) tiles of t^2 x S^2 (padding and masked keys included)."""
        t, s = self.tile, self.tile + self.kernel - 1
        return -(-height // t) * -(-width // t) * t * t * s * s

    def flops_analytic(self, batch: int, height: int, width: int) -> int:
        n, c = height * width, self.dim
        return (batch * (linear_flops(n, c, 3 * c) + linear_flops(n, c, c))
                + 4 * batch * c * self.computed_pairs(height, width))

    def flops_useful(self, batch: int, height: int, width: int) -> int:
        """FLOPs over exactly kernel^2 keys per query (the unmasked pairs), linears included: ``local.im2col``'s count."""
        return super().flops_analytic(batch, height, width)


def local_mask_fn(q_cols: int, k_cols: int, tile: int, kernel: int):
    """The ``local`` rule on tile-major token indices: queries of the (Hq, Wq) grid and keys of the
    (Hk, Wk) zero-padded K/V grid (key (r + i, r + j) is position (i, j) of the image), both cut into
    tile x tile tiles (``q_cols`` = Wq / tile, ``k_cols`` = Wk / tile tiles a row), tiles row-major,
    tokens row-major within a tile. Key (ki, kj) is in query (qi, qj)'s window iff
    0 <= ki - qi < kernel and 0 <= kj - qj < kernel."""
    tt = tile * tile

    def pos(idx, cols):
        t, w = idx // tt, idx % tt
        return (t // cols) * tile + w // tile, (t % cols) * tile + w % tile

    def mask_fn(q_idx, kv_idx):
        (qi, qj), (ki, kj) = pos(q_idx, q_cols), pos(kv_idx, k_cols)
        di, dj = ki - qi, kj - qj
        return (di >= 0) & (di < kernel) & (dj >= 0) & (dj < kernel)

    return mask_fn


def _to_tiles(t: torch.Tensor, tile: int) -> torch.Tensor:
    """(B, Hp, Wp, *rest), Hp and Wp multiples of ``tile`` -> (B, Hp*Wp, *rest) in tile-major order."""
    B, Hp, Wp = t.shape[:3]
    rest = t.shape[3:]
    t = t.reshape(B, Hp // tile, tile, Wp // tile, tile, -1).transpose(2, 3)
    return t.reshape(B, Hp * Wp, *rest)


@register("local.flex", family="local", algorithm="local")
class LocalFlex(FlexPlans, _LocalAttention):
    """Local kernel x kernel attention (zero K/V outside the image) by FlexAttention over the zero-padded K/V grid, block-masked.

    x (B, H, W, C) -> (B, H, W, C); same function and state_dict as ``local.im2col``. Queries: the
    grid padded at bottom/right to Hq x Wq, multiples of t = ``tile``; keys/values: K and V
    zero-padded by r = kernel // 2 around the image and on to Hk x Wk >= (Hq + 2r) x (Wq + 2r),
    multiples of t (the zero keys of a window take part with logit 0, as in ``local.im2col``).
    Both sequences are in tile-major order (t x t tiles, flex block size t^2), so a query block is a
    t x t tile and needs about (1 + ceil(2r / t))^2 key blocks, instead of the ~5 rows of 128-token
    blocks of a row-major order. Runs as :func:`attnbench.impls._flex.run_flex` describes (compiled
    flex for float32/16/bf16). FLOPs: ``flops_analytic`` counts the blocks the kernel COMPUTES (t^2 x t^2
    tiles of the (Hq Wq, Hk Wk) scores holding an allowed pair, padded queries included):
    4 C B * computed_pairs plus the linears on H*W tokens, what torch's counter gives on meta;
    ``flops_useful`` the unmasked pairs, 4 B N K C, as ``local.im2col`` counts. fvcore cannot trace
    flex (NaN + message).
    """

    # tile -1: 4 in the cpu layout (one 16-token tile a block; on this project's 2-core CPU at 56 x 56,
    # interleaved, results/reference/local_speed-cpu: 4.7x swin.shift_cyclic's time against 7.1x with
    # 8 x 8 tiles at batch 1, 4.4x against 6.6x at batch 8), 8 in the cuda
    # layout (two 8 x 8 tiles a 128-token block: 10.3x the unmasked pairs computed against 15.5x with 4 x 4)
    default_text = {"tile": "4 (CPU layout), 8 (CUDA layout)"}
    AUTO_TILE = {"cpu": 4, "cuda": 8}

    def __init__(self, dim: int, heads: int, kernel: int = 7, tile: int = -1, qkv_bias: bool = True):
        super().__init__(dim, heads, kernel, qkv_bias)
        if tile < 1 and tile != -1:
            raise ValueError(f"tile must be >= 1 (or -1: by layout), got {tile}")
        self.tile_param = tile
        self._init_flex()

    def _tile(self, device=None) -> int:
        """The tile side of a call on ``device`` (the ``tile`` parameter, or by layout when it is -1)."""
        return self.tile_param if self.tile_param > 0 else self.AUTO_TILE[self._layout(device)]

    @property
    def tile(self) -> int:
        return self._tile()

    def _grids(self, height: int, width: int, device=None):
        t, r = self._tile(device), self.kernel // 2
        hq, wq = -(-height // t) * t, -(-width // t) * t
        return hq, wq, -(-(hq + 2 * r) // t) * t, -(-(wq + 2 * r) // t) * t

    def _tile_problem(self) -> str | None:
        if self.tile_param > 0 and self.tile_param & (self.tile_param - 1):
            return (f"local.flex on CUDA needs a power-of-two tile (its tiles fill the kernel's 128-token blocks); "
                    f"got tile={self.tile_param}")
        return None

    def supports_device(self, device_type: str) -> str | None:
        return (device_type == "cuda" and self._tile_problem()) or super().supports_device(device_type)

    def _plan(self, height: int, width: int, device="cpu"):
        t, k = self._tile(device), self.kernel
        hq, wq, hk, wk = self._grids(height, width, device)
        layout = self._layout(device)
        if layout == "cuda" and (reason := self._tile_problem()):  # tiles back to back in 128-token blocks
            raise ValueError(reason)
        block = layout_block(layout, t * t)[1]
        return self._flex_plan((height, width, k, t, block), local_mask_fn(wq // t, wk // t, t, k), hq * wq,
                               hk * wk, device, block=block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, C) -> (B, H, W, C)."""
        B, H, W, C = x.shape
        t, r, h, d = self._tile(x.device), self.kernel // 2, self.heads, self.head_dim
        hq, wq, hk, wk = self._grids(H, W, x.device)
        q, kv = self.qkv(x).split([C, 2 * C], dim=-1)
        q = _to_tiles(F.pad(q, (0, 0, 0, wq - W, 0, hq - H)), t).reshape(B, hq * wq, h, d).transpose(1, 2)
        kv = _to_tiles(F.pad(kv, (0, 0, r, wk - W - r, r, hk - H - r)), t)  # (B, Nk, 2C), zeros outside the image
        kv = kv.reshape(B, hk * wk, 2, h, d).permute(2, 0, 3, 1, 4)  # (2, B, h, Nk, d)
        out = run_flex(self, q, kv[0], kv[1], self._plan(H, W, x.device))  # (B, h, Nq, d), tile-major
        out = out.reshape(B, h, hq // t, wq // t, t, t, d).permute(0, 2, 4, 3, 5, 1, 6).reshape(B, hq, wq, C)
        return self.proj(out[:, :H, :W])

    def computed_pairs(self, height: int, width: int) -> int:
        """Query-key pairs in the t^2 x t^2 blocks the kernel computes, per image (padded queries included)."""
        return self._plan(height, width).computed_pairs

    def flops_analytic(self, batch: int, height: int, width: int) -> int:
        n, c = height * width, self.dim
        return (batch * (linear_flops(n, c, 3 * c) + linear_flops(n, c, c))
                + 4 * batch * c * self.computed_pairs(height, width))

    def flops_useful(self, batch: int, height: int, width: int) -> int:
        """FLOPs over exactly kernel^2 keys per query (the unmasked pairs), linears included: ``local.im2col``'s count."""
        return _LocalAttention.flops_analytic(self, batch, height, width)
