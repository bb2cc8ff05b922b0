"""The measured call: what one timed repetition of a cell runs, in each mode."""

from __future__ import annotations

from typing import Callable

import torch


def make_call(module: torch.nn.Module, x: torch.Tensor, mode: str) -> Callable[[], None]:
    """The measured call: ``forward`` runs ``module(x)`` under inference mode; ``train`` clears the
    gradients, runs the forward and back-propagates a fixed random output gradient."""
    if mode == "forward":
        module.eval()

        def call() -> None:
            with torch.inference_mode():
                module(x)

        return call
    module.train()
    x.requires_grad_(True)
    with torch.no_grad():  # the output's shape from the uncompiled module: a compiled one would compile a
        # no-grad program here that no timed call runs (a second graph, seconds of compile outside compile_s)
        grad_out = torch.randn_like(getattr(module, "_orig_mod", module)(x))

    def call() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(grad_out)

    return call
