"""Execute a suite: one measured row per cell, appended to the run folder as each cell ends.

Time accounting: a row's ``measure_s`` is the time spent inside the implementation's calls (first
call, warm-up, peak-memory call, timed calls); its ``harness_s`` is the rest of its ``cell_wall_s``
(building the module, counting FLOPs, telemetry, freeing memory). ``run.jsonl`` sums them per session.

Statuses: ``ok``; ``oom`` (out of memory); ``over_budget`` (predicted or found to exceed the cell's
time or memory budget); ``unsupported`` (the implementation's ``supports`` check gave a reason, the
device cannot run the dtype, or a pinned SDPA backend cannot take the cell); ``error`` (any other
exception; its traceback goes to ``errors.log``); with ``isolation: process`` also ``timeout`` (the
worker was killed at ``budget.cell_timeout_s``) and ``crashed`` (the worker died). Within a series
(one curve: same implementation, parameters, batch, dim, heads, dtype, mode), once a cell is
``oom``, ``over_budget`` or ``timeout`` every larger resolution gets that status without being tried.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fnmatch
import gc
import json
import math
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from . import registry, store
from .errors import DeviceError, RunDirError, SuiteError
from .measure import flops as flops_mod
from .measure import memory, timing
from .measure import peaks as peaks_mod
from .measure import telemetry as telemetry_mod
from .measure.env import collect_env
from .measure.telemetry import Telemetry
from .isolate import measure_in_worker
from .suite import Case, Suite, SuiteModel, load_suite

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SKIP_STATUSES = ("oom", "over_budget", "timeout")


def resolve_device(requested: str) -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cuda`` without one is a DeviceError."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(requested)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {requested!r} was asked for, but torch sees no CUDA device "
                              f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {requested!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    return dev


def resolve_dtypes(names: list[str], device: torch.device) -> list[str]:
    """``auto`` -> bfloat16 on CUDA, float32 on CPU; duplicates dropped, order kept."""
    out = []
    for n in names:
        n = ("bfloat16" if device.type == "cuda" else "float32") if n == "auto" else n
        if n not in out:
            out.append(n)
    return out


_dtype_problems: dict[tuple[str, str], str | None] = {}


def dtype_problem(name: str, device: torch.device) -> str | None:
    """Why ``device`` cannot run dtype ``name`` (None when it can): a tiny matmul in that dtype decides."""
    key = (name, str(device))
    if key not in _dtype_problems:
        problem = None
        if device.type == "cuda" and name == "bfloat16" and not torch.cuda.is_bf16_supported():
            problem = f"bfloat16 is not supported by {torch.cuda.get_device_name(device)}"
        else:
            try:
                a = torch.ones(4, 4, device=device, dtype=DTYPES[name])
                (a @ a).sum().item()
            except RuntimeError as exc:
                problem = f"{name} cannot run on {device}: {str(exc).splitlines()[0]}"
        _dtype_problems[key] = problem
    return _dtype_problems[key]


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in text or "can't allocate memory" in text or isinstance(exc, MemoryError))


@dataclass
class _Prior:
    """The last measured cell of a series: the basis for predicting the next one."""

    resolution: int
    tokens: int
    flops: float
    latency_ms: float
    peak_mem_bytes: float


class _OverBudget(Exception):
    pass


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
    with torch.no_grad():
        grad_out = torch.randn_like(module(x))

    def call() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(grad_out)

    return call


def _wall(fn: Callable[[], None], device: torch.device) -> float:
    timing.synchronize(device)
    t0 = time.perf_counter()
    fn()
    timing.synchronize(device)
    return time.perf_counter() - t0


@dataclass
class RunContext:
    """What every cell of a run shares: the L2 flusher, the GPU telemetry, the device's measured peaks."""

    device: torch.device
    flush: Callable[[], object] | None = None
    telemetry: Telemetry | None = None
    peaks: dict[str, Any] | None = None
    sentinel_start: float | None = None  # the sentinel's TFLOP/s at the start of the run (None: off)

    @classmethod
    def create(cls, settings: SuiteModel, device: torch.device, peaks: dict[str, Any] | None = None,
               sentinel_start: float | None = None) -> "RunContext":
        """``sentinel_start``: the run's reference speed when it is already known (isolated workers)."""
        if not settings.timing.sentinel:
            sentinel_start = None
        elif sentinel_start is None:
            sentinel_start = peaks_mod.sentinel_tflops(device)
        flush = timing.l2_flusher(device) if settings.timing.l2_flush else None
        index = uuid = None
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        return cls(device=device, flush=flush, telemetry=Telemetry(index, str(uuid) if uuid else None), peaks=peaks,
                   sentinel_start=sentinel_start)


SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "math": "MATH"}


def _sdpa_context(name: str):
    """Pin F.scaled_dot_product_attention to one backend (``auto``: torch chooses)."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[name]))


def random_input(case: Case, batch: int, seed: int) -> torch.Tensor:
    """The cell's input, (batch, grid_h, grid_w, dim), standard normal from ``seed`` (never zeros)."""
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    x = torch.randn(batch, case.grid_h, case.grid_w, case.dim, generator=gen)  # never zeros
    return x.to(device=case.device, dtype=DTYPES[case.dtype])


def _find_max_batch(case: Case, module: torch.nn.Module, settings: SuiteModel, row: dict[str, Any]) -> int:
    """Largest batch <= ``case.batch`` whose call fits, halving on out-of-memory (CPU: the memory budget)."""
    device = torch.device(case.device)
    limit = settings.budget.memory_fraction * memory.available_memory_bytes(device)
    batch, tries = case.batch, []
    if device.type == "cpu":  # an over-large CPU call swaps or is killed instead of raising: estimate first
        x = random_input(case, 1, settings.seed)
        per_image, _ = memory.peak_memory_bytes(make_call(module, x, case.mode), device)
        del x
        while batch > 1 and per_image == per_image and per_image * batch > limit:
            tries.append({"batch": batch, "fits": False, "why": "estimated memory over budget"})
            batch //= 2
    while True:
        try:
            x = random_input(case, batch, settings.seed)
            make_call(module, x, case.mode)()
            del x
            tries.append({"batch": batch, "fits": True})
            break
        except Exception as exc:
            if not _is_oom(exc) or batch == 1:
                raise
            tries.append({"batch": batch, "fits": False, "why": "out of memory"})
            x = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            batch //= 2
    row.update(batch=batch, batch_requested=case.batch, batch_search=tries)
    return batch


def measure_case(case: Case, settings: SuiteModel, prior: _Prior | None = None,
                 errors_log: Path | None = None, ctx: RunContext | None = None) -> dict[str, Any]:
    """Measure one cell and return its row (never raises for a failing cell)."""
    t_cell = time.perf_counter()
    device, dtype = torch.device(case.device), DTYPES[case.dtype]
    ctx = ctx or RunContext.create(settings, device)
    tm, budget_s = settings.timing, settings.budget.cell_time_s
    row = _base_row(case)
    row.update(sdpa_backend=settings.sdpa_backend, compiled=settings.compile,
               tf32=torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None)
    before = ctx.telemetry.snapshot() if ctx.telemetry else {"available": False}
    module = x = call = t_measure = None
    speeds: list[float] = []  # the sentinel's speed before and after the timed calls / its speed at the run's start
    try:
        build = module_builder(case)
        meta = flops_mod.build_meta(build, dtype)
        reason = meta.supports(case.grid_h, case.grid_w) if hasattr(meta, "supports") else None
        if reason:
            row.update(status="unsupported", message=reason)
            return row
        del meta
        torch.manual_seed(settings.seed)
        module = build().to(device=device, dtype=dtype)
        if settings.find_max_batch:
            case = dataclasses.replace(case, batch=_find_max_batch(case, module, settings, row))
        _count(case, row, flops_mod.build_meta(build, dtype), build)
        if prior is not None and not settings.find_max_batch:
            _check_prediction(case, row, prior, settings)
        x = random_input(case, case.batch, settings.seed)
        if row.get("macs_fvcore") != row.get("macs_fvcore"):  # NaN: fvcore could not trace on meta
            row.update(flops_mod.count_fvcore(module.eval(), x))
        if settings.compile:
            module = torch.compile(module)
        call = make_call(module, x, case.mode)
        if ctx.sentinel_start:  # the device's speed before the cell, relative to the start of the run
            speeds.append(peaks_mod.sentinel_tflops(device) / ctx.sentinel_start)
        t_measure = time.perf_counter()
        with _sdpa_context(settings.sdpa_backend):
            # 1. first call, alone (with compile: the compilation); too slow already -> over budget
            first_s = _wall(call, device)
            if settings.compile:
                row["compile_s"] = first_s
                first_s = _wall(call, device)
            t_start = time.perf_counter() - first_s
            if first_s * 2 > budget_s:
                raise _OverBudget(f"the first call took {first_s:.3g} s, over half the cell budget of {budget_s:g} s")
            # 2. warm-up by time
            warm = timing.time_calls(call, device, 1)
            while sum(warm) / 1e3 < tm.warmup_s:
                warm += timing.time_calls(call, device, max(1, len(warm)))
            row["warmup_calls"] = 1 + len(warm)
            # 3. peak memory of one call, above what is held before it (stale gradients dropped first)
            if case.mode == "train":
                module.zero_grad(set_to_none=True)
                x.grad = None
            row["peak_mem_bytes"], row["peak_mem_method"] = memory.peak_memory_bytes(call, device)
            # 4. the timed calls: CUDA events (L2 flushed before each), graph replays, or perf_counter
            timed, flush, method = call, ctx.flush, "perf_counter" if device.type == "cpu" else "cuda_events"
            if tm.cuda_graph and device.type == "cuda":
                if case.mode == "forward":
                    timed, method = timing.capture_graph(call, device), "cuda_graph_replay"
                else:
                    row["message"] = "cuda_graph: not used in train mode (timed with CUDA events)"
            row["timing_method"] = method
            row["l2_flush"] = flush is not None
            est_s = sorted(warm)[len(warm) // 2] / 1e3
            remaining_s = budget_s - (time.perf_counter() - t_start)
            n = timing.plan_repeats(est_s, tm.target_s, tm.min_repeats, tm.max_repeats, remaining_s)
            if n is None:
                raise _OverBudget(f"{tm.min_repeats} calls of {est_s * 1e3:.3g} ms exceed the {remaining_s:.3g} s "
                                  f"left of the cell budget of {budget_s:g} s")
            samples = timing.time_calls(timed, device, n, flush=flush)
        row["measure_s"] = time.perf_counter() - t_measure
        if ctx.sentinel_start:  # ... and after it
            speeds.append(peaks_mod.sentinel_tflops(device) / ctx.sentinel_start)
        row.update(timing.summarize(samples))
        row["latency_ms_samples"] = samples
        row.update(_derived(case, row, ctx.peaks))
    except _OverBudget as exc:
        row.update(status="over_budget", message=str(exc))
        if t_measure is not None:
            row["measure_s"] = time.perf_counter() - t_measure
    except Exception as exc:  # one failing cell never ends the sweep
        text = str(exc).splitlines()[0][:300] if str(exc) else ""
        if _is_oom(exc):
            row.update(status="oom", message=f"{type(exc).__name__}: {text}")
        elif "No available kernel" in str(exc) or "No viable backend" in str(exc):  # pinned SDPA backend
            row.update(status="unsupported", message=f"sdpa_backend {settings.sdpa_backend}: {text}")
        else:
            row.update(status="error", message=f"{type(exc).__name__}: {text}")
            if errors_log is not None:
                with open(errors_log, "a") as f:
                    f.write(f"=== {case.label} resolution={case.resolution} cell_id={case.cell_id}\n")
                    f.write(traceback.format_exc() + "\n")
    finally:
        del module, x, call
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        after = ctx.telemetry.snapshot() if ctx.telemetry else {"available": False}
        row["telemetry"] = "nvml" if before.get("available") else "absent"
        if before.get("available"):
            row.update(telemetry_mod.flatten("gpu_before", before))
            row.update(telemetry_mod.flatten("gpu_after", after))
            row["throttled"] = ",".join(telemetry_mod.throttled(before, after))
        if speeds:
            row.update(_device_speed(speeds))
        row["cell_wall_s"] = time.perf_counter() - t_cell
        row["harness_s"] = row["cell_wall_s"] - row.get("measure_s", 0.0)
    return row


def _device_speed(speeds: list[float]) -> dict[str, Any]:
    """``device_speed``: geometric mean of the sentinel ratios before and after the cell; ``drift`` when every
    ratio is off by more than the tolerance on the same side (a sustained change, not a blip in one reading)."""
    tol = peaks_mod.DRIFT_TOLERANCE
    out: dict[str, Any] = {"device_speed_before": speeds[0]}
    if len(speeds) > 1:
        out["device_speed_after"] = speeds[1]
    out["device_speed"] = math.prod(speeds) ** (1 / len(speeds))
    out["drift"] = all(s < 1 - tol for s in speeds) or all(s > 1 + tol for s in speeds)
    return out


def _check_prediction(case: Case, row: dict[str, Any], prior: _Prior, settings: SuiteModel) -> None:
    """Raise _OverBudget when the previous cell of the series predicts this one will not fit."""
    tm, budget_s = settings.timing, settings.budget.cell_time_s
    flops_now = row.get("flops_analytic", row.get("flops_torch", math.nan))
    predicted_s = prior.latency_ms / 1e3 * (flops_now / prior.flops if prior.flops else 1.0)
    if predicted_s * (1 + tm.min_repeats) > budget_s:
        raise _OverBudget(f"predicted {predicted_s:.3g} s per call (resolution {prior.resolution}: "
                          f"{prior.latency_ms:.3g} ms, scaled by FLOPs) x {1 + tm.min_repeats} calls "
                          f"exceeds the cell budget of {budget_s:g} s")
    device = torch.device(case.device)
    if device.type == "cpu" and prior.peak_mem_bytes == prior.peak_mem_bytes:
        predicted_mem = prior.peak_mem_bytes * (case.tokens / prior.tokens) ** 2
        limit = settings.budget.memory_fraction * memory.available_memory_bytes(device)
        if predicted_mem > limit:
            raise _OverBudget(f"predicted peak memory {predicted_mem / 2**30:.3g} GiB (resolution "
                              f"{prior.resolution} scaled by tokens^2) exceeds the memory budget "
                              f"{limit / 2**30:.3g} GiB")


def _derived(case: Case, row: dict[str, Any], peaks: dict[str, Any] | None) -> dict[str, Any]:
    """Throughput, achieved TFLOP/s and the fraction of the device's measured matmul peak."""
    sec = row["latency_ms_median"] / 1e3
    out: dict[str, Any] = {"throughput_img_s": case.batch / sec if sec > 0 else math.nan,
                           "throughput_tok_s": case.batch * case.tokens / sec if sec > 0 else math.nan}
    flops = row.get("flops_torch_fwd_bwd") if case.mode == "train" else row.get("flops_torch")
    if flops is None or flops != flops:
        flops = row.get("flops_analytic")
    out["tflops_achieved"] = flops / sec / 1e12 if flops and sec > 0 else math.nan
    peak = (peaks or {}).get("matmul_tflops", {}).get(case.dtype)
    out["peak_fraction"] = out["tflops_achieved"] / peak if peak else math.nan
    return out


@dataclass
class RunResult:
    run_dir: Path
    rows: list[dict[str, Any]]
    measured: int  # cells measured in this session
    reused: int  # cells taken from an earlier session (--resume)
    overhead: dict[str, Any] = dataclasses.field(default_factory=dict)  # this session's time accounting


def _select(cases: list[Case], only: str | None) -> list[Case]:
    if not only:
        return cases
    patterns = [p.strip() for p in only.split(",") if p.strip()]
    return [c for c in cases if any(fnmatch.fnmatch(c.impl, p) or fnmatch.fnmatch(c.label, p) for p in patterns)]


def _latest_run(root: Path) -> Path:
    runs = sorted(p for p in root.glob("*") if (p / store.ROWS_FILE).is_file())
    if not runs:
        raise RunDirError(f"--resume: no earlier run of this suite under {root}")
    return runs[-1]


def prepare(suite: Suite | str | Path, device: str | None = None, only: str | None = None
            ) -> tuple[Suite, torch.device, list[Case]]:
    """Validate everything a run needs; return the suite, the device and the selected cells."""
    if not isinstance(suite, Suite):
        suite = load_suite(suite)
    dev = resolve_device(device or suite.model.device)
    dtypes = resolve_dtypes(suite.model.dtype, dev)
    problems = [dtype_problem(d, dev) for d in dtypes]
    if all(problems):
        raise DeviceError("; ".join(problems))  # nothing could run: bad input, not a skip
    cases = _select(suite.cases(str(dev), dtypes), only)
    if not cases:
        known = ", ".join(e.label for e in suite.entries)
        raise SuiteError(f"--only {only!r} selects no cell (implementations: {known})", str(suite.path or "<suite>"))
    return suite, dev, cases


def run_suite(suite: Suite | str | Path, out: str | Path | None = None, device: str | None = None,
              resume: bool = False, only: str | None = None, progress: bool = True,
              results_root: str | Path = "results", isolation: str | None = None,
              on_row: Callable[[dict[str, Any]], None] | None = None) -> RunResult:
    """Run every cell of ``suite`` and return the rows; each row is on disk as soon as its cell ends.

    ``out`` is the run folder (default ``results/<suite name>/<UTC time>``). ``resume`` reuses the
    rows already in ``out`` (or in the latest run of the suite) and measures only the missing cells.
    ``isolation`` ("none" or "process") overrides the suite's.
    """
    t_run = time.perf_counter()
    suite, dev, cases = prepare(suite, device, only)
    settings = suite.model if isolation is None else suite.model.model_copy(update={"isolation": isolation})
    torch.set_num_threads(settings.threads or torch.get_num_threads())  # fixed for the run, and recorded
    if settings.tf32 is not None and dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = settings.tf32
        torch.backends.cudnn.allow_tf32 = settings.tf32
    root = Path(results_root) / suite.name
    if out is not None:
        run_dir = Path(out)
    elif resume:
        run_dir = _latest_run(root)
    else:
        run_dir = root / _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    rows_path = run_dir / store.ROWS_FILE
    if rows_path.exists() and not resume:
        raise RunDirError(f"{run_dir} already holds a run; pass --resume to finish it or choose another --out")
    if resume and not rows_path.exists() and out is None:
        raise RunDirError(f"--resume: {run_dir} holds no run")
    run_dir.mkdir(parents=True, exist_ok=True)
    store.repair_rows(run_dir)
    done = {r["cell_id"]: r for r in store.read_rows(run_dir)} if rows_path.exists() else {}
    session = len(list(run_dir.glob("env*.json")))
    env = collect_env(dev)
    env.update(suite_name=suite.name, suite_path=str(suite.path) if suite.path else None, session=session,
               only=only, device_requested=device or suite.model.device, isolation=settings.isolation)
    runnable = [d for d in dict.fromkeys(c.dtype for c in cases) if not dtype_problem(d, dev)]
    t_peaks = time.perf_counter()
    env["peaks"] = peaks_mod.measure_peaks(dev, runnable) if settings.measure_peaks else None
    peaks_s = time.perf_counter() - t_peaks
    ctx = RunContext.create(settings, dev, env["peaks"])
    env["sentinel_tflops_start"] = ctx.sentinel_start
    (run_dir / (store.ENV_FILE if session == 0 else f"env.{session}.json")).write_text(json.dumps(env, indent=2, default=str))
    if session == 0:
        (run_dir / "suite.yaml").write_text(yaml.safe_dump(suite.raw, sort_keys=False))
    rows: list[dict[str, Any]] = []
    priors: dict[tuple, _Prior] = {}
    blocked: dict[tuple, dict[str, Any]] = {}
    measured = reused = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cases), unit="cell", dynamic_ncols=True, disable=None)  # None: off when not a terminal
    # Every cell ends with gc.collect() (cyclic garbage can hold tensors). Freezing what exists now
    # (torch, timm, fvcore: a large heap that lives for the run) keeps those collections to the
    # cell's own objects: about 0.2 s less harness time per cell.
    gc.collect()
    gc.freeze()
    try:
        for case in cases:
            if bar is not None:
                bar.set_description(f"{case.label} {case.resolution}px {case.dtype} {case.mode}")
            if case.cell_id in done:
                row = done[case.cell_id]
                reused += 1
            else:
                if dtype_problem(case.dtype, dev):
                    row = measure_case_skipped(case, "unsupported", dtype_problem(case.dtype, dev))
                elif case.series in blocked:
                    b = blocked[case.series]
                    row = measure_case_skipped(case, b["status"],
                                               f"skipped: resolution {b['resolution']} was {b['status']}")
                elif settings.isolation == "process":
                    row = measure_in_worker(case, settings, priors.get(case.series), run_dir / "errors.log",
                                            suite.plugin_paths, env["peaks"], settings.budget.cell_timeout_s,
                                            _base_row(case), ctx.sentinel_start)
                else:
                    row = measure_case(case, settings, priors.get(case.series), run_dir / "errors.log", ctx)
                row["session"] = session
                store.append_row(run_dir, row)
                measured += 1
            rows.append(row)
            if row["status"] in SKIP_STATUSES and case.series not in blocked:
                blocked[case.series] = {"status": row["status"], "resolution": row["resolution"]}
            elif row["status"] == "ok":
                f = row.get("flops_analytic", row.get("flops_torch"))
                priors[case.series] = _Prior(row["resolution"], row["tokens"], f if f is not None else math.nan,
                                             row["latency_ms_median"], row.get("peak_mem_bytes", math.nan))
            if on_row is not None:
                on_row(row)
            if bar is not None:
                bar.set_postfix_str(row["status"])
                bar.update(1)
    finally:
        gc.unfreeze()
        if bar is not None:
            bar.close()
        new = [r for r in rows if r.get("session") == session]
        wall_s = time.perf_counter() - t_run
        measure_s = sum(r.get("measure_s") or 0 for r in new)
        overhead = {"session": session, "wall_s": wall_s, "cells_measured": measured, "cells_reused": reused,
                    "measure_s": measure_s,  # inside the implementations' calls: first, warm-up, memory, timed
                    "harness_s": wall_s - measure_s,  # everything else, broken down below
                    "cells_harness_s": sum(r.get("harness_s") or 0 for r in new),  # build, FLOPs, telemetry, teardown
                    "peaks_s": peaks_s}  # the device's matmul and copy peaks
        overhead["other_s"] = overhead["harness_s"] - overhead["cells_harness_s"] - peaks_s  # env, storage, workers
        overhead["harness_fraction"] = overhead["harness_s"] / wall_s if wall_s > 0 else math.nan
        with open(run_dir / "run.jsonl", "a") as f:
            f.write(json.dumps(overhead) + "\n")
    return RunResult(run_dir=run_dir, rows=rows, measured=measured, reused=reused, overhead=overhead)


def _base_row(case: Case) -> dict[str, Any]:
    return {
        "impl": case.impl, "label": case.label, "family": case.family, "resolution": case.resolution,
        "patch": case.patch, "shape": case.shape, "tokens": case.tokens, "grid_h": case.grid_h, "grid_w": case.grid_w,
        "batch": case.batch, "dim": case.dim, "heads": case.heads, "dtype": case.dtype, "mode": case.mode,
        "device": case.device, "params": dict(case.params), "status": "ok", "message": "",
        "cell_id": case.cell_id, "cpu_threads": torch.get_num_threads(), "schema_version": store.SCHEMA_VERSION,
    }


def module_builder(case: Case) -> Callable[[], torch.nn.Module]:
    """Builds the cell's module; in forward mode a module with ``reparameterize()`` is measured merged."""
    spec = registry.get_spec(case.impl)
    params = dict(case.params)

    def build() -> torch.nn.Module:
        module = spec.build(dim=case.dim, heads=case.heads, **params)
        if case.mode == "forward" and hasattr(module, "reparameterize"):
            module = module.reparameterize() or module
        return module

    return build


def _count(case: Case, row: dict[str, Any], meta: torch.nn.Module, build: Callable[[], torch.nn.Module]) -> None:
    """Parameter count and the three FLOP counts, on the meta device."""
    row["params_count"] = sum(p.numel() for p in meta.parameters())
    row["reparameterized"] = case.mode == "forward" and hasattr(meta, "reparameterize")
    if hasattr(meta, "flops_analytic"):
        row["flops_analytic"] = int(meta.flops_analytic(case.batch, case.grid_h, case.grid_w))
    row.update(flops_mod.count_flops(build, (case.batch, case.grid_h, case.grid_w, case.dim),
                                     DTYPES[case.dtype], train=case.mode == "train"))


def measure_case_skipped(case: Case, status: str, message: str) -> dict[str, Any]:
    """The row of a cell not tried because a smaller one of its series failed; FLOPs are still counted."""
    row = _base_row(case)
    row.update(status=status, message=message)
    try:
        build = module_builder(case)
        _count(case, row, flops_mod.build_meta(build, DTYPES[case.dtype]), build)
    except Exception as exc:
        row["count_message"] = f"{type(exc).__name__}: {exc}"
    return row
