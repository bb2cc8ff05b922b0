"""Execute a suite: one measured row per cell, appended to the run folder as each cell ends.

Statuses: ``ok``; ``oom`` (out of memory); ``over_budget`` (predicted or found to exceed the cell's
time or memory budget); ``unsupported`` (the implementation's ``supports`` check gave a reason);
``error`` (any other exception; its traceback goes to ``errors.log``). Within a series (one curve:
same implementation, parameters, batch, dim, heads, dtype, mode), once a cell is ``oom`` or
``over_budget`` every larger resolution gets the same status without being tried.
"""

from __future__ import annotations

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
from .measure.env import collect_env
from .suite import Case, Suite, SuiteModel, load_suite

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SKIP_STATUSES = ("oom", "over_budget")


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
    """``auto`` -> bfloat16 on CUDA, float32 on CPU; a dtype the device cannot run is a DeviceError."""
    out = []
    for n in names:
        n = ("bfloat16" if device.type == "cuda" else "float32") if n == "auto" else n
        if n not in out:
            out.append(n)
    for n in out:
        if device.type == "cuda" and n == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise DeviceError(f"dtype bfloat16 is not supported by {torch.cuda.get_device_name(device)}")
        try:  # a tiny matmul in that dtype: the device's own answer
            a = torch.ones(4, 4, device=device, dtype=DTYPES[n])
            (a @ a).sum().item()
        except RuntimeError as exc:
            raise DeviceError(f"dtype {n} cannot run on {device}: {exc}") from None
    return out


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


def _make_call(module: torch.nn.Module, x: torch.Tensor, mode: str) -> Callable[[], None]:
    """One forward (inference mode) or forward + backward (gradients cleared first) call."""
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


def measure_case(case: Case, settings: SuiteModel, prior: _Prior | None = None,
                 errors_log: Path | None = None) -> dict[str, Any]:
    """Measure one cell and return its row (never raises for a failing cell)."""
    t_cell = time.perf_counter()
    device, dtype = torch.device(case.device), DTYPES[case.dtype]
    B, H, W, C = case.batch, case.grid_h, case.grid_w, case.dim
    row = _base_row(case)
    module = x = call = None
    try:
        build = _builder(case)
        meta = flops_mod.build_meta(build, dtype)
        reason = meta.supports(H, W) if hasattr(meta, "supports") else None
        if reason:
            row.update(status="unsupported", message=reason)
            return row
        _count(case, row, meta, build)
        del meta
        budget_s = settings.budget.cell_time_s
        tm = settings.timing
        flops_now = row.get("flops_analytic", row.get("flops_torch", math.nan))
        if prior is not None:
            predicted_s = prior.latency_ms / 1e3 * (flops_now / prior.flops if prior.flops else 1.0)
            if predicted_s * (1 + tm.min_repeats) > budget_s:
                raise _OverBudget(f"predicted {predicted_s:.3g} s per call (resolution {prior.resolution}: "
                                  f"{prior.latency_ms:.3g} ms, scaled by FLOPs) x {1 + tm.min_repeats} calls "
                                  f"exceeds the cell budget of {budget_s:g} s")
            if device.type == "cpu" and prior.peak_mem_bytes == prior.peak_mem_bytes:
                predicted_mem = prior.peak_mem_bytes * (case.tokens / prior.tokens) ** 2
                limit = settings.budget.memory_fraction * memory.available_memory_bytes(device)
                if predicted_mem > limit:
                    raise _OverBudget(f"predicted peak memory {predicted_mem / 2**30:.3g} GiB (resolution "
                                      f"{prior.resolution} scaled by tokens^2) exceeds the memory budget "
                                      f"{limit / 2**30:.3g} GiB")
        torch.manual_seed(settings.seed)
        module = build().to(device=device, dtype=dtype)
        gen = torch.Generator(device="cpu").manual_seed(settings.seed + 1)
        x = torch.randn(B, H, W, C, generator=gen).to(device=device, dtype=dtype)  # never zeros
        call = _make_call(module, x, case.mode)
        if row.get("macs_fvcore") != row.get("macs_fvcore"):  # NaN: fvcore could not trace on meta
            row.update(flops_mod.count_fvcore(module.eval(), x))
        harness_s = time.perf_counter() - t_cell
        # 1. first call, alone: too slow already -> over budget
        t_start = time.perf_counter()
        first_s = _wall(call, device)
        if first_s * 2 > budget_s:
            raise _OverBudget(f"the first call took {first_s:.3g} s, over half the cell budget of {budget_s:g} s")
        # 2. warm-up by time
        warm = timing.time_calls(call, device, 1)
        while sum(warm) / 1e3 < tm.warmup_s:
            warm += timing.time_calls(call, device, max(1, len(warm)))
        est_s = sorted(warm)[len(warm) // 2] / 1e3
        # 3. peak memory of one call
        row["peak_mem_bytes"], row["peak_mem_method"] = memory.peak_memory_bytes(call, device)
        # 4. timed repeats, as many as fit the target time and the remaining budget
        remaining_s = budget_s - (time.perf_counter() - t_start)
        n = min(max(math.ceil(tm.target_s / max(est_s, 1e-9)), tm.min_repeats), tm.max_repeats)
        if est_s * tm.min_repeats > remaining_s:
            raise _OverBudget(f"{tm.min_repeats} calls of {est_s * 1e3:.3g} ms exceed the {remaining_s:.3g} s "
                              f"left of the cell budget of {budget_s:g} s")
        n = max(tm.min_repeats, min(n, int(remaining_s / max(est_s, 1e-9))))
        samples = timing.time_calls(call, device, n)
        row.update(timing.summarize(samples))
        row["latency_ms_samples"] = samples
        row["warmup_calls"] = 1 + len(warm)
        sec = row["latency_ms_median"] / 1e3
        row["throughput_img_s"] = B / sec if sec > 0 else math.nan
        row["throughput_tok_s"] = B * case.tokens / sec if sec > 0 else math.nan
        row["harness_s"] = harness_s
    except _OverBudget as exc:
        row.update(status="over_budget", message=str(exc))
    except Exception as exc:  # one failing cell never ends the sweep
        if _is_oom(exc):
            row.update(status="oom", message=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        else:
            row.update(status="error", message=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
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
    row["cell_wall_s"] = time.perf_counter() - t_cell
    return row


@dataclass
class RunResult:
    run_dir: Path
    rows: list[dict[str, Any]]
    measured: int  # cells measured in this session
    reused: int  # cells taken from an earlier session (--resume)


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
    cases = _select(suite.cases(str(dev), dtypes), only)
    if not cases:
        known = ", ".join(e.label for e in suite.entries)
        raise SuiteError(f"--only {only!r} selects no cell (implementations: {known})", str(suite.path or "<suite>"))
    return suite, dev, cases


def run_suite(suite: Suite | str | Path, out: str | Path | None = None, device: str | None = None,
              resume: bool = False, only: str | None = None, progress: bool = True,
              results_root: str | Path = "results",
              on_row: Callable[[dict[str, Any]], None] | None = None) -> RunResult:
    """Run every cell of ``suite`` and return the rows; each row is on disk as soon as its cell ends.

    ``out`` is the run folder (default ``results/<suite name>/<UTC time>``). ``resume`` reuses the
    rows already in ``out`` (or in the latest run of the suite) and measures only the missing cells.
    """
    suite, dev, cases = prepare(suite, device, only)
    if suite.model.threads:
        torch.set_num_threads(suite.model.threads)
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
               only=only, device_requested=device or suite.model.device)
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

        bar = tqdm(total=len(cases), unit="cell", dynamic_ncols=True)
    try:
        for case in cases:
            if bar is not None:
                bar.set_description(f"{case.label} {case.resolution}px {case.dtype} {case.mode}")
            if case.cell_id in done:
                row = done[case.cell_id]
                reused += 1
            elif case.series in blocked:
                b = blocked[case.series]
                row = measure_case_skipped(case, b["status"], f"skipped: resolution {b['resolution']} was {b['status']}")
                row["session"] = session
                store.append_row(run_dir, row)
                measured += 1
            else:
                row = measure_case(case, suite.model, priors.get(case.series), run_dir / "errors.log")
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
        if bar is not None:
            bar.close()
    return RunResult(run_dir=run_dir, rows=rows, measured=measured, reused=reused)


def _base_row(case: Case) -> dict[str, Any]:
    return {
        "impl": case.impl, "label": case.label, "family": case.family, "resolution": case.resolution,
        "patch": case.patch, "shape": case.shape, "tokens": case.tokens, "grid_h": case.grid_h, "grid_w": case.grid_w,
        "batch": case.batch, "dim": case.dim, "heads": case.heads, "dtype": case.dtype, "mode": case.mode,
        "device": case.device, "params": dict(case.params), "status": "ok", "message": "",
        "cell_id": case.cell_id, "cpu_threads": torch.get_num_threads(), "schema_version": store.SCHEMA_VERSION,
    }


def _builder(case: Case) -> Callable[[], torch.nn.Module]:
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
        build = _builder(case)
        _count(case, row, flops_mod.build_meta(build, DTYPES[case.dtype]), build)
    except Exception as exc:
        row["count_message"] = f"{type(exc).__name__}: {exc}"
    return row
