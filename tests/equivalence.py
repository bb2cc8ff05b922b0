"""One way to prove two implementations compute the same function: evaluate both in float64.

In float32 a comparison at ``rtol=1e-4, atol=1e-5`` passes a wrong LayerNorm epsilon (1e-6 for
1e-5: about 7e-7 apart); in float64 correct code agrees to ~1e-15 of the output scale and that bug
shows as 5e-8. Every equivalence test (sibling vs sibling, implementation vs timm, implementation
vs a written-out reference) goes through :func:`assert_same_function`:

    assert_same_function(ours, ref, x)                                    # ours(x) == ref(x)
    assert_same_function(ours, ref, x, call_b=lambda m, x: m(x.flatten(1, 2), (H, W)).reshape(x.shape))

Both modules are deep-copied and cast to float64 (the callers' modules are left as they are), the
inputs are cast to float64, both are evaluated without autograd, and the outputs must agree to
``tol`` (default :data:`FLOAT64_TOL`) of the reference's largest magnitude. A failure prints the max
absolute and relative difference. :func:`assert_close64` is the comparison on its own (gradients),
:func:`assert_low_precision_close` compares a float16/bfloat16 evaluation with float64.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch

FLOAT64_TOL = 1e-12  # max |a - b| allowed, as a fraction of max |reference|; correct code is ~1e-15
# float16 / bfloat16 evaluation against float64, as a fraction of max |reference|: 8 unit roundoffs
# (2^-11, 2^-8) of error accumulated through a few layers; the attention modules here measure 1 to 2
# (fp16 <= 8.6e-4, bf16 <= 5.4e-3), a wrong function (a relative-position table x4) 0.1 or more
LOW_PRECISION_TOL = {torch.float16: 8 * 2.0 ** -11, torch.bfloat16: 8 * 2.0 ** -8}


def _call(module: Any, *inputs: torch.Tensor) -> torch.Tensor:
    return module(*inputs)


def to_float64(module: Any) -> Any:
    """A float64 deep copy of ``module`` (integer buffers such as index tables keep their dtype)."""
    return copy.deepcopy(module).to(torch.float64)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach() - b.detach()).abs().max().item() if a.numel() else 0.0


def assert_close64(actual: torch.Tensor, expected: torch.Tensor, *, tol: float = FLOAT64_TOL,
                   what: str = "outputs") -> None:
    """Two float64 tensors of one shape, finite, with max |actual - expected| <= tol * max |expected|.

    ``expected`` must not be all zeros (agreeing with zero proves nothing).
    """
    assert actual.dtype == torch.float64 and expected.dtype == torch.float64, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, f"{what}: shapes {tuple(actual.shape)} and {tuple(expected.shape)}"
    assert torch.isfinite(expected).all() and torch.isfinite(actual).all(), f"{what}: not finite"
    scale = expected.detach().abs().max().item()
    assert scale > 0, f"{what}: the reference is all zeros, so agreement would prove nothing"
    diff = max_abs_diff(actual, expected)
    assert diff <= tol * scale, (f"{what} differ in float64: max |diff| = {diff:.3e} = {diff / scale:.2e} of "
                                 f"the output scale {scale:.3e} (allowed {tol:.0e})")


def assert_same_function(a: Any, b: Any, *inputs: torch.Tensor, call_a: Callable | None = None,
                         call_b: Callable | None = None, tol: float = FLOAT64_TOL,
                         what: str = "outputs") -> tuple[torch.Tensor, torch.Tensor]:
    """Assert ``call_a(a64, *x64) == call_b(b64, *x64)`` in float64 to ``tol`` of the output scale.

    ``a`` and ``b`` are modules (or objects with ``.to(dtype)``; ``a`` may be ``b``); they are
    deep-copied and cast to float64, so the caller's modules are not changed. ``call_a``/``call_b``
    (default ``module(*inputs)``) adapt a module with another calling convention (timm's token
    layout) and must return one tensor, ``b``'s being the reference. Returns both float64 outputs.
    """
    a64, b64 = to_float64(a), to_float64(b)
    xs = tuple(x.detach().to(torch.float64) for x in inputs)
    with torch.no_grad():
        ya = (call_a or _call)(a64, *xs)
        yb = (call_b or _call)(b64, *xs)
    assert_close64(ya, yb, tol=tol, what=what)
    return ya, yb


def assert_low_precision_close(module: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype, *,
                               tol: float | None = None) -> torch.Tensor:
    """``module`` run in ``dtype`` (float16, bfloat16) is within ``tol`` (default :data:`LOW_PRECISION_TOL`)
    of the output scale of its float64 evaluation (on the same input, rounded to ``dtype``); returns that output."""
    tol = LOW_PRECISION_TOL[dtype] if tol is None else tol
    x_low = x.detach().to(dtype)
    with torch.no_grad():
        y_low = copy.deepcopy(module).to(dtype)(x_low)
        y64 = to_float64(module)(x_low.to(torch.float64))
    assert y_low.dtype == dtype
    assert_close64(y_low.to(torch.float64), y64, tol=tol, what=f"{dtype} vs float64 outputs")
    return y_low
