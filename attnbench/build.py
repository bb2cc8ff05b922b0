"""What a cell measures: its module (built from the registry, merged where it re-parameterizes,
compiled where asked) and its input, checked on the meta device before anything runs (the
implementation's ``supports``, the output contract), and counted (parameters, three FLOP counts).
:mod:`attnbench.cell` measures what these build.
"""

from __future__ import annotations

import gc
import json
import time
from typing import Any, Callable

import torch

from . import registry
from .device import TORCH_DTYPES, empty_cache, is_oom
from .job import CellSettings
from .measure import flops as flops_mod
from .measure import memory, timing
from .impls._flex import contains_flex, set_layout
from .measure.call import make_call
from .suite import Case


class Unsupported(Exception):
    """The implementation cannot take the cell (its ``supports`` gave this reason)."""



class OutputContractError(Exception):
    """The module's output is not (B, H', W', C): the cell is an ``error``, with the shapes."""



def input_shape(case: Case, batch: int) -> tuple[int, ...]:
    """The cell's input: images (batch, 3, R, R) for a whole model, else tokens (batch, grid_h, grid_w, dim)."""
    if case.model:
        return (batch, 3, case.resolution, case.resolution)
    return (batch, case.grid_h, case.grid_w, case.dim)


def module_builder(case: Case) -> Callable[[], torch.nn.Module]:
    """Builds the cell's module; in forward mode a module with ``reparameterize()`` is measured merged.
    A whole-model cell builds the timm model with its attention swapped (:mod:`attnbench.models`)."""
    device_type = torch.device(case.device).type
    if case.model:
        from .models import build_model, rules_from_json

        rules = rules_from_json(case.attention)
        merge = case.mode == "forward"
        kwargs = json.loads(case.model_kwargs) if case.model_kwargs else None
        def build_whole() -> torch.nn.Module:
            model = build_model(case.model, case.resolution, rules, merge, kwargs)[0]
            set_layout(model, device_type)
            return model

        return build_whole
    spec = registry.get_spec(case.impl)
    params = dict(case.params)
    merge = case.mode == "forward" and spec.has("reparameterize")

    def build() -> torch.nn.Module:
        module = spec.build(dim=case.dim, heads=case.heads, **params)
        module = (module.reparameterize() or module) if merge else module
        set_layout(module, device_type)  # FlexAttention forms: the token layout of the cell's device, counted too
        return module

    return build



def check_supports(case: Case, build: Callable[[], torch.nn.Module]) -> None:
    """Raise :class:`Unsupported` with the implementation's reason when it cannot take the cell's grid,
    or its device (``supports_device``: FlexAttention on CUDA needs head dimensions of 16 or more)."""
    if case.model:
        return  # the suite built the model at this size on meta: every block took its grid
    spec = registry.get_spec(case.impl)
    if spec.has("supports") or spec.has("supports_device"):
        meta = flops_mod.build_meta(build, TORCH_DTYPES[case.dtype])
        reason = meta.supports(case.grid_h, case.grid_w) if spec.has("supports") else None
        if not reason and spec.has("supports_device"):
            reason = meta.supports_device(torch.device(case.device).type)
        if reason:
            raise Unsupported(reason)



def check_output(case: Case, build: Callable[[], torch.nn.Module]) -> None:
    """Raise :class:`OutputContractError` when one forward call on the meta device (no memory, no
    arithmetic) returns anything but (batch, H', W', dim), H' x W' being ``output_size(H, W)`` where the
    class defines it, else the input's grid. A module that cannot run on meta is checked by nothing here."""
    meta = flops_mod.build_meta(build, TORCH_DTYPES[case.dtype]).eval()
    try:
        with torch.no_grad():
            y = meta(torch.empty(input_shape(case, case.batch), device="meta", dtype=TORCH_DTYPES[case.dtype]))
    except Exception:  # noqa: BLE001 - the real call will raise whatever this is
        return
    if case.model:  # a classifier: (batch, classes)
        if not (isinstance(y, torch.Tensor) and y.ndim == 2 and y.shape[0] == case.batch):
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise OutputContractError(f"{case.model} returned {got}; a whole model returns (batch, classes)")
        return
    spec = registry.get_spec(case.impl)
    grid = tuple(meta.output_size(case.grid_h, case.grid_w)) if spec.has("output_size") else (case.grid_h,
                                                                                                case.grid_w)
    expected = (case.batch, *grid, case.dim)
    got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
    if got != expected:
        raise OutputContractError(f"{case.impl} returned {got} for an input of "
                                  f"{(case.batch, case.grid_h, case.grid_w, case.dim)}; the contract is "
                                  f"(B, H', W', C) = {expected}")



def count(case: Case, build: Callable[[], torch.nn.Module]) -> dict[str, Any]:
    """Parameter count and the three FLOP counts, on the meta device (a whole model: no analytic count)."""
    dtype = TORCH_DTYPES[case.dtype]
    meta = flops_mod.build_meta(build, dtype)
    out: dict[str, Any] = {"params_count": sum(p.numel() for p in meta.parameters())}
    if case.model:
        from .models import describe_swap

        out["reparameterized"] = False
        out["model_blocks"] = describe_swap(meta)
    else:
        spec = registry.get_spec(case.impl)
        out["reparameterized"] = case.mode == "forward" and spec.has("reparameterize")
        if spec.has("flops_analytic"):
            out["flops_analytic"] = int(meta.flops_analytic(case.batch, case.grid_h, case.grid_w))
    out.update(flops_mod.count_flops(build, input_shape(case, case.batch), dtype, train=case.mode == "train"))
    return out



def random_input(case: Case, batch: int, seed: int) -> torch.Tensor:
    """The cell's input (:func:`input_shape`), standard normal from ``seed`` (never zeros)."""
    gen = torch.Generator(device=case.device).manual_seed(seed + 1)  # made where it is used, in its dtype
    return torch.randn(input_shape(case, batch), generator=gen, device=case.device, dtype=TORCH_DTYPES[case.dtype])



def find_max_batch(case: Case, module: torch.nn.Module, settings: CellSettings
                   ) -> tuple[int, list[dict[str, Any]], float]:
    """Largest batch <= ``case.batch`` whose call fits, halving on out-of-memory (CPU: the memory
    budget, estimated from one image, since an oversized CPU call swaps instead of failing).
    Returns the batch, the tries and the seconds of the first call at that batch (a compiled module's
    compilation of that shape: the cell's ``compile_s``)."""
    device = torch.device(case.device)
    limit = settings.budget.memory_fraction * memory.available_memory_bytes(device)
    batch, tries = case.batch, []
    first_call_s: dict[int, float] = {}  # batch -> its first call's seconds
    if device.type == "cpu" and batch > 1:
        x = random_input(case, 1, settings.seed)
        t0 = time.perf_counter()  # the CPU: nothing to synchronise
        per_image, _ = memory.peak_memory_bytes(make_call(module, x, case.mode), device)
        first_call_s[1] = time.perf_counter() - t0
        del x
        while batch > 1 and per_image == per_image and per_image * batch > limit:
            tries.append({"batch": batch, "fits": False, "why": "estimated memory over budget"})
            batch //= 2
    while True:
        x = None
        try:
            x = random_input(case, batch, settings.seed)
            seconds = timing.wall_s(make_call(module, x, case.mode), device)
            tries.append({"batch": batch, "fits": True})
            return batch, tries, first_call_s.get(batch, seconds)
        except Exception as exc:
            if not is_oom(exc) or batch == 1:
                raise
            tries.append({"batch": batch, "fits": False, "why": "out of memory"})
        # out of the except clause: the exception and its frames (which hold the activations) are gone
        x = None
        gc.collect()
        empty_cache(device)
        batch //= 2



COMPILED_FLEX = "compiled flex_attention"


def check_kernel_path(module: torch.nn.Module) -> None:
    """Raise :class:`Unsupported` when a FlexAttention form (the module or one inside a whole model)
    took another path on its first call than compiled flex attention (no backward on CPU, a dtype the
    compiled kernel lacks): timing it would time a different kernel under the form's name."""
    for sub in module.modules():
        path = getattr(sub, "flex_path", "")
        if path and path != COMPILED_FLEX:
            raise Unsupported(f"{type(sub).__name__} ran {path}; a FlexAttention form is timed only as compiled "
                              "flex_attention")


class CompileFallback(Exception):
    """torch.compile produced no graph for the cell (it ran eagerly): an ``error`` cell, never silent."""



def compile_module(module: torch.nn.Module) -> torch.nn.Module:
    """The module under torch.compile with a fresh dynamo cache and static shapes, so each cell compiles
    and times its own program (with one cache shared by the cells of a sweep, later resolutions were
    recompiled as dynamic shapes, and compile_s read 0.02 s)."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    return torch.compile(module, dynamic=False)



def check_compiled() -> dict[str, int]:
    """Raise :class:`CompileFallback` when the first compiled call produced no graph (dynamo fell back
    to eager, e.g. at its recompile limit); else the cell's ``compile_graphs`` and ``compile_graph_breaks``
    (dynamo's counters, cleared by :func:`compile_module`: one graph and no break is a whole-module program)
    and ``compile_cache_hits`` (graphs inductor loaded from its on-disk cache instead of compiling)."""
    import torch._dynamo

    counters = torch._dynamo.utils.counters
    graphs = counters["stats"].get("unique_graphs")
    if not graphs:
        raise CompileFallback("torch.compile compiled no graph for this cell: it ran eagerly (see torch's "
                              "recompile limit and graph breaks); the cell is not a compiled measurement")
    return {"compile_graphs": int(graphs), "compile_graph_breaks": int(sum(counters["graph_break"].values())),
            # inductor's on-disk FX graph cache: a hit makes compile_s a cache load, not a compilation
            "compile_cache_hits": int(counters["inductor"].get("fxgraph_cache_hit", 0))}


def prime_flex(module: torch.nn.Module, case: Case, seed: int) -> None:
    """Build the block masks of the FlexAttention forms in ``module`` with one eager call at batch 1 (no
    grad), before it is compiled: a mask built while dynamo traces breaks the compiled graph there, and
    the module then runs as several graphs for good (seen: 5 graphs, 3 breaks for ``local.flex``)."""
    if not contains_flex(module):
        return
    was_training = module.training
    with torch.no_grad():
        module.eval()(random_input(case, 1, seed))
    module.train(was_training)
