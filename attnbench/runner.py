"""Execute a suite: one measured row per cell, appended to the run folder as each cell ends.

One cell is measured by :mod:`attnbench.cell` (in this process) or :mod:`attnbench.isolate` (in a
fresh worker), from the same :class:`attnbench.job.Job`. This module holds the loop: validation
(:func:`prepare`), the run folder (:mod:`attnbench.rundir`), the environment and device peaks, the
series rules, the progress bar and the time accounting.

Time accounting: a row's ``measure_s`` is the time spent inside the implementation's calls (first
call, warm-up, peak-memory call, timed calls); its ``harness_s`` is the rest of its ``cell_wall_s``
(building the module, counting FLOPs, telemetry, freeing memory). ``run.jsonl`` sums them per session.

Series: the cells that differ only in resolution form one series (one curve). Once a cell of a
series is ``oom``, ``over_budget`` or ``timeout``, every larger resolution gets that status without
being tried (its FLOPs are still counted); each measured cell is the budget rule's basis for the next.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import gc
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import rundir
from .budget import Prior
from .cell import blocked_message, measure_cell, skipped_row
from .context import CellContext
from .device import apply_globals, dtype_problem, resolve_device, resolve_dtypes, restore_globals, saved_globals
from .errors import DeviceError, SuiteError
from .executors import EXECUTORS, ExecutorError, make_executor
from .executors.worker import where_columns
from .isolate import measure_in_worker
from .job import CellSettings, Job
from .measure import peaks as peaks_mod
from .measure.env import collect_env
from .schema import BLOCKING, Status
from .suite import Case, Suite, load_suite


@dataclass
class RunResult:
    run_dir: Path
    rows: list[dict[str, Any]]
    measured: int  # cells measured (tried) in this session
    reused: int  # cells taken from an earlier session (--resume)
    skipped: int = 0  # cells recorded without being tried (a smaller cell of the series failed, dtype unsupported)
    overhead: dict[str, Any] = field(default_factory=dict)  # this session's time accounting


def _select(cases: list[Case], only: str | None) -> list[Case]:
    if not only:
        return cases
    patterns = [p.strip() for p in only.split(",") if p.strip()]
    return [c for c in cases if any(fnmatch.fnmatch(c.impl, p) or fnmatch.fnmatch(c.label, p) for p in patterns)]


def prepare(suite: Suite | str | Path, device: str | None = None, only: str | None = None,
            probe_dtypes: bool = True) -> tuple[Suite, torch.device, list[Case]]:
    """Validate everything a run needs; return the suite, the device and the selected cells.

    ``probe_dtypes``: run a tiny matmul per dtype on the device here (a DeviceError when none runs);
    off for a pool executor's driver, whose workers probe their own GPUs (an unsupported dtype is then
    each cell's ``unsupported`` row) and which then creates no CUDA context for it."""
    if not isinstance(suite, Suite):
        suite = load_suite(suite)
    dev = resolve_device(device or suite.model.device)
    dtypes = resolve_dtypes(suite.model.dtype, dev)
    problems = [dtype_problem(d, dev) for d in dtypes] if probe_dtypes else [None]
    if all(problems):
        raise DeviceError("; ".join(problems))  # nothing could run: bad input, not a skip
    cases = _select(suite.cases(str(dev), dtypes), only)
    if not cases:
        known = ", ".join(e.label for e in suite.entries)
        raise SuiteError(f"--only {only!r} selects no cell (implementations: {known})", str(suite.path or "<suite>"))
    return suite, dev, cases


class _Series:
    """Per series: the last measured cell (the budget rule's basis) and the failure that blocks the rest."""

    def __init__(self) -> None:
        self.priors: dict[tuple, Prior] = {}
        self.blocked: dict[tuple, tuple[str, int]] = {}  # series -> (status, resolution)

    def record(self, case: Case, row: dict[str, Any]) -> None:
        if row["status"] in BLOCKING and case.series not in self.blocked:
            self.blocked[case.series] = (row["status"], row["resolution"])
        elif row["status"] == Status.OK:
            self.priors[case.series] = Prior.from_row(row)


def _session_overhead(session: int, rows: list[dict[str, Any]], wall_s: float, peaks_s: float,
                      counts: dict[str, int], parallel: bool = False) -> dict[str, Any]:
    """This session's time accounting: ``measure_s`` inside the implementations' calls, ``timeout_s``
    waiting on cells that hung (isolation: process), ``harness_s`` everything else."""
    new = [r for r in rows if r.get("session") == session]
    measure_s = sum(r.get("measure_s") or 0 for r in new)
    timeout_s = sum(r.get("worker_wall_s") or 0 for r in new if r.get("status") == Status.TIMEOUT)
    o = {"session": session, "wall_s": wall_s, **counts,
         "measure_s": measure_s,  # inside the implementations' calls: first, warm-up, memory, timed
         "timeout_s": timeout_s,  # waiting on hung cells until their time-out
         "harness_s": wall_s - measure_s - timeout_s,  # everything else, broken down below
         "cells_harness_s": sum(r.get("harness_s") or 0 for r in new if r.get("status") != Status.TIMEOUT),
         "peaks_s": peaks_s}  # the device's matmul and copy peaks
    o["other_s"] = o["harness_s"] - o["cells_harness_s"] - peaks_s  # env, storage, worker start-up
    o["harness_fraction"] = o["harness_s"] / wall_s if wall_s > 0 else math.nan
    if parallel:  # cells side by side: the accounting is of the workers' busy time, not of the wall time
        busy = sum(r.get("worker_wall_s") or 0 for r in new)
        o.update(worker_s=busy, harness_s=busy - measure_s - timeout_s)
        o["other_s"] = o["harness_s"] - o["cells_harness_s"]  # scheduling, transfers, worker start-up and peaks
        o["harness_fraction"] = o["harness_s"] / busy if busy > 0 else math.nan
    return o


def _learn(ctx: CellContext, row: dict[str, Any]) -> None:
    """What a cell measured in a worker (or an earlier session) tells the run: faster sentinel readings
    and a larger matmul peak become the run's references."""
    for key in ("sentinel_tflops_before", "sentinel_tflops_after"):
        ctx.note_sentinel(row.get(key))
    peak, current = row.get("peak_tflops"), ctx.peak_tflops(str(row.get("dtype")))
    if isinstance(peak, float) and peak == peak and current is not None and peak > current:
        ctx.refresh_peak(str(row["dtype"]), at_least=peak)


def _run_on(pool, cases: list[Case], series: _Series, settle, finish, job_of, model, env: dict[str, Any],
            folder: rundir.RunFolder, bar) -> None:
    """The loop of an executor with workers: each series' cells in order (each measured cell is the
    budget rule's basis for the next, and a failure blocks the larger ones), the series side by side,
    at most ``pool.capacity`` cells outstanding; each row handed to ``finish`` (appended) as it comes back."""
    import collections

    queues = collections.OrderedDict()
    for case in cases:
        queues.setdefault(case.series, collections.deque()).append(case)
    busy: dict[str, Case] = {}  # cell_id -> case, outstanding
    busy_series: set = set()
    seen_workers: dict[str, dict[str, Any]] = {}
    while queues or busy:
        for key in list(queues):  # hand out the next cell of every idle series, while there is room
            if key in busy_series:
                continue
            q = queues[key]
            while q and key not in busy_series:
                if len(busy) >= pool.capacity:
                    break
                case = q.popleft()
                row = settle(case)
                if row is not None:
                    finish(case, row, case.cell_id not in folder.done)
                    continue
                pool.submit(case.cell_id, job_of(case, series), model.budget.cell_timeout_s)
                busy[case.cell_id] = case
                busy_series.add(key)
            if not q and key not in busy_series:
                del queues[key]
        if not busy:
            continue
        for key, row, worker_env in pool.wait(1.0):
            case = busy.pop(key)
            busy_series.discard(case.series)
            if worker_env is not None and worker_env.get("worker") not in seen_workers:
                seen_workers[worker_env["worker"]] = rundir.worker_entry(worker_env, pool.name)
                env["workers"] = list(seen_workers.values())
                folder.write_env(env)  # every worker's environment, as soon as it is known
            elif worker_env is not None:
                seen_workers[worker_env["worker"]]["sentinel_tflops_best"] = worker_env.get("sentinel_tflops_best")
            if bar is not None:
                bar.set_description(f"{case.label} {case.resolution}px {case.dtype} {case.mode}")
            finish(case, row, True, tried=True)


def run_suite(suite: Suite | str | Path, out: str | Path | None = None, device: str | None = None,
              resume: bool = False, only: str | None = None, progress: bool = True,
              results_root: str | Path = "results", isolation: str | None = None,
              on_row: Callable[[dict[str, Any]], None] | None = None,
              on_note: Callable[[str], None] | None = None, executor: str | None = None,
              ray_address: str | None = None) -> RunResult:
    """Run every cell of ``suite`` and return the rows; each row is on disk as soon as its cell ends.

    ``out`` is the run folder (default ``results/<suite name>/<UTC time>``). ``resume`` reuses the
    rows already in ``out`` (or in the latest run of the suite) and measures only the missing cells.
    ``isolation`` ("none" or "process") overrides the suite's. ``on_row`` is called with each row as it
    is written (or reused); ``on_note`` with notes worth a user's eye (a torn last line dropped on resume).
    ``executor`` ("inprocess", "gpus" or "ray", see :mod:`attnbench.executors`) overrides the suite's;
    ``ray_address`` is the Ray cluster to join (None: a local one).
    """
    t_run = time.perf_counter()
    if not isinstance(suite, Suite):
        suite = load_suite(suite)
    executor = executor or getattr(suite.model, "executor", None) or "inprocess"
    suite, dev, cases = prepare(suite, device, only, probe_dtypes=executor == "inprocess")
    model = suite.model if isolation is None else suite.model.model_copy(update={"isolation": isolation})
    if executor not in EXECUTORS:
        raise ExecutorError(f"unknown executor {executor!r} (known: {', '.join(EXECUTORS)})")
    if executor != "inprocess" and dev.index is not None:
        raise ExecutorError(f"executor {executor} places each cell on a GPU itself: use device cuda, not {dev}")
    pool = None
    if executor != "inprocess":  # before the run folder: an executor that cannot start leaves nothing behind
        pool = make_executor(executor, measure_peaks=model.measure_peaks, cpus_per_cell=model.threads or 1,
                             ray_address=ray_address)
    try:
        return _run(suite, dev, cases, model, pool, executor, out, device, resume, only, progress, results_root,
                    on_row, on_note, ray_address, t_run)
    finally:
        if pool is not None:
            pool.close()


def _run(suite, dev, cases, model, pool, executor, out, device, resume, only, progress, results_root, on_row,
         on_note, ray_address, t_run) -> RunResult:
    settings = CellSettings.from_suite(model)
    saved = saved_globals()  # put back when the run ends: a caller's process keeps its own settings
    apply_globals(settings.threads, settings.tf32, dev)  # fixed for the run, recorded per row
    run_dir = rundir.choose(Path(results_root) / suite.name, out, resume)
    env = collect_env(dev)
    folder = rundir.RunFolder.open(run_dir, env, suite.raw, on_note)
    env.update(suite_name=suite.name, suite_path=str(suite.path) if suite.path else None, session=folder.session,
               only=only, device_requested=device or suite.model.device, isolation=model.isolation,
               executor=executor, ray_address=ray_address)
    t_peaks = time.perf_counter()
    # the workers of another executor measure their own GPU's peaks and sentinel (env["workers"])
    env["peaks"] = None
    if model.measure_peaks and pool is None:
        env["peaks"] = peaks_mod.measure_peaks(dev, [d for d in dict.fromkeys(c.dtype for c in cases)
                                                     if not dtype_problem(d, dev)])
    peaks_s = time.perf_counter() - t_peaks
    # a pool's driver measures nothing: no sentinel, no L2 flush buffer (256 MiB or more on its GPU)
    quiet = dataclasses.replace(settings, timing=settings.timing.model_copy(update={"sentinel": False,
                                                                                     "l2_flush": False}))
    ctx = CellContext.create(settings if pool is None else quiet, dev, env["peaks"])  # workers keep their own
    env["sentinel_tflops_start"] = ctx.sentinel_start
    here = rundir.worker_entry(env, "driver")
    env["workers"] = [here] if pool is None else []
    folder.write_env(env)
    folder.write_suite(suite.raw)

    def job_of(case: Case, series: _Series) -> Job:
        return Job(case=case, settings=settings, prior=series.priors.get(case.series), peaks=env["peaks"],
                   sentinel_start=ctx.sentinel_best, errors_log=str(folder.errors_log),
                   plugins=tuple(suite.plugin_paths))

    rows: list[dict[str, Any]] = []
    series = _Series()
    measured = reused = skipped = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cases), unit="cell", dynamic_ncols=True, disable=None)  # None: off when not a terminal
    # Every cell ends with gc.collect() (cyclic garbage can hold tensors). Freezing what exists now
    # (torch, timm, fvcore: a large heap that lives for the run) keeps those collections to the
    # cell's own objects: about 0.2 s less harness time per cell. No collection first: it would scan
    # that heap once more (0.17 s) to free a little garbage of the imports.
    gc.freeze()
    overhead: dict[str, Any] = {}

    def finish(case: Case, row: dict[str, Any], new: bool, tried: bool = False) -> None:
        nonlocal measured
        measured += tried
        if new:
            row["executor"] = executor
            folder.append(row)
        rows.append(row)
        series.record(case, row)
        if pool is None:
            _learn(ctx, row)
        if on_row is not None:
            on_row(row)
        if bar is not None:
            bar.set_postfix_str(row["status"])
            bar.update(1)

    def settle(case: Case) -> dict[str, Any] | None:
        """The row of a cell that needs no measuring (reused, dtype unsupported, its series blocked)."""
        nonlocal reused, skipped
        if case.cell_id in folder.done:
            reused += 1
            return folder.done[case.cell_id]
        if pool is None and dtype_problem(case.dtype, dev):  # a pool's workers probe their own GPU
            skipped += 1
            return skipped_row(case, Status.UNSUPPORTED, dtype_problem(case.dtype, dev))
        if case.series in series.blocked:
            status, resolution = series.blocked[case.series]
            skipped += 1
            return skipped_row(case, status, blocked_message(resolution, status))
        return None

    try:
        if pool is None:
            for case in cases:
                if bar is not None:
                    bar.set_description(f"{case.label} {case.resolution}px {case.dtype} {case.mode}")
                row = settle(case)
                tried = row is None
                new = tried or case.cell_id not in folder.done
                if tried:
                    if model.isolation == "process":
                        row = measure_in_worker(job_of(case, series), model.budget.cell_timeout_s)
                    else:
                        row = measure_cell(job_of(case, series), ctx)
                    row.update(where_columns({**env, "worker": here["worker"]}))
                finish(case, row, new, tried)
        else:
            _run_on(pool, cases, series, settle, finish, job_of, model, env, folder, bar)
    except KeyboardInterrupt:
        if pool is not None:
            pool.cancel()  # what is outstanding stops; what finished is on disk
        raise
    finally:
        gc.unfreeze()
        restore_globals(saved)
        if bar is not None:
            bar.close()
        env["sentinel_tflops_best"] = ctx.sentinel_best
        folder.write_env(env)  # the peaks and the sentinel reference the run ended with
        counts = {"cells_measured": measured, "cells_skipped": skipped, "cells_reused": reused}
        overhead = _session_overhead(folder.session, rows, time.perf_counter() - t_run, peaks_s, counts,
                                     parallel=pool is not None)
        overhead["executor"] = executor
        folder.log_session(overhead)
    order = {c.cell_id: i for i, c in enumerate(cases)}
    rows.sort(key=lambda r: order.get(r.get("cell_id"), len(order)))  # suite order, whatever finished first
    return RunResult(run_dir=run_dir, rows=rows, measured=measured, reused=reused, skipped=skipped,
                     overhead=overhead)
