"""Swin Transformer window attention (Liu et al. 2021): W-MSA and two ways of computing SW-MSA.

Tokens attend only within M x M windows (M = ``window``, N = M*M tokens per window), with a learned
relative position bias: a ((2M-1)^2, heads) table, ``relative_position_bias_table`` as in timm's
``swin_transformer.WindowAttention`` (whose weights load directly), indexed by each (query, key)
pair's offset. Cost with nW windows per image (2 FLOPs per MAC, C = dim):
qkv 6 nW N C^2 + attention 4 nW N^2 C + proj 2 nW N C^2 per image.

- ``swin.window``: W-MSA, non-overlapping windows on the grid.
- ``swin.shift_pad``: SW-MSA the naive way. The window boundaries are offset by ``shift``, so the
  windows along each edge are partial; the grid is zero-padded by M - shift at top/left and
  ``shift`` at bottom/right so every window is full M x M, and the padded positions are masked out
  as keys (-inf). The linear layers and attention run on every padded window:
  (Hp/M + 1)(Wp/M + 1) windows instead of (Hp/M)(Wp/M), and ``flops_analytic`` counts them all.
- ``swin.shift_cyclic``: SW-MSA as in Swin: roll the grid by -shift, window attention with the
  region mask (-100 between tokens that were not adjacent before the roll), roll back.

Grids not divisible by M are first zero-padded at bottom/right to Hp x Wp, multiples of M, as Swin
does; the padded tokens take part as keys (they are zeros before ``qkv``), and the output is
cropped back to H x W. Both shifted variants pad first and then shift, so they compute the same
function on every grid. (timm's ``SwinTransformerBlock._attn`` rolls *before* padding, which on a
grid not divisible by M differs from Swin's detection code and from this file.)

Small grids: Swin's model does not shift windows when the grid is no larger than the window (timm
then falls back to W-MSA with a smaller window). The shifted variants here still compute their
formula there, as the Swin paper's Table 5 does when it times SW-MSA on stage 4 (a 7 x 7 grid):
shifting a 7 x 7 grid by 3 gives one cyclic window with four regions, or four padded windows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register
from ._common import attention_flops, attention_sdpa, check_heads, linear_flops
from ._flex import FlexPlans, layout_block, run_flex


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """x (B, H, W, C), H and W multiples of M -> (B*nW, M*M, C); windows row-major within each image."""
    B, H, W, C = x.shape
    x = x.reshape(B, H // window, window, W // window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, C)


def window_reverse(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """windows (B*nW, M*M, C) -> (B, H, W, C); the inverse of :func:`window_partition`."""
    C = windows.shape[-1]
    x = windows.reshape(-1, height // window, width // window, window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, C)


def pad_to_multiple(x: torch.Tensor, window: int) -> torch.Tensor:
    """x (B, H, W, C) -> (B, Hp, Wp, C), zero-padded at bottom/right to multiples of M."""
    _, H, W, _ = x.shape
    pad_h, pad_w = -H % window, -W % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x


def relative_position_index(window: int, device: torch.device | None = None) -> torch.Tensor:
    """(M*M, M*M) long: row of the ((2M-1)^2, heads) bias table for each (query, key) pair of a window."""
    r = torch.arange(window, device=device)
    coords = torch.stack(torch.meshgrid(r, r, indexing="ij")).flatten(1)  # (2, N): (row, col) of each token
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # (2, N, N), offsets shifted to [0, 2M-2]
    return rel[0] * (2 * window - 1) + rel[1]


def cyclic_shift_mask(hp: int, wp: int, window: int, shift: int, device: torch.device,
                      dtype: torch.dtype) -> torch.Tensor:
    """Swin's region mask for a grid (Hp, Wp) rolled by -shift: (nW, N, N), -100 across regions, else 0.

    After the roll, the last M rows hold two regions, [Hp-M, Hp-shift) and [Hp-shift, Hp) (the
    latter wrapped around from the top); the same for columns. Tokens of different regions must
    not attend to each other.
    """
    def region(n: int) -> torch.Tensor:  # (n,) region label 0, 1 or 2 along one axis
        i = torch.arange(n, device=device)
        return (i >= n - window).long() + (i >= n - shift).long()

    labels = 3 * region(hp)[:, None] + region(wp)[None, :]  # (Hp, Wp)
    labels = window_partition(labels[None, :, :, None], window).squeeze(-1)  # (nW, N)
    return (labels[:, :, None] != labels[:, None, :]).to(dtype) * -100.0


def padded_window_mask(hp: int, wp: int, window: int, shift: int, device: torch.device,
                       dtype: torch.dtype) -> torch.Tensor:
    """Key mask for a grid (Hp, Wp) padded by M - shift at top/left and shift at bottom/right.

    Returns (nW, 1, N) with nW = (Hp/M + 1)(Wp/M + 1): 0 for keys of the grid, -inf for the padding.
    """
    def inside(n: int) -> torch.Tensor:  # (n + M,) True on the grid's own positions
        i = torch.arange(n + window, device=device)
        return (i >= window - shift) & (i < window - shift + n)

    valid = inside(hp)[:, None] & inside(wp)[None, :]  # (Hp + M, Wp + M)
    valid = window_partition(valid[None, :, :, None], window).squeeze(-1)  # (nW, N)
    mask = torch.zeros(valid.shape, device=device, dtype=dtype).masked_fill_(~valid, float("-inf"))
    return mask[:, None, :]


class _SwinAttention(nn.Module):
    """Shared layout: ``qkv`` Linear(C, 3C), ``proj`` Linear(C, C), ``relative_position_bias_table``.

    Subclasses say how the grid is cut into windows (``forward``), with which additive mask
    (``_build_mask``) and how many windows that makes (``_num_windows``).
    """

    def __init__(self, dim: int, heads: int, window: int = 7, qkv_bias: bool = True):
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.dim, self.heads, self.window = dim, heads, window
        self.head_dim = check_heads(dim, heads)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.empty((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self._masks: dict[tuple, torch.Tensor | None] = {}  # (Hp, Wp, device, dtype) -> mask

    def _relative_position_bias(self) -> torch.Tensor:
        """(h, N, N): the table looked up for every (query, key) pair of a window."""
        n = self.window ** 2
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]  # (N*N, h)
        return bias.reshape(n, n, self.heads).permute(2, 0, 1)

    def _build_mask(self, hp: int, wp: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive mask (nW, N or 1, N) for the windows of a (Hp, Wp) grid as ``forward`` cuts it, or None."""
        return None

    def _mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """The cached :meth:`_build_mask` for the grid of x (B, Hp, Wp, C)."""
        key = (x.shape[1], x.shape[2], x.device, x.dtype)
        if torch.jit.is_tracing():  # (fvcore) sizes are traced tensors there, not cache keys
            return self._build_mask(*key)
        if key not in self._masks:
            self._masks[key] = self._build_mask(*key)
        return self._masks[key]

    def _window_attention(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, Hp, Wp, C), Hp and Wp multiples of M; mask (nW, N or 1, N) or None -> (B, Hp, Wp, C)."""
        B, Hp, Wp, C = x.shape
        M, h, d = self.window, self.heads, self.head_dim
        N, nW = M * M, (Hp // M) * (Wp // M)
        qkv = self.qkv(window_partition(x, M)).reshape(B, nW, N, 3, h, d)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each (B, nW, h, N, d)
        bias = self._relative_position_bias()[None]  # (1, h, N, N): the same for every window
        if mask is not None:
            bias = mask[:, None] + bias  # (nW, h, N, N): one per window
        # Fold the windows into SDPA's batch dim when they share the bias, else into its head dim,
        # so the bias broadcasts over the batch without being copied B times.
        groups = bias.shape[0]
        q, k, v = (t.reshape(B * nW // groups, groups * h, N, d) for t in (q, k, v))
        out = attention_sdpa(q, k, v, bias.reshape(1, groups * h, N, N))
        out = out.reshape(B, nW, h, N, d).transpose(2, 3).reshape(B * nW, N, C)
        return window_reverse(self.proj(out), M, Hp, Wp)

    def _num_windows(self, height: int, width: int) -> int:
        """Windows per image that ``forward`` computes for an H x W grid."""
        return math.ceil(height / self.window) * math.ceil(width / self.window)

    def flops_analytic(self, batch: int, height: int, width: int) -> int:
        n, c = self.window ** 2, self.dim
        windows = batch * self._num_windows(height, width)
        return (windows * (linear_flops(n, c, 3 * c) + linear_flops(n, c, c))
                + attention_flops(windows, n, n, c))


@register("swin.window", family="swin", algorithm="swin.window")
class SwinWindow(_SwinAttention):
    """Swin W-MSA: attention within non-overlapping M x M windows, relative position bias."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, C) -> (B, H, W, C)."""
        _, H, W, _ = x.shape
        x = pad_to_multiple(x, self.window)  # (B, Hp, Wp, C)
        return self._window_attention(x, None)[:, :H, :W]


class _ShiftedSwin(_SwinAttention):
    """SW-MSA: windows offset by ``shift`` (-1: M // 2) down and right; 0 < shift < M."""

    default_text = {"shift": "window // 2"}

    def __init__(self, dim: int, heads: int, window: int = 7, shift: int = -1, qkv_bias: bool = True):
        super().__init__(dim, heads, window, qkv_bias)
        self.shift = window // 2 if shift == -1 else shift
        if not 0 < self.shift < window:
            raise ValueError(f"shift must satisfy 0 < shift < window ({window}) or be -1 (window // 2), got {shift}")


@register("swin.shift_pad", family="swin", algorithm="swin.shift")
class SwinShiftPad(_ShiftedSwin):
    """Swin SW-MSA, naive: offset windows, partial edge windows zero-padded to M x M and masked."""

    def _build_mask(self, hp, wp, device, dtype):
        return padded_window_mask(hp - self.window, wp - self.window, self.window, self.shift, device, dtype)

    def _num_windows(self, height, width):
        return (math.ceil(height / self.window) + 1) * (math.ceil(width / self.window) + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, C) -> (B, H, W, C)."""
        _, H, W, _ = x.shape
        M, s = self.window, self.shift
        x = pad_to_multiple(x, M)  # (B, Hp, Wp, C): Swin's padding, real keys
        x = F.pad(x, (0, 0, M - s, s, M - s, s))  # (B, Hp + M, Wp + M, C): window padding, masked keys
        out = self._window_attention(x, self._mask(x))
        return out[:, M - s:M - s + H, M - s:M - s + W]


@register("swin.shift_cyclic", family="swin", algorithm="swin.shift")
class SwinShiftCyclic(_ShiftedSwin):
    """Swin SW-MSA by cyclic shift: roll by -shift, window attention with Swin's region mask, roll back."""

    def _build_mask(self, hp, wp, device, dtype):
        return cyclic_shift_mask(hp, wp, self.window, self.shift, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, C) -> (B, H, W, C)."""
        _, H, W, _ = x.shape
        s = self.shift
        x = torch.roll(pad_to_multiple(x, self.window), shifts=(-s, -s), dims=(1, 2))  # (B, Hp, Wp, C)
        out = self._window_attention(x, self._mask(x))
        return torch.roll(out, shifts=(s, s), dims=(1, 2))[:, :H, :W]


def swin_flex_rule(hp: int, wp: int, window: int, shift: int, slot: int | None = None):
    """(mask_fn, rel_index_fn, region_fn) on WINDOW-MAJOR token indices of the (Hp, Wp) padded grid rolled
    by -shift (Swin's cyclic coordinates; shift 0: W-MSA): window ``p // slot`` (windows row-major), token
    ``p mod slot`` of it (row-major), the order of ``window_partition`` of the rolled grid with each window's
    M^2 tokens followed by ``slot - M^2`` padding positions (``slot`` default M^2: none).
    Allowed: the same window and a key that is no padding; relative index: the pair's offset within the
    window, row of the ((2M-1)^2, heads) table; region (0, 1, 2 per axis, as :func:`cyclic_shift_mask`,
    on the rolled grid): pairs of different regions get -100, as in ``swin.shift_cyclic``. Padding
    positions are read as the window's last token, so every index stays inside the table (the kernel
    evaluates score_mod on masked pairs too)."""
    M, s, n = window, shift, window * window
    slot = slot or n
    cols = wp // M  # windows per row

    def within(idx):  # the token's number in its window
        return idx % n if slot == n else (idx % slot).clamp(max=n - 1)

    def rolled(idx):  # (row, col) on the rolled grid
        w, t = idx // slot, within(idx)
        return (w // cols) * M + t // M, (w % cols) * M + t % M

    def mask_fn(q_idx, kv_idx):
        same = q_idx // slot == kv_idx // slot
        return same if slot == n else same & (kv_idx % slot < n)

    def rel_index(q_idx, kv_idx):
        qt, kt = within(q_idx), within(kv_idx)
        return (qt // M - kt // M + M - 1) * (2 * M - 1) + (qt % M - kt % M + M - 1)

    def region(idx):
        i, j = rolled(idx)
        return 3 * ((i >= hp - M).long() + (i >= hp - s).long()) + (j >= wp - M).long() + (j >= wp - s).long()

    return mask_fn, rel_index, region


class _SwinFlex(FlexPlans):
    """FlexAttention over the whole (Hp, Wp) grid (zero-padded to multiples of M before ``qkv``, as Swin
    does) in WINDOW-MAJOR order: the grid (rolled by -shift when shifted, as ``swin.shift_cyclic``) cut
    by :func:`window_partition` into one sequence of Hp Wp tokens, each M x M window contiguous; one flex
    call with block size M^2 (one window per block), so the block mask is block-diagonal (every computed
    block is a window, "full": no mask_mod call); ``score_mod`` = table lookup (+ -100 across regions when
    shifted); then :func:`window_reverse` (and the roll back). In the ``cuda`` layout (see
    :mod:`attnbench.impls._flex`) each window is followed by padding up to a power-of-two slot (masked as
    keys; those queries' outputs dropped) and blocks are 128 tokens.

    FLOPs: ``flops_analytic`` counts the blocks the kernel COMPUTES (M^2 x M^2 tiles of the (Hp Wp)^2
    score matrix holding an allowed pair: the windows), 4 C B * computed_pairs, plus the linears on
    Hp*Wp tokens (what torch's counter gives on meta); ``flops_useful`` the unmasked pairs, Hp Wp M^2
    per image: the window form's count (equal here: the blocks are the windows). fvcore cannot trace
    flex (NaN + message).
    """

    shift = 0

    def _rules(self, hp, wp, slot=None):
        return swin_flex_rule(hp, wp, self.window, self.shift, slot)

    def _plan(self, hp: int, wp: int, device="cpu"):
        slot, block = layout_block(self._layout(device), self.window ** 2)
        n = hp * wp // self.window ** 2 * slot
        return self._flex_plan((hp, wp, slot), self._rules(hp, wp, slot)[0], n, n, device, block=block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, C) -> (B, H, W, C)."""
        B, H, W, C = x.shape
        M, s, n = self.window, self.shift, self.window ** 2
        x = pad_to_multiple(x, M)
        _, Hp, Wp, _ = x.shape
        h, d, nw = self.heads, self.head_dim, Hp * Wp // n
        slot, _ = layout_block(self._layout(x.device), n)
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        qkv = self.qkv(window_partition(x, M).reshape(B, nw, n, C))  # window-major
        if slot > n:  # the CUDA layout: each window followed by slot - n padding positions (masked as keys)
            qkv = F.pad(qkv, (0, 0, 0, slot - n))
        q, k, v = qkv.reshape(B, nw * slot, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, nw slot, d)
        _, rel_index, region = self._rules(Hp, Wp, slot)
        table, shifted = self.relative_position_bias_table, s > 0

        def score_mod(score, b, head, q_idx, kv_idx):
            score = score + table[rel_index(q_idx, kv_idx), head]
            if shifted:
                score = score - 100.0 * (region(q_idx) != region(kv_idx)).to(score.dtype)
            return score

        out = run_flex(self, q, k, v, self._plan(Hp, Wp, x.device), score_mod)  # (B, h, nw slot, d)
        out = out.transpose(1, 2).reshape(B, nw, slot, C)[:, :, :n].reshape(B * nw, n, C)
        out = window_reverse(self.proj(out), M, Hp, Wp)
        if s:
            out = torch.roll(out, shifts=(s, s), dims=(1, 2))
        return out[:, :H, :W]

    def computed_pairs(self, height: int, width: int) -> int:
        """Query-key pairs in the M^2 x M^2 blocks computed, per image, on the padded grid."""
        M = self.window
        return self._plan(-(-height // M) * M, -(-width // M) * M).computed_pairs

    def flops_analytic(self, batch: int, height: int, width: int) -> int:
        M, c = self.window, self.dim
        n = -(-height // M) * M * -(-width // M) * M
        return (batch * (linear_flops(n, c, 3 * c) + linear_flops(n, c, c))
                + 4 * batch * c * self.computed_pairs(height, width))

    def flops_useful(self, batch: int, height: int, width: int) -> int:
        """FLOPs over the M^2 keys of each query's window (the unmasked pairs), linears included."""
        return _SwinAttention.flops_analytic(self, batch, height, width)


@register("swin.window_flex", family="swin", algorithm="swin.window")
class SwinWindowFlex(_SwinFlex, _SwinAttention):
    """Swin W-MSA by FlexAttention on the whole grid in window-major order: block-diagonal window mask, relative position bias as score_mod."""

    def __init__(self, dim: int, heads: int, window: int = 7, qkv_bias: bool = True):
        super().__init__(dim, heads, window, qkv_bias)
        self._init_flex()


@register("swin.shift_flex", family="swin", algorithm="swin.shift")
class SwinShiftFlex(_SwinFlex, _ShiftedSwin):
    """Swin SW-MSA by FlexAttention on the whole rolled grid in window-major order: block-diagonal window mask, -100 across regions."""

    def __init__(self, dim: int, heads: int, window: int = 7, shift: int = -1, qkv_bias: bool = True):
        super().__init__(dim, heads, window, shift, qkv_bias)
        self._init_flex()
