"""FLOP counting, three ways, each with its convention in its name.

- ``flops_analytic``: the implementation's closed form; matmul-type ops only (linear, conv, the two
  attention matmuls, grid sampling as below), 2 FLOPs per multiply-accumulate (MAC), forward pass.
- ``macs_fvcore``: fvcore's ``FlopCountAnalysis`` total, which counts one MAC as one "flop" and also
  counts norms (5 per element with affine) and adaptive pooling (1 per input element); fused SDPA is
  counted through an op handle registered here (B*h*Nq*Nk*(d+dv) MACs) instead of fvcore's 0, and
  grid sampling through another (as below) instead of fvcore's "unsupported".
  ``macs_fvcore_matmul`` is the part from matmul-type ops, comparable with ``flops_analytic / 2``.
- ``flops_torch``: ``torch.utils.flop_counter.FlopCounterMode``, 2 FLOPs per MAC, matmul-type ops
  only (norms, softmax and pooling count 0), forward pass; ``flops_torch_fwd_bwd`` adds the backward
  pass in train mode.

Counting runs on the meta device: no memory is allocated and no arithmetic is done, so a shape too
large to run can still be counted, in milliseconds. torch.jit's tracer (which fvcore uses) cannot run
torch's meta kernel of convolution (the kernel's shape checks see traced sizes as tensors), so while
fvcore traces on meta, ``F.conv1d/2d/3d`` compute their output shape with the tracer paused and add
fvcore's own count for them (``fvcore.nn.jit_handles.conv_flop_count`` on the same input, weight
and output shapes it would have read from the graph) under fvcore's operator name ``conv``; the
trace records ``x.new_empty(output shape)`` in the convolution's place, an op fvcore ignores, that
keeps what produced the input alive in the traced graph.
The tests check these counts against fvcore tracing the real module on the CPU, for every
implementation.

Sampling (``F.grid_sample``) is counted as matmul-type work, in both counters, by one convention:
each output element (one channel at one sampled point) is a weighted sum of the input values at its
interpolation neighbours, one MAC per neighbour: bilinear 4 MACs (so C channels at P points cost
4*P*C MACs = 8*P*C FLOPs), trilinear (5-D input) 8, bicubic 16, nearest 0 (a gather, like im2col);
the weights' own arithmetic and padding are not counted. Backward (torch's counter in train mode):
the input gradient the forward count again (4 MACs per output element, bilinear), the grid gradient
that once per coordinate (2, or 3 for 5-D input: each differentiates the same neighbour sum). Torch's counter sees
``aten.grid_sampler_2d``/``grid_sampler_3d`` (``aten.cudnn_grid_sampler`` on CUDA, bilinear), passed to
``FlopCounterMode`` as ``custom_mapping`` (:func:`torch_flop_counter`); fvcore sees
``aten::grid_sampler``, counted by a registered handle under the name ``grid_sampler``, which is in
:data:`FVCORE_MATMUL_OPS`. A sampling mode without a count raises in either counter (the count is
then NaN with a message), never a silent 0.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Callable, Iterator

import torch
from torch import nn

# fvcore's by_operator names for matmul-type work.
FVCORE_MATMUL_OPS = frozenset({"linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum", "conv",
                               "scaled_dot_product_attention", "grid_sampler"})


def _fvcore_sdpa_handle(inputs: list[Any], outputs: list[Any]) -> int:
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(t) for t in inputs[:3])
    rows = math.prod(q[:-1])  # B * h * Nq
    return rows * k[-2] * (q[-1] + v[-1])


# --- grid_sample (see the module docstring for the convention) -----------------------------------

# MACs per output element (one channel at one point): spatial dims of the sample -> interpolation mode
# (torch's enum: 0 bilinear, 1 nearest, 2 bicubic) -> neighbours weighted
GRID_SAMPLE_MACS = {2: {0: 4, 1: 0, 2: 16}, 3: {0: 8, 1: 0}}


def grid_sample_macs(out_shape: Any, interpolation_mode: int = 0) -> int:
    """MACs of one ``grid_sample`` forward whose output has ``out_shape`` (N, C, *points)."""
    spatial = len(out_shape) - 2
    macs = GRID_SAMPLE_MACS.get(spatial, {}).get(int(interpolation_mode))
    if macs is None:
        raise NotImplementedError(f"no FLOP count for grid_sample with {spatial} spatial dims and "
                                  f"interpolation mode {interpolation_mode} (counted: {GRID_SAMPLE_MACS})")
    return macs * math.prod(out_shape)


def _torch_grid_sample(input_shape, grid_shape, interpolation_mode, *args, out_shape=None, **kwargs) -> int:
    return 2 * grid_sample_macs(out_shape, interpolation_mode)


def _torch_grid_sample_backward(grad_output_shape, input_shape, grid_shape, interpolation_mode, padding_mode,
                                align_corners, output_mask, *args, out_shape=None, **kwargs) -> int:
    forward = grid_sample_macs(grad_output_shape, interpolation_mode)
    coordinates = len(grad_output_shape) - 2
    return 2 * forward * (int(bool(output_mask[0])) + coordinates * int(bool(output_mask[1])))


def _torch_cudnn_grid_sample(input_shape, grid_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * grid_sample_macs(out_shape, 0)  # cuDNN's sampler is bilinear


def _torch_cudnn_grid_sample_backward(input_shape, grid_shape, grad_output_shape, *args, out_shape=None,
                                      **kwargs) -> int:
    return 2 * 3 * grid_sample_macs(grad_output_shape, 0)  # both gradients, always


def torch_flop_formulas() -> dict[Any, Callable[..., int]]:
    """Formulas ``FlopCounterMode`` lacks, for its ``custom_mapping`` (op overload packet -> formula on shapes)."""
    aten = torch.ops.aten
    return {aten.grid_sampler_2d: _torch_grid_sample, aten.grid_sampler_3d: _torch_grid_sample,
            aten.grid_sampler_2d_backward: _torch_grid_sample_backward,
            aten.grid_sampler_3d_backward: _torch_grid_sample_backward,
            aten.cudnn_grid_sampler: _torch_cudnn_grid_sample,
            aten.cudnn_grid_sampler_backward: _torch_cudnn_grid_sample_backward}


def torch_flop_counter(**kwargs: Any):
    """``FlopCounterMode(display=False, custom_mapping=...)`` with :func:`torch_flop_formulas` added."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {**torch_flop_formulas(), **kwargs.pop("custom_mapping", {})}
    return FlopCounterMode(display=kwargs.pop("display", False), custom_mapping=mapping, **kwargs)


def _fvcore_grid_sample_handle(inputs: list[Any], outputs: list[Any]) -> int:
    from fvcore.nn.jit_handles import get_shape

    mode = inputs[2].toIValue()
    shape = get_shape(outputs[0])
    if mode is None or shape is None:
        raise NotImplementedError(f"grid_sampler traced without a constant mode ({mode}) or output shape ({shape})")
    return grid_sample_macs(shape, mode)


def build_meta(build: Callable[[], nn.Module], dtype: torch.dtype) -> nn.Module:
    """Build a module on the meta device (parameters without storage)."""
    with torch.device("meta"):
        module = build()
    return module.to(dtype)


def count_flops(build: Callable[[], nn.Module], x_shape: tuple[int, ...], dtype: torch.dtype,
                train: bool = False) -> dict[str, Any]:
    """Count one call of ``build()`` on an input of ``x_shape`` (B, H, W, C) on the meta device.

    Returns ``flops_torch``, ``macs_fvcore``, ``macs_fvcore_matmul``, ``fvcore_uncounted_ops`` and,
    when ``train``, ``flops_torch_fwd_bwd``. A counter that fails leaves its key NaN and says why in
    ``count_message`` (torch) or ``fvcore_message``.
    """
    out: dict[str, Any] = {"flops_torch": math.nan, "count_message": ""}
    module = build_meta(build, dtype).eval()
    x = torch.empty(x_shape, device="meta", dtype=dtype)
    try:
        with torch_flop_counter() as counter, torch.no_grad():
            module(x)
        out["flops_torch"] = int(counter.get_total_flops())
        if train:
            module.train()
            xg = x.clone().requires_grad_(True)
            with torch_flop_counter() as counter:
                y = module(xg)
                y.backward(torch.empty_like(y))
            out["flops_torch_fwd_bwd"] = int(counter.get_total_flops())
            module.eval()
    except Exception as exc:  # counting must not end the cell
        out["count_message"] = f"torch counter: {type(exc).__name__}: {exc}"
    out.update(count_fvcore(module, x))
    return out


def _fvcore_analysis(module: nn.Module, x: torch.Tensor):
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(module, (x,))
    analysis.set_op_handle("aten::scaled_dot_product_attention", _fvcore_sdpa_handle)
    analysis.set_op_handle("aten::grid_sampler", _fvcore_grid_sample_handle)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analysis


@contextlib.contextmanager
def _meta_convolutions(counted: list[int]) -> Iterator[None]:
    """While fvcore traces on meta: each F.conv{1,2,3}d runs its meta kernel with the tracer paused (for
    the output shape), appends fvcore's count for it to ``counted`` and returns an empty tensor of
    that shape made from the input (traced as ``aten::new_empty``, which fvcore ignores)."""
    from fvcore.nn.jit_handles import conv_flop_count

    F = torch.nn.functional
    originals = {name: getattr(F, name) for name in ("conv1d", "conv2d", "conv3d")}

    def shape_only(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def conv(x: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            state = torch._C._get_tracing_state()
            torch._C._set_tracing_state(None)
            try:
                out = original(x, weight, *args, **kwargs)
                shapes = list(x.shape), list(weight.shape), list(out.shape)
            finally:
                torch._C._set_tracing_state(state)
            counted.append(int(conv_flop_count(*shapes, transposed=False)))
            return x.new_empty(shapes[2])  # depends on x, so the trace keeps the ops that made x

        return conv

    for name, original in originals.items():
        setattr(F, name, shape_only(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(F, name, original)


def _fvcore_counts(module: nn.Module, x: torch.Tensor) -> tuple[int, dict[str, int], list[str]]:
    """(total, by operator, uncounted operators) of one forward call, as fvcore counts them."""
    analysis = _fvcore_analysis(module, x)
    convs: list[int] = []
    with _meta_convolutions(convs) if x.device.type == "meta" else contextlib.nullcontext():
        by_op = dict(analysis.by_operator())  # fvcore traces here, once; total() and the rest reuse it
    if convs:
        by_op["conv"] = by_op.get("conv", 0) + sum(convs)
    return sum(by_op.values()), by_op, sorted(analysis.unsupported_ops())


def count_fvcore(module: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """fvcore's counts for one forward call of ``module`` on ``x`` (meta or real tensors).

    Where fvcore cannot trace a module on the meta device the counts are NaN and ``fvcore_message``
    says why; the cell then counts again on the real device, where it is run anyway.
    """
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            total, by_op, uncounted = _fvcore_counts(module, x)
            return {"macs_fvcore": int(total),
                    "macs_fvcore_matmul": int(sum(v for k, v in by_op.items() if k in FVCORE_MATMUL_OPS)),
                    "fvcore_uncounted_ops": ",".join(uncounted),
                    "fvcore_device": x.device.type, "fvcore_message": ""}
    except Exception as exc:
        return {"macs_fvcore": math.nan, "macs_fvcore_matmul": math.nan, "fvcore_device": x.device.type,
                "fvcore_message": f"fvcore on {x.device.type}: {type(exc).__name__}: {str(exc)[:200]}"}


def fvcore_by_operator(module: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """fvcore's MAC count per operator name (for tests and inspection)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return _fvcore_counts(module, x)[1]
