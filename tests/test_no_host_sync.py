"""No implementation's forward makes tensors from Python data or reads tensors back to Python.

On CUDA, ``torch.tensor([...], device=cuda)`` inside a forward builds a host tensor and copies it to
the device with a blocking copy, and ``.item()`` / ``.tolist()`` / ``bool(t)`` wait for the device to
finish: each is a host-device synchronisation inside every timed call (the CPU waits for the GPU, then
launches the rest while the GPU idles, which inflates the measured latency), and either makes CUDA
graph capture impossible.

This machine has no GPU, and on CPU such a copy never crosses devices, so the test watches the ops
that cause it instead, whatever the device: every aten op of a warm forward call (the harness's own
measured call, :func:`attnbench.measure.call.make_call` in ``forward`` mode) is recorded by a
``TorchDispatchMode``, and none may be

- ``aten.lift_fresh`` / ``aten.lift_fresh_copy``: a tensor made from Python data (``torch.tensor``,
  ``new_tensor``, ``as_tensor`` of a list); made "on" a CUDA device, it is a host->device copy;
- ``aten._local_scalar_dense``: a tensor read back to Python (``.item()``, ``.tolist()``, ``bool(t)``,
  ``int(t)``, ``float(t)``); on CUDA, a device->host copy that waits for the device.

The first call is a warm-up (an implementation may build and cache constants then); only the second
is checked.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnbench
from attnbench import registry
from attnbench.measure.call import make_call

FORBIDDEN = {
    "aten.lift_fresh.default": "a tensor made from Python data (torch.tensor(...)): a host->device copy on CUDA",
    "aten.lift_fresh_copy.default": "a tensor made from Python data (torch.tensor(...)): a host->device copy on CUDA",
    "aten._local_scalar_dense.default": "a tensor read back to Python (.item(), .tolist(), bool(t)): "
                                        "a device->host sync on CUDA",
}

# The package's own implementations (plugins registered by other test modules are not: which of them
# are there depends on what else was collected). The flex forms are left out: on CPU their forward
# goes through torch.compile (flex_attention), which takes far longer than this file's budget, and
# their compiled call is a different path (dispatch of the compiled graph) that a dispatch spy does
# not see op by op anyway.
NAMES = sorted(name for name, spec in registry.specs().items()
               if spec.cls.__module__.startswith("attnbench.impls.") and "flex" not in name)


class OpSpy(TorchDispatchMode):
    """Records the name of every aten op dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def build(name):
    """The module at the shape test_registry's contract test uses (dim 48, 3 heads; 4 for designs
    that refuse odd head counts), its own parameter defaults, float32 on CPU."""
    try:
        return attnbench.create(name, dim=48, heads=3)
    except ValueError:  # a design that refuses odd head counts (cswin.cross)
        return attnbench.create(name, dim=48, heads=4)


def test_names_cover_the_builtins():
    assert {"deform.dat", "deform.msda", "mha.sdpa"} <= set(NAMES)
    assert len(NAMES) >= 15


@pytest.mark.parametrize("name", NAMES)
def test_forward_has_no_host_data_and_no_host_reads(name):
    module = build(name)
    x = torch.randn(2, 16, 12, 48, generator=torch.Generator().manual_seed(0))
    call = make_call(module, x, "forward")  # eval(), then module(x) under inference_mode
    call()  # warm-up: caches may be built here
    spy = OpSpy()
    with spy:
        call()
    assert spy.ops, f"{name}: no aten op recorded (the spy saw nothing)"
    bad = sorted({op for op in spy.ops if op in FORBIDDEN})
    assert not bad, f"{name}: its warm forward runs " + "; ".join(f"{op} ({FORBIDDEN[op]})" for op in bad)
