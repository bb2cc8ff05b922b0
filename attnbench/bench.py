"""Attention benchmarks as pytest tests, through pytest-benchmark's ``benchmark`` fixture.

For teams that already gate on pytest-benchmark (``--benchmark-autosave``, ``--benchmark-compare``,
``--benchmark-compare-fail``)::

    import pytest
    from attnbench.bench import bench_attention

    @pytest.mark.parametrize("impl,params", [("mha.sdpa", {}), ("sra.conv", {"sr_ratio": 8})])
    def test_attention(benchmark, impl, params):
        bench_attention(benchmark, impl, resolution=224, params=params, device="auto")

**Synchronised timing.** CUDA kernels run asynchronously: a timer read right after the Python
call returns measures the launch, not the work. :func:`bench_attention` times a call that waits for
the device before returning (``torch.cuda.synchronize``), and its ``setup`` (run before each
round, untimed) overwrites a buffer larger than the L2 cache and synchronises, so each round starts
with an idle device and a cold cache, as ``attnbench run`` does. It uses ``benchmark.pedantic``
with fixed ``rounds`` (one call per round), so the number of calls does not depend on the
calibration of fast functions. For your own ``benchmark(fn)`` calls on the GPU, pass
``--benchmark-timer attnbench.bench.synchronized_timer``: that timer synchronises the device
before it reads the clock, at the start and at the end of each timed block.

On CPU the calls are synchronous; nothing changes there. The CPU thread count is torch's
(``torch.set_num_threads``), as in a run. Each benchmark's ``extra_info`` records the cell
(implementation, parameters, shape, dtype, mode, device, analytic FLOPs, parameter count), so
``--benchmark-json`` output says what was measured; the default ``group`` is the shape, so
pytest-benchmark's table compares implementations at equal shapes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import registry
from .errors import AttnbenchError, UnsupportedCaseError


class BenchSetupError(AttnbenchError):
    """A benchmark that cannot be set up (shape, dtype or device)."""


def synchronized_timer() -> float:
    """``time.perf_counter()`` read after every queued CUDA kernel has finished.

    Use as ``pytest --benchmark-timer attnbench.bench.synchronized_timer`` so that plain
    ``benchmark(fn)`` calls time GPU work, not its launch. Without CUDA it is ``perf_counter``.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


@dataclass
class AttentionCall:
    """One attention call ready to time: calling it runs the module once and waits for the device."""

    fn: Callable[[], None]
    setup: Callable[[], None]
    module: torch.nn.Module
    x: torch.Tensor
    device: torch.device
    info: dict[str, Any] = field(default_factory=dict)

    def __call__(self) -> None:
        self.fn()


def attention_call(impl: str, resolution: int = 224, *, patch: int = 4, dim: int = 96, heads: int = 3,
                   batch: int = 1, dtype: str = "float32", mode: str = "forward", device: str = "auto",
                   params: dict[str, Any] | None = None, seed: int = 0, l2_flush: bool = True) -> AttentionCall:
    """Build ``impl`` and a random (batch, resolution/patch, resolution/patch, dim) input, as a run would.

    ``mode`` "forward" (inference mode) or "train" (forward + backward, gradients cleared first);
    ``dtype`` float32, float16, bfloat16 or "auto" (bfloat16 on CUDA, float32 on CPU); ``device``
    auto, cpu, cuda or cuda:N. A module with ``reparameterize()`` is measured merged in forward
    mode. Raises :class:`BenchSetupError`, :class:`attnbench.UnknownImplError`,
    :class:`attnbench.ParamError` or :class:`attnbench.UnsupportedCaseError` on bad input.
    """
    from .build import Unsupported, check_supports, module_builder, random_input
    from .measure.call import make_call
    from .device import TORCH_DTYPES, resolve_device, resolve_dtypes
    from .errors import SuiteError
    from .measure import timing
    from .suite import parse_suite

    params = dict(params or {})
    registry.check_params(registry.get_spec(impl), params)  # UnknownImplError / ParamError, as documented
    dev = resolve_device(device)
    dtypes = resolve_dtypes([dtype], dev)
    try:  # the suite's own validation: one cell, checked as a suite's would be
        suite = parse_suite({"name": "bench", "device": str(dev), "dtype": dtypes, "mode": mode, "batch": batch,
                             "dim": dim, "heads": heads, "patch": patch, "resolution": resolution,
                             "impls": [{impl: params}], "seed": seed})
    except SuiteError as exc:
        raise BenchSetupError(str(exc).replace("<suite>: ", "", 1)) from None
    case = suite.cases(str(dev), dtypes)[0]
    build = module_builder(case)
    try:
        check_supports(case, build)
    except Unsupported as exc:
        raise UnsupportedCaseError(f"{case.label} cannot take a {case.grid_h}x{case.grid_w} grid: {exc}") from None
    torch.manual_seed(seed)
    module = build().to(device=dev, dtype=TORCH_DTYPES[case.dtype])
    x = random_input(case, batch, seed)
    call = make_call(module, x, mode)
    flush = timing.l2_flusher(dev) if l2_flush else None

    def fn() -> None:
        call()
        timing.synchronize(dev)

    def setup() -> None:
        if flush is not None:
            flush()
        timing.synchronize(dev)

    info = {"attnbench_impl": impl, "label": case.label, "params": params, "resolution": resolution, "patch": patch,
            "tokens": case.tokens, "batch": batch, "dim": dim, "heads": heads, "dtype": case.dtype, "mode": mode,
            "device": str(dev), "cell_id": case.cell_id, "params_count": sum(p.numel() for p in module.parameters()),
            "cpu_threads": torch.get_num_threads(), "l2_flush": flush is not None}
    if registry.get_spec(impl).has("flops_analytic"):
        info["flops_analytic"] = int(module.flops_analytic(batch, case.grid_h, case.grid_w))
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    return AttentionCall(fn=fn, setup=setup, module=module, x=x, device=dev, info=info)


def bench_attention(benchmark: Any, impl: str, resolution: int = 224, *, rounds: int = 20, warmup_rounds: int = 3,
                    group: str | None = None, **kwargs: Any) -> AttentionCall:
    """Time one attention call with pytest-benchmark's ``benchmark`` fixture; return the call.

    ``rounds`` timed calls after ``warmup_rounds`` untimed ones, each preceded by the untimed
    ``setup`` (L2 flush on GPU, device synchronised); every timed call waits for the device.
    Other keyword arguments go to :func:`attention_call`.
    """
    call = attention_call(impl, resolution, **kwargs)
    benchmark.extra_info.update(call.info)
    if group is not None or getattr(benchmark, "group", None) is None:
        i = call.info
        benchmark.group = group or (f"{i['resolution']}px b{i['batch']} d{i['dim']}h{i['heads']} "
                                    f"{i['dtype']} {i['mode']} {i['device']}")
    benchmark.pedantic(call.fn, setup=call.setup, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    return call
