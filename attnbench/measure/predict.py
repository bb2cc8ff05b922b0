"""Predict the peak memory of one measured call without allocating it: run the call on the meta device.

:func:`predict_peak_bytes` builds the module on meta, makes the very call the harness measures
(:func:`attnbench.measure.call.make_call`: ``forward`` under inference mode; ``train``: drop the gradients,
forward, backward of a fixed output gradient), runs it once untracked (the harness warms up too, so
caches filled on a first call, such as Swin's masks, are held before the measured call), then again
under :class:`LiveBytes`, a ``TorchDispatchMode`` that sees every aten op of the forward and backward:

- an op's output whose storage is none of its inputs' is new memory: its storage's bytes, rounded up
  to ``granularity`` (512, as CUDA's caching allocator), join the live bytes; views, in-place and
  ``out=`` ops share an input's storage and add nothing (a resize in place adds what it grew by);
- a weakref on the storage's Python object (torch keeps it as long as the storage) subtracts them
  when the storage dies: when its last view, or the autograd graph's saved tensor, lets it go;
- the gradients held before a train call, which it frees first, subtract when they die;
- a composite op reached whole (autograd is off in inference mode) runs its C++ decomposition under
  the mode, so its temporaries (matmul's broadcast copies, SDPA's math path) are seen.

The result is the peak of live bytes above the level before the call: what CUDA reports as
``max_memory_allocated() - memory_allocated()`` for it, up to the gaps below, in milliseconds at any
size. The tracker agrees byte for byte with the same call on real CPU tensors (tests/test_predict.py).

``F.scaled_dot_product_attention`` on meta tensors would take torch's math fallback (the N x N
logits); CPU and CUDA run a fused kernel. While predicting it runs the meta function of CPU's fused
kernel instead (:class:`FusedSDPAOnMeta`; output plus a float32 log-sum-exp (B, h, N), what every
fused backend holds up to padding) whenever a fused backend is enabled (``sdpa_backend: math``: math).

Known gaps (a lower bound of what the allocator holds, beyond the byte-exact storages):

- memory kernels allocate for themselves below the dispatcher: fused attention workspaces (small on
  CPU; on CUDA O(B*h*N) float32 for flash/efficient, a workspace for cuDNN), cuBLAS workspaces,
  oneDNN/MKL buffers, the contiguous copies a kernel makes of strided inputs;
- allocator behaviour: CUDA's caching (reserved > allocated: only allocated is modelled) and
  fragmentation; the CPU measurement's resident-set delta also sees scratch and retained heap pages
  (tens of MB: large only for small cells);
- SDPA is assumed fused whenever a fused backend is enabled and the mask needs no gradient (CPU's
  rule); a backend that refuses the inputs and falls back to math is under-predicted, and a CUDA
  efficient kernel with a mask that needs a gradient is over-predicted (math is assumed);
- tensors without a storage (sparse, nested) count nothing; eager only (no torch.compile).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .call import make_call
from .flops import build_meta

MODES = ("forward", "train")
_COMPOSITE = torch._C.DispatchKey.CompositeImplicitAutograd


class PredictionError(RuntimeError):
    """The peak could not be predicted (the module does not run on the meta device, say); the
    message says why."""


def _storage(t: Any) -> torch.UntypedStorage | None:
    """The storage of a strided tensor, else None (sparse, nested, not a tensor)."""
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


class LiveBytes(TorchDispatchMode):
    """Bytes of storages created while active (or :meth:`watch`-ed) and still alive, and their peak.

    ``live`` and ``peak`` are bytes above the level when the mode was created; ``peak`` >= 0.
    Works the same on meta and on real tensors (storage sizes, not allocator statistics).
    """

    def __init__(self, granularity: int = 512):
        super().__init__()
        self.granularity = max(1, int(granularity))
        self.live = 0
        self.peak = 0
        self._bytes: dict[int, int] = {}  # storage id (its StorageImpl address) -> counted bytes
        self._refs: dict[int, weakref.ref] = {}

    def _round(self, nbytes: int) -> int:
        return -(-nbytes // self.granularity) * self.granularity

    def _free(self, key: int) -> None:
        self.live -= self._bytes.pop(key, 0)
        self._refs.pop(key, None)

    def _add(self, st: torch.UntypedStorage, counted: bool) -> None:
        key, nbytes = st._cdata, self._round(st.nbytes())
        self._bytes[key] = nbytes
        self._refs[key] = weakref.ref(st, lambda _ref, k=key: self._free(k))
        if counted:
            self.live += nbytes
            self.peak = max(self.peak, self.live)

    def watch(self, t: torch.Tensor | None) -> None:
        """Count ``t``'s storage, held already, as negative bytes if it dies while tracked."""
        st = _storage(t)
        if st is not None and st._cdata not in self._bytes:
            self._add(st, counted=False)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), _COMPOSITE):
            # Reached whole where autograd is off (inference mode): run its C++ decomposition, under this
            # mode, so the temporaries it makes are seen (SDPA's math path, matmul's broadcast copies).
            with self:
                return func._op_dk(_COMPOSITE, *args, **kwargs)
        out = func(*args, **kwargs)
        inputs = {st._cdata for st in map(_storage, tree_leaves((args, kwargs))) if st is not None}
        for st in map(_storage, tree_leaves(out)):
            if st is None:
                continue
            key = st._cdata
            if key in self._bytes:  # a tracked storage: a view, in place, or resized in place
                grown = self._round(st.nbytes()) - self._bytes[key]
                if grown:
                    self._bytes[key] += grown
                    self.live += grown
                    self.peak = max(self.peak, self.live)
            elif key not in inputs:  # new memory (a view or in-place op of a prior storage is not)
                self._add(st, counted=True)
        return out


def _fused_sdpa_enabled() -> bool:
    b = torch.backends.cuda
    return b.flash_sdp_enabled() or b.mem_efficient_sdp_enabled() or b.cudnn_sdp_enabled()


class FusedSDPAOnMeta(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` on meta tensors runs CPU's fused kernel's meta function
    (out (B, h, Nq, dv) and log-sum-exp (B, h, Nq) float32) instead of the math fallback, whenever a
    fused backend is enabled and, as on CPU, the mask needs no gradient (else CPU runs the math path;
    CUDA's efficient kernel would not). Real tensors and other functions pass through."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and _fused_sdpa_enabled():
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
            a = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False,
                 **dict(zip(names, args)), **kwargs}
            q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
            mask_grad = mask is not None and mask.requires_grad and torch.is_grad_enabled()  # CPU: math
            if q.is_meta and q.dim() == 4 and not (a["enable_gqa"] or q.is_nested or mask_grad):
                return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q, k, v, a["dropout_p"], a["is_causal"], attn_mask=mask, scale=a["scale"])[0]
        return func(*args, **kwargs)


def _watch_gradients(tracker: LiveBytes, module: nn.Module | None, x: torch.Tensor | None) -> None:
    """Watch the gradients held before a train call, which its ``zero_grad`` frees (a function of its
    own, so that no reference to them outlives it and keeps them alive through the call)."""
    for t in ([] if x is None else [x.grad]) + ([] if module is None else [p.grad for p in module.parameters()]):
        tracker.watch(t)


def track_peak_bytes(call: Callable[[], object], module: nn.Module | None = None, x: torch.Tensor | None = None,
                     granularity: int = 512) -> int:
    """Run ``call()`` once under :class:`LiveBytes` (and :class:`FusedSDPAOnMeta`); return its peak
    bytes above the level before it. ``module``, ``x``: their gradients, held before the call, count
    negative if the call frees them (a train call does)."""
    tracker = LiveBytes(granularity)
    _watch_gradients(tracker, module, x)
    with FusedSDPAOnMeta(), tracker:
        call()
    return tracker.peak


def predict_peak_bytes(build: Callable[[], nn.Module], x_shape: tuple[int, ...], dtype: torch.dtype,
                       mode: str = "forward", granularity: int = 512) -> int:
    """Predicted peak bytes of one measured call of ``build()`` on an input x of ``x_shape``
    (B, H, W, C) and ``dtype``, above the memory held before it (weights, x, its output gradient).

    ``mode``: ``forward`` (inference mode) or ``train`` (forward and backward, the new gradients
    included). Milliseconds at any size: nothing is allocated. Raises :class:`PredictionError`,
    whose message says why, when the call cannot be run on the meta device; never anything else.
    """
    if mode not in MODES:
        raise PredictionError(f"mode must be one of {MODES}, got {mode!r}")
    try:
        module = build_meta(build, dtype)
    except Exception as exc:  # a module that cannot be built on meta
        raise PredictionError(f"cannot predict on meta: {type(exc).__name__}: {str(exc)[:300]}") from exc
    for sub in module.modules():  # a module whose meta stand-in allocates otherwise than its real kernel
        if getattr(sub, "memory_unpredictable", None):
            raise PredictionError(f"cannot predict on meta: {sub.memory_unpredictable}")
    try:
        x = torch.empty(tuple(x_shape), device="meta", dtype=dtype)
        with FusedSDPAOnMeta():
            call = make_call(module, x, mode)
            call()  # the harness's warm-up: caches filled on the first call are held before the measured one
        return track_peak_bytes(call, module, x, granularity)
    except Exception as exc:  # a module that cannot run on meta: say why, do not crash the caller
        raise PredictionError(f"cannot predict on meta: {type(exc).__name__}: {str(exc)[:300]}") from exc


def try_predict_peak_bytes(build: Callable[[], nn.Module], x_shape: tuple[int, ...], dtype: torch.dtype,
                           mode: str = "forward") -> tuple[int | None, str]:
    """(:func:`predict_peak_bytes`, "") or (None, the reason it could not predict). Never raises."""
    try:
        return predict_peak_bytes(build, x_shape, dtype, mode), ""
    except PredictionError as exc:
        return None, str(exc)
