"""FlexAttention helpers shared by the ``*_flex`` forms (swin.window_flex, swin.shift_flex, local.flex,
local.neighborhood_flex).

Each form runs ``torch.nn.attention.flex_attention.flex_attention`` once on the whole token
sequence, q (B, h, Nq, d), k and v (B, h, Nk, d), with a block mask built here from an
element-wise rule ``mask_fn(q_idx, kv_idx) -> bool`` (broadcasting index tensors) and, where the
design has a bias, a ``score_mod``. Scale: flex's default 1/sqrt(d).

Token order: every form puts its tokens in an order where the allowed pairs are nearly
block-diagonal and passes a matching block size: local.flex and local.neighborhood_flex tile-major
(t x t tiles, block t^2), swin.window_flex and swin.shift_flex window-major (block M^2, one window
per block). A row-major order with 128-token blocks would make each query block touch ~5 key blocks.
That is the ``cpu`` layout. The CUDA kernels take only blocks their tiles divide (:data:`CUDA_BLOCK`),
so the ``cuda`` layout (``FlexPlans.flex_layout``, taken by every call on a CUDA tensor and set by the
harness for a CUDA cell) pads each window to a power-of-two slot (49 -> 64 tokens, the padding masked
as keys) and each form uses 128-token blocks: two Swin windows, two 8 x 8 neighbourhood tiles, or
128 / t^2 local tiles a block. It computes more pairs than it needs (Swin M = 7: 3.4x the unmasked
pairs instead of 1x at 56 x 56; neighbourhood k = 7: 10.3x instead of 2.8x), and ``flops_analytic``
counts them. Both layouts are proven equal to the naive forms on this CPU; only the ``cpu`` one has
been timed (no GPU has run these forms yet).

Block mask (:class:`FlexPlan`, built once per module, token grid and device): the rule is evaluated
over Q-block rows of ``block`` queries (``BLOCK`` = 128 when none is passed), so memory is one block
row x Nk booleans at a time; a
(Q block, KV block) tile is skipped when no pair in it is allowed, marked "full" (no mask_mod call)
when every pair in it is allowed and it is not an edge tile, and "partial" otherwise.

How a call runs (:func:`run_flex`):

- float32 / float16 / bfloat16 on CPU or CUDA: ``torch.compile(flex_attention)``, the fused kernel;
  compiled once per module and shape (dynamo guards on the mask and score closures), with dynamo
  told to FAIL rather than silently fall back to eager when its recompile limit is reached.
- with autograd on CPU (train mode, or a forward with grad enabled): flex_attention refuses backward
  on CPU, compiled or not, so the blocks run as :func:`_explicit_blocks` (torch ops over the same
  blocks), with a warning (once per module) and the reason in ``module.flex_path``.
- float64 (the equivalence tests): inductor's CPU flex kernel takes float32/16/bf16 only
  ("LoweringException: ... supported in FlexAttention for CPU device"), so flex_attention runs
  uncompiled: torch's reference, which materialises the (Nq, Nk) scores. Not a timed path.
- meta device (FLOP counting): flex_attention refuses meta tensors, and torch's FlopCounterMode
  counts the flex_attention higher-order op as DENSE attention (4 B Nq Nk C, the block mask
  ignored; its sparsity hint is only read from compiled graphs' node metadata) and, uncompiled,
  cannot even dispatch it ("no implementation found for torch.ops.higher_order.flex_attention").
  On meta the call is therefore replaced by the same blocks written as matmuls, one (rows x cols)
  product per Q block over the KV blocks it computes, so FlopCounterMode counts exactly the blocks
  the kernel computes: 4 C * computed_pairs per image, the ``flops_analytic`` convention of these
  forms. Meta tensors hold no values, so nothing there is timed or compared.
- ``torch.jit.trace`` (fvcore): the higher-order op cannot be traced; :class:`FlexTraceError` is
  raised, so fvcore's count is NaN with that message instead of a silent 0 for the attention.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

BLOCK = 128  # flex's default sparse block size, the CPU kernel's
# On CUDA, inductor's flex kernels tile each sparse block by (BLOCK_M, BLOCK_N) taken from their default
# configs, and refuse a sparse block those tiles do not divide ("Q and KV block size must be divisible by
# BLOCK_M and BLOCK_N"; the backward silently has no config left). In torch 2.11 to 2.14 every default tile,
# forward and backward, any GPU, dtype and head size, is a power of two from 16 to 128, so a sparse block
# of 128 (or a multiple) is the one size all of them divide; the CPU kernel takes any size.
CUDA_BLOCK = 128
CUDA_MIN_HEAD_DIM = 16  # the CUDA lowering: "NYI: embedding dimension ... must be at least 16"
LAYOUTS = ("cpu", "cuda")
COMPILED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
RECOMPILE_LIMIT = 64  # shapes x modules per process before dynamo must fail (never fall back silently)
FVCORE_REASON = ("flex_attention is a higher-order op that torch.jit.trace (fvcore) cannot record, so fvcore "
                 "cannot count these forms; use flops_torch (meta, computed blocks) or flops_analytic")


class FlexTraceError(RuntimeError):
    """Raised when a flex form is traced by torch.jit (fvcore)."""


@dataclass
class FlexPlan:
    """A block mask and its counts for one (q_len, kv_len) problem on one device.

    ``spans``: per Q block, (first query, end query, keys computed for it); ``computed_pairs`` =
    sum of rows * keys over the Q blocks (edge blocks truncated to the sequence lengths);
    ``allowed_pairs``: pairs the rule allows (the unmasked pairs).
    """

    block_mask: object
    q_len: int
    kv_len: int
    computed_pairs: int
    allowed_pairs: int
    spans: list = field(default_factory=list)
    key_index: list = field(default_factory=list)  # per Q block: (keys,) long, the key positions computed
    mask_fn: Callable | None = None  # the rule the mask was built from


def build_plan(mask_fn: Callable, q_len: int, kv_len: int, device, block: int | None = None) -> FlexPlan:
    """Evaluate ``mask_fn(q_idx (r, 1), kv_idx (1, Nk)) -> bool (r, Nk)`` block row by block row into a BlockMask."""
    from torch.nn.attention.flex_attention import BlockMask

    block = block or BLOCK
    nq, nk = math.ceil(q_len / block), math.ceil(kv_len / block)
    kv_idx = torch.arange(kv_len)[None, :]
    partial = torch.zeros(nq, nk, dtype=torch.bool)
    full = torch.zeros(nq, nk, dtype=torch.bool)
    cols = torch.full((nk,), block, dtype=torch.long)
    cols[-1] = kv_len - (nk - 1) * block
    allowed, computed, spans, key_index = 0, 0, [], []
    kv_all = torch.arange(nk * block).reshape(nk, block)
    for i in range(nq):
        r0, r1 = i * block, min(q_len, (i + 1) * block)
        m = mask_fn(torch.arange(r0, r1)[:, None], kv_idx).expand(r1 - r0, kv_len)
        allowed += int(m.sum())
        per_block = torch.nn.functional.pad(m, (0, nk * block - kv_len)).reshape(r1 - r0, nk, block).sum((0, 2))
        any_ = per_block > 0
        is_full = per_block == (r1 - r0) * cols
        if r1 - r0 < block:
            is_full[:] = False
        is_full[-1] &= bool(cols[-1] == block)
        full[i], partial[i] = is_full, any_ & ~is_full
        keys = int(cols[any_].sum())
        computed += (r1 - r0) * keys
        spans.append((r0, r1, keys))
        sel = kv_all[any_].flatten()
        key_index.append(sel[sel < kv_len])

    def blocks(sel: torch.Tensor):
        num = sel.sum(-1).to(torch.int32)[None, None]  # (1, 1, nq)
        idx = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)[None, None]
        return num.to(device), idx.to(device)

    def mask_mod(b, h, q_idx, kv_idx):
        return mask_fn(q_idx, kv_idx)

    kv_num, kv_ind = blocks(partial)
    full_num, full_ind = blocks(full)
    bm = BlockMask.from_kv_blocks(kv_num, kv_ind, full_num, full_ind, BLOCK_SIZE=block, mask_mod=mask_mod,
                                  seq_lengths=(q_len, kv_len))
    return FlexPlan(bm, q_len, kv_len, computed, allowed, spans, key_index, mask_fn)


_compiled_flex = None


def _compiled():
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    return _compiled_flex


def _explicit_blocks(q, k, v, plan: FlexPlan, score_mod: Callable | None) -> torch.Tensor:
    """The blocks the kernel computes, written as torch ops: per Q block, (rows, d) x (d, keys) scores over the
    keys of its computed KV blocks, ``score_mod`` and the mask applied element-wise, softmax, (rows, keys) x
    (keys, d). Same function as flex, same matmul shapes as the blocks computed; differentiable.
    On meta the first ``keys`` rows of k and v stand in for the gathered ones (meta holds no values)."""
    B, h, _, d = q.shape
    meta = q.device.type == "meta"
    heads = torch.arange(h, device=q.device)[None, :, None, None]
    batch = torch.arange(B, device=q.device)[:, None, None, None]
    outs = []
    for (r0, r1, keys), idx in zip(plan.spans, plan.key_index):
        if meta:
            ks, vs = k[:, :, :keys], v[:, :, :keys]
        else:
            idx = idx.to(q.device)
            ks, vs = k[:, :, idx], v[:, :, idx]
        s = (q[:, :, r0:r1] @ ks.transpose(-2, -1)) * d ** -0.5  # (B, h, rows, keys)
        if not meta:
            q_idx = torch.arange(r0, r1, device=q.device)[:, None]
            kv_idx = idx[None, :]
            if score_mod is not None:
                s = score_mod(s, batch, heads, q_idx, kv_idx)
            # the dtype's lowest finite value, not -inf: a query with no allowed key (a padding query of
            # local.neighborhood_flex's tiles, discarded afterwards) then gives a finite row instead of NaN,
            # whose backward would poison the gradients; rows with an allowed key are unchanged (exp -> 0)
            s = s.masked_fill(~plan.mask_fn(q_idx, kv_idx), torch.finfo(s.dtype).min)
        outs.append(s.softmax(-1) @ vs)
    return torch.cat(outs, dim=2)


def run_flex(module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: FlexPlan,
             score_mod: Callable | None = None) -> torch.Tensor:
    """flex_attention(q, k, v) with ``plan``'s block mask and ``score_mod``; q (B, h, Nq, d), k, v (B, h, Nk, d).

    Compiled for float32/16/bf16 (the first call per shape records its seconds, compile included, in
    ``module.flex_compile_s``), uncompiled for float64, explicit blocks on meta, an error under jit tracing.
    """
    if torch.jit.is_tracing():
        raise FlexTraceError(FVCORE_REASON)
    if q.device.type == "meta":
        return _explicit_blocks(q, k, v, plan, score_mod)
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():  # inside a compiled module (compile: true): the outer compile fuses flex
        q, k, v = (t.contiguous() for t in (q, k, v))
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=plan.block_mask)

    reason = None
    if q.dtype not in COMPILED_DTYPES:
        reason = f"inductor's flex kernel takes float32/float16/bfloat16, not {q.dtype}"
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        module.flex_path = ("explicit blocks (torch ops): flex_attention has no backward on CPU, compiled or not "
                            "(NotImplementedError: FlexAttention does not support backward on CPU)")
        if not getattr(module, "_flex_warned", False):
            module._flex_warned = True
            warnings.warn(f"{type(module).__name__}: {module.flex_path}")
        return _explicit_blocks(q, k, v, plan, score_mod)
    if reason is not None:
        module.flex_path = f"uncompiled flex_attention: {reason}"
        with warnings.catch_warnings():  # "called without torch.compile()": on purpose, said above
            warnings.simplefilter("ignore", UserWarning)
            return flex_attention(q, k, v, score_mod=score_mod, block_mask=plan.block_mask)
    module.flex_path = "compiled flex_attention"
    key = (tuple(q.shape), tuple(k.shape), q.dtype, str(q.device))
    first = key not in module.flex_compile_s
    t0 = time.perf_counter()
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
        out = _compiled()(q, k, v, score_mod=score_mod, block_mask=plan.block_mask)
    if first:
        module.flex_compile_s[key] = time.perf_counter() - t0
    return out


def cuda_slot(group: int) -> int:
    """Positions a group of ``group`` tokens (a window, a tile) takes in the CUDA layout: the next power of
    two >= max(group, 16), so that groups never straddle a 128-token block (49 -> 64, 16 -> 16)."""
    return 1 << (max(group, 16) - 1).bit_length()


def layout_block(layout: str, group: int) -> tuple[int, int]:
    """(slot, block) of a layout whose groups have ``group`` tokens: ``cpu``, one group per block, no
    padding (block = group); ``cuda``, groups padded to :func:`cuda_slot` and blocks of max(128, slot)."""
    if layout == "cuda":
        slot = cuda_slot(group)
        return slot, max(CUDA_BLOCK, slot)
    return group, group


def contains_flex(module: torch.nn.Module) -> bool:
    """Whether ``module`` is or holds a FlexAttention form (which compiles its kernel on its first call)."""
    return any(isinstance(sub, FlexPlans) for sub in module.modules())


def set_layout(module: torch.nn.Module, device_type: str) -> None:
    """Give every flex form in ``module`` the token layout of ``device_type`` (``cuda``, else ``cpu``), so
    that counts made on the meta device (FLOPs, computed pairs) are those of the kernel that will run."""
    for sub in module.modules():
        if isinstance(sub, FlexPlans):
            sub.flex_layout = "cuda" if device_type == "cuda" else "cpu"


class FlexPlans:
    """Mixin: ``self._flex_plan(key, mask_fn, q_len, kv_len, device)`` cached per key and device, and
    ``flex_compile_s``; ``flops_analytic`` of a flex form counts the plan of its ``flex_layout``.

    ``flex_layout``: ``cpu`` (one window or tile per sparse block, no padding) or ``cuda`` (groups padded to
    powers of two in blocks of :data:`CUDA_BLOCK`, what the CUDA kernels accept). A call on a CUDA tensor
    always takes (and sets) ``cuda``; elsewhere the attribute decides, so the CUDA layout can be run and
    proven equal on a CPU. :func:`set_layout` sets it for a cell's device before anything is counted.
    """

    flex_layout = "cpu"

    fvcore_unavailable = FVCORE_REASON
    memory_unpredictable = ("a FlexAttention form's working memory is its fused kernel's, which the meta-device "
                            "stand-in (explicit blocks) does not reproduce")

    def _init_flex(self) -> None:
        self._flex_plans: dict = {}
        self.flex_compile_s: dict = {}
        self.flex_path = ""  # the path the last call took: "compiled flex_attention" or why not

    def _layout(self, device=None) -> str:
        """The layout a call on ``device`` uses (None or meta: the module's ``flex_layout``)."""
        if torch.jit.is_tracing():  # before any work: grid sizes are tensors under tracing, and fvcore cannot count
            raise FlexTraceError(FVCORE_REASON)
        if device is not None and torch.device(device).type == "cuda":
            self.flex_layout = "cuda"
        if self.flex_layout not in LAYOUTS:
            raise ValueError(f"flex_layout must be one of {LAYOUTS}, got {self.flex_layout!r}")
        return self.flex_layout

    def supports_device(self, device_type: str) -> str | None:
        """Why this form cannot run on ``device_type`` (None: it can)."""
        head_dim = getattr(self, "head_dim", None)
        if device_type == "cuda" and head_dim is not None and head_dim < CUDA_MIN_HEAD_DIM:
            return (f"FlexAttention on CUDA needs a head dimension of at least {CUDA_MIN_HEAD_DIM} (torch's "
                    f"lowering refuses smaller); this cell has dim / heads = {head_dim}")
        return None

    def _flex_plan(self, key: tuple, mask_fn: Callable, q_len: int, kv_len: int, device,
                   block: int | None = None) -> FlexPlan:
        if torch.jit.is_tracing():  # before any work: the plan's own tensor ops would fail the trace obscurely
            raise FlexTraceError(FVCORE_REASON)
        dev = torch.device(device)
        if dev.type == "meta":
            dev = torch.device("cpu")  # the plan's counts are all the meta path needs
        full_key = (*key, str(dev))
        if full_key not in self._flex_plans:
            self._flex_plans[full_key] = build_plan(mask_fn, q_len, kv_len, dev, block)
        return self._flex_plans[full_key]
