"""Measure one cell: build, count, time, memory, telemetry, derived columns. Never raises for a cell.

:func:`measure_cell` takes a :class:`attnbench.job.Job` and returns the cell's row. Its phases, in
order, each a function below:

1. :func:`base_row`, :func:`check_supports` (the implementation's ``supports``) and
   :func:`check_output` (the output contract), both on the meta device;
2. build the module on the device (:func:`module_builder`), :func:`find_max_batch` when asked;
3. :func:`count` (parameters and the three FLOP counts, on the meta device), :func:`predict_memory`
   and :func:`check_memory` (the call's peak memory traced on meta, against the memory budget) and
   :func:`check_prediction` (the budget rule, from the series' previous cell);
4. the input (:func:`random_input`) and the measured call (:func:`make_call`);
5. :func:`measure_latency`: the first call alone (with compile: the compilation), warm-up by time,
   the peak memory of one call, then the timed calls;
6. :func:`derived` columns, then teardown, telemetry and the time accounting.

A failure becomes the row's status (:func:`failure_columns`): ``over_budget``, ``unsupported``,
``oom`` or ``error`` (traceback appended to ``errors.log``).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from . import budget, registry
from .device import (TORCH_DTYPES, apply_globals, dtype_problem, empty_cache, is_backend_refusal, is_oom, sdpa_context,
                     tf32_enabled)
from .job import CellSettings, Job
from .build import (Unsupported, check_compiled, check_kernel_path, check_output, check_supports, compile_module, count,
                    find_max_batch, input_shape, module_builder, prime_flex, random_input)
from .impls._flex import contains_flex
from .context import CellContext, device_speed_columns, drift_columns, telemetry_columns
from .measure import cpuload, memory, predict, timing
from .measure import telemetry as telemetry_mod
from .measure.call import make_call
from .measure import flops as flops_mod
from .measurement import Latency
from .schema import DTYPE_BYTES, SCHEMA_VERSION, SKIPPED_PREFIX, Status
from .suite import Case


CALLS_BEFORE_TIMING = 3  # the first call, at least one warm-up call, the peak-memory call


class OverBudget(Exception):
    """The cell was predicted or found to exceed its time or memory budget."""


# ------------------------------------------------------------------------------ building and counting


def base_row(case: Case) -> dict[str, Any]:
    """The identity columns of a cell's row, status ``ok`` until something fails."""
    return {
        "impl": case.impl, "label": case.label, "family": case.family, "resolution": case.resolution,
        "patch": case.patch, "shape": case.shape, "tokens": case.tokens, "grid_h": case.grid_h, "grid_w": case.grid_w,
        "batch": case.batch, "dim": case.dim, "heads": case.heads, "dtype": case.dtype, "mode": case.mode,
        "device": case.device, "params": dict(case.params), "status": Status.OK.value, "message": "",
        "model": case.model, "attention": case.attention, "model_kwargs": case.model_kwargs, "cell_id": case.cell_id,
        "cpu_threads": torch.get_num_threads(), "schema_version": SCHEMA_VERSION,
    }


def predict_memory(case: Case, build: Callable[[], torch.nn.Module], settings: CellSettings) -> dict[str, Any]:
    """The peak memory one call will take, traced on the meta device before anything is allocated
    (:mod:`attnbench.measure.predict`): ``peak_mem_predicted_bytes``, or why it could not be predicted."""
    shape = input_shape(case, case.batch)
    with sdpa_context(settings.sdpa_backend):
        predicted, why = predict.try_predict_peak_bytes(build, shape, TORCH_DTYPES[case.dtype], case.mode)
    return {"peak_mem_predicted_bytes": predicted} if predicted is not None else {"predict_message": why}


def check_memory(case: Case, row: dict[str, Any], settings: CellSettings) -> None:
    """Raise :class:`OverBudget` when the predicted peak, with the weights and the input held, exceeds
    ``budget.memory_fraction`` of the memory available now (free device memory on CUDA)."""
    predicted = row.get("peak_mem_predicted_bytes")
    if predicted is None:
        return
    held = DTYPE_BYTES[case.dtype] * (row.get("params_count", 0) + math.prod(input_shape(case, case.batch)))
    device = torch.device(case.device)
    limit = settings.budget.memory_fraction * memory.available_memory_bytes(device)
    if predicted + held > limit:
        raise OverBudget(f"predicted peak memory {(predicted + held) / 2**30:.3g} GiB (traced on the meta device) "
                         f"exceeds the memory budget {limit / 2**30:.3g} GiB ({settings.budget.memory_fraction:g} of "
                         f"the memory available)")


def check_prediction(case: Case, row: dict[str, Any], prior: budget.Prior, settings: CellSettings) -> None:
    """Raise :class:`OverBudget` when the previous cell of the series predicts this one will not fit."""
    flops_now = budget.cell_flops(row)
    problem = budget.time_problem(prior, math.nan if flops_now is None else flops_now,
                                  CALLS_BEFORE_TIMING + settings.timing.min_repeats, settings.budget.cell_time_s)
    device = torch.device(case.device)
    if problem is None and device.type == "cpu":
        limit = settings.budget.memory_fraction * memory.available_memory_bytes(device)
        problem = budget.memory_problem(prior, case.tokens, limit)
    if problem:
        raise OverBudget(problem)


# ------------------------------------------------------------------------------------------ timing


_wall = timing.wall_s


def measure_latency(call: Callable[[], None], case: Case, settings: CellSettings, ctx: CellContext,
                    row: dict[str, Any], clear_grads: Callable[[], None],
                    after_first: Callable[[], None] = lambda: None, compiled_s: float | None = None,
                    compiles: bool | None = None) -> Latency:
    """First call (then ``after_first``, which may raise), warm-up, peak memory of one call, timed calls;
    the non-latency columns go to ``row``. ``compiled_s``: the compiled module's first call of this shape
    was made already (by the largest-batch search) and took this long, the compilation; it is compile_s.
    ``compiles``: the first call of this shape compiles (default: the suite's ``compile``; also a module
    that compiles inside, a FlexAttention form), so it is ``compile_s`` and not held against the budget."""
    device, tm, budget_s = ctx.device, settings.timing, settings.budget.cell_time_s
    compiles = settings.compile if compiles is None else compiles
    # 1. the first call, alone (with compile: the compilation, unless the batch search made it); too slow
    # already -> over budget
    first_s = _wall(call, device)
    after_first()
    if compiles:
        row["compile_s"] = first_s if compiled_s is None else compiled_s
        if settings.compile:
            row.update(check_compiled())
        if compiled_s is None:  # that call compiled: time an ordinary one for the budget check
            first_s = _wall(call, device)
    t_start = time.perf_counter() - first_s
    if first_s * 2 > budget_s:
        raise OverBudget(f"the first call took {budget.time_text(first_s, 's')}, over half the cell budget of "
                         f"{budget_s:g} s")
    # 2. warm-up by time
    warm = timing.time_calls(call, device, 1)
    while sum(warm) / 1e3 < tm.warmup_s:
        warm += timing.time_calls(call, device, max(1, len(warm)))
    row["warmup_calls"] = 1 + len(warm)
    # 3. peak memory of one call, above what is held before it (stale gradients dropped first)
    clear_grads()
    row["peak_mem_bytes"], row["peak_mem_method"] = memory.peak_memory_bytes(call, device)
    # 4. the timed calls: CUDA events (L2 flushed before each), graph replays, or perf_counter
    timed, method = call, "perf_counter" if device.type == "cpu" else "cuda_events"
    if tm.cuda_graph and device.type == "cuda":
        if case.mode == "forward":
            timed, method = timing.graph_or_events(call, device)  # a capture that fails falls back to events
        else:
            row["message"] = "cuda_graph: not used in train mode (timed with CUDA events)"
    row.update(timing_method=method, l2_flush=ctx.flush is not None)
    est_s = sorted(warm)[len(warm) // 2] / 1e3
    flush_s = _wall(ctx.flush, device) if ctx.flush is not None else 0.0  # one flush, counted in the budget
    remaining_s = budget_s - (time.perf_counter() - t_start)
    n = timing.plan_repeats(est_s, tm.target_s, tm.min_repeats, tm.max_repeats, remaining_s,
                            min_sample_s=tm.min_sample_s, overhead_s=flush_s)
    if n is None:
        raise OverBudget(f"{tm.min_repeats} calls of {budget.time_text(est_s)} exceed the {remaining_s:.3g} s "
                         f"left of the cell budget of {budget_s:g} s")
    load = cpuload.read() if device.type == "cpu" else None
    with telemetry_mod.sampling(ctx.telemetry, interval_s=0.01) as gpu_load:  # GPU state under load
        samples = timing.time_calls(timed, device, n, flush=ctx.flush)
    ctx.load_summary = gpu_load.summary
    if load is not None:  # how much of the machine other processes took while the calls were timed
        row["cpu_others_cores"] = cpuload.others_cores(load, cpuload.read())
    if device.type == "cuda" and tm.steady_s > 0:  # 5. steady state: back to back, no flush (GPU)
        row.update(steady_state(timed, device, samples, est_s, min(tm.steady_s, budget_s - (time.perf_counter()
                                                                                          - t_start))))
    return Latency(tuple(samples), method, ctx.flush is not None)


def steady_state(timed: Callable[[], None], device: torch.device, samples: list[float], est_s: float,
                 total_s: float) -> dict[str, Any]:
    """Blocks of back-to-back calls without flush or synchronisation (what timm's benchmark and a training
    loop see), beside the flushed per-call times (cold cache, as do_bench); ``launch_bound`` where the
    steady time is more than 20% above the flushed median: the CPU's launches set the pace."""
    median_ms = Latency(tuple(samples)).median  # the row's latency_ms_median (an even count: the middle two's mean)
    per_block = timing.steady_calls(max(est_s, median_ms / 1e3), total_s)
    if per_block is None:
        return {}
    steady = timing.time_steady(timed, device, per_block)
    steady_ms = Latency(tuple(steady)).median
    return {"latency_steady_ms_median": steady_ms, "latency_steady_ms_samples": steady, "steady_calls": per_block,
            "launch_bound": timing.launch_bound(median_ms, steady_ms)}


# ----------------------------------------------------------------------------------- derived columns


def derived(case: Case, row: dict[str, Any], ctx: CellContext) -> dict[str, Any]:
    """Throughput, achieved TFLOP/s and the fraction of the device's measured matmul peak. A cell faster
    than the peak makes the peak be measured again (the larger is kept, for the rest of the run too);
    a cell still above it is flagged ``over_peak``, never silently reported above 1."""
    sec = row["latency_ms_median"] / 1e3
    out: dict[str, Any] = {"throughput_img_s": case.batch / sec if sec > 0 else math.nan,
                           "throughput_tok_s": case.batch * case.tokens / sec if sec > 0 else math.nan}
    source = "flops_torch_fwd_bwd" if case.mode == "train" else "flops_torch"
    flops = row.get(source)
    if (flops is None or flops != flops) and case.mode == "forward":
        source, flops = "flops_analytic", row.get("flops_analytic")
    if flops is None or flops != flops:  # train mode without torch's count: no forward-only stand-in
        source, flops = "", None
    achieved = flops / sec / 1e12 if flops and sec > 0 else math.nan
    out["tflops_achieved"], out["tflops_count"] = achieved, source
    peak = ctx.peak_tflops(case.dtype)
    if peak is not None and achieved > peak:
        peak = ctx.refresh_peak(case.dtype)
    out["peak_tflops"] = peak if peak is not None else math.nan
    out["peak_fraction"] = achieved / peak if peak else math.nan
    out["over_peak"] = bool(peak and achieved > peak)
    return out


def failure_columns(exc: Exception, job: Job) -> dict[str, Any]:
    """The status and message of a cell that raised; an unexpected error's traceback goes to the errors log."""
    if isinstance(exc, OverBudget):
        return {"status": Status.OVER_BUDGET.value, "message": str(exc)}
    if isinstance(exc, Unsupported):
        return {"status": Status.UNSUPPORTED.value, "message": str(exc)}
    text = str(exc).splitlines()[0][:300] if str(exc) else ""
    if is_oom(exc):
        return {"status": Status.OOM.value, "message": f"{type(exc).__name__}: {text}"}
    if is_backend_refusal(exc):
        return {"status": Status.UNSUPPORTED.value, "message": f"sdpa_backend {job.settings.sdpa_backend}: {text}"}
    if job.errors_log is not None:
        case = job.case
        with open(job.errors_log, "a") as f:
            f.write(f"=== {case.label} resolution={case.resolution} cell_id={case.cell_id}\n")
            f.write(traceback.format_exc() + "\n")
    return {"status": Status.ERROR.value, "message": f"{type(exc).__name__}: {text}"}


# ------------------------------------------------------------------------------------------- the cell


def measure_cell(job: Job, ctx: CellContext | None = None) -> dict[str, Any]:
    """Measure one cell and return its row (never raises for a failing cell)."""
    t_cell = time.perf_counter()
    case, settings = job.case, job.settings
    device = torch.device(case.device)
    ctx = ctx or CellContext.create(settings, device, job.peaks, job.sentinel_start)
    row = base_row(case)
    cuda = device.type == "cuda"
    row.update(sdpa_backend=settings.sdpa_backend, compiled=settings.compile,
               tf32=tf32_enabled("matmul") if cuda else None, tf32_cudnn=tf32_enabled("cudnn") if cuda else None)
    before = ctx.snapshot()
    ctx.load_summary = None
    module = x = call = t_measure = None
    readings: list[float] = []  # the sentinel's TFLOP/s before and after the timed calls
    compiled_s = None  # with the largest-batch search: its first call of the found shape (the compilation)
    try:
        problem = dtype_problem(case.dtype, device)  # a pool's worker probes its own GPU (the driver did not)
        if problem:
            raise Unsupported(problem)
        build = module_builder(case)
        check_supports(case, build)
        check_output(case, build)
        torch.manual_seed(settings.seed)
        module = build().to(device=device, dtype=TORCH_DTYPES[case.dtype])
        if settings.compile:
            prime_flex(module, case, settings.seed)  # a flex form's block mask built inside the trace breaks it
            module = compile_module(module)
        compiles = settings.compile or contains_flex(module)
        if settings.find_max_batch:  # in the context the cell is measured in: the pinned backend, compiled
            with sdpa_context(settings.sdpa_backend):
                batch, tries, first_call_s = find_max_batch(case, module, settings)
            compiled_s = first_call_s if compiles else None
            row.update(batch=batch, batch_requested=case.batch, batch_search=tries)
            case = dataclasses.replace(case, batch=batch)
        row.update(count(case, build))
        if not settings.find_max_batch:
            row.update(predict_memory(case, build, settings))
            check_memory(case, row, settings)
            if job.prior is not None:
                check_prediction(case, row, job.prior, settings)
        x = random_input(case, case.batch, settings.seed)
        if row.get("macs_fvcore") != row.get("macs_fvcore"):  # NaN: fvcore could not trace on meta
            row.update(flops_mod.count_fvcore(getattr(module, "_orig_mod", module).eval(), x))
        call = make_call(module, x, case.mode)

        def clear_grads() -> None:
            if case.mode == "train":
                module.zero_grad(set_to_none=True)
                x.grad = None

        if ctx.sentinel_start:
            readings.append(ctx.sentinel())
        t_measure = time.perf_counter()
        with sdpa_context(settings.sdpa_backend):
            latency = measure_latency(call, case, settings, ctx, row, clear_grads,
                                      after_first=lambda: check_kernel_path(module), compiled_s=compiled_s,
                                      compiles=compiles)
        row["measure_s"] = time.perf_counter() - t_measure
        if ctx.sentinel_start:
            readings.append(ctx.sentinel())
        row.update(latency.columns())
        row.update(derived(case, row, ctx))
    except Exception as exc:  # one failing cell never ends the sweep
        row.update(failure_columns(exc, job))
        if isinstance(exc, OverBudget) and t_measure is not None:
            row["measure_s"] = time.perf_counter() - t_measure
    finally:
        module = x = call = None  # the cell's tensors, freed before the next cell
        gc.collect()
        empty_cache(device)
        row.update(telemetry_columns(before, ctx.snapshot(), under_load=ctx.load_summary))
        if readings:
            row.update(device_speed_columns(readings, ctx.sentinel_best))
        row.update(drift_columns(row))
        row["cell_wall_s"] = time.perf_counter() - t_cell
        row["harness_s"] = row["cell_wall_s"] - row.get("measure_s", 0.0)
    return row


def skipped_row(case: Case, status: Status | str, message: str) -> dict[str, Any]:
    """The row of a cell not tried (a smaller cell of its series failed, or its dtype cannot run);
    its FLOPs are still counted."""
    row = base_row(case)
    row.update(status=str(status), message=message)
    try:
        row.update(count(case, module_builder(case)))
    except Exception as exc:
        row["count_message"] = f"{type(exc).__name__}: {exc}"
    return row


def blocked_message(resolution: int, status: str) -> str:
    return f"{SKIPPED_PREFIX} resolution {resolution} was {status}"


def prepare_process(job: Job, loaded: set[str] | None = None) -> None:
    """Make this process ready for ``job``: load its plugins (those not already in ``loaded``, which is
    updated) and apply the process-wide settings the parent applies (threads, TF32, current device)."""
    for path in job.plugins:
        if loaded is None or path not in loaded:
            registry.load_plugin_file(Path(path))
            if loaded is not None:
                loaded.add(path)
    apply_globals(job.settings.threads, job.settings.tf32, torch.device(job.case.device))


def run_job(job: Job) -> dict[str, Any]:
    """A worker's entry: apply the job's process-wide settings, load its plugins, measure the cell."""
    prepare_process(job)
    gc.freeze()  # as in the in-process runner: the cell's final gc.collect() scans only its own objects
    return measure_cell(job)
