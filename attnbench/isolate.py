"""Run one cell in a fresh worker process, with a time-out.

A crash (a segfault, an abort, a killed process), a hang or a fragmented allocator then spoils only
that cell: the parent records a row with status ``crashed`` or ``timeout`` and goes on. The worker
is started with the ``spawn`` method (a clean interpreter, CUDA initialised afresh), loads the
suite's plugin files, measures the cell exactly as the in-process runner does, and sends the row
back through a pipe.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any


def _worker(conn, case, settings, prior, errors_log, plugins, peaks, threads, sentinel_start) -> None:
    try:
        import torch

        from . import registry
        from .runner import RunContext, measure_case

        if threads:
            torch.set_num_threads(threads)
        for path in plugins:
            registry.load_plugin_file(path)
        ctx = RunContext.create(settings, torch.device(case.device), peaks, sentinel_start)
        gc.collect()
        gc.freeze()  # as in the in-process runner: the cell's final gc.collect() scans only its own objects
        conn.send(measure_case(case, settings, prior, errors_log, ctx))
    except BaseException as exc:  # report, do not hang the parent
        conn.send({"__worker_error__": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


def measure_in_worker(case, settings, prior, errors_log: Path | None, plugins: list[str],
                      peaks: dict[str, Any] | None, timeout_s: float, base_row: dict[str, Any],
                      sentinel_start: float | None = None) -> dict[str, Any]:
    """Measure ``case`` in a spawned process; return its row, or ``base_row`` marked timeout/crashed."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker, daemon=True, args=(child, case, settings, prior, errors_log, plugins, peaks,
                                                          settings.threads, sentinel_start))
    t0 = time.perf_counter()
    proc.start()
    child.close()
    row, timed_out = None, False
    try:
        if parent.poll(timeout_s):
            row = parent.recv()  # EOFError when the worker died: its end of the pipe closed
        else:
            timed_out = True
    except (EOFError, OSError):
        row = None
    finally:
        parent.close()
    elapsed = time.perf_counter() - t0
    if row is None:
        if timed_out:
            proc.kill()
            proc.join(10)
            row = {**base_row, "status": "timeout",
                   "message": f"the worker did not finish within {timeout_s:g} s and was killed"}
        else:
            # the pipe closed a moment before the process is reaped: wait for it rather than calling
            # a dying worker a time-out
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(10)
            code = proc.exitcode
            how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            row = {**base_row, "status": "crashed", "message": f"the worker process died ({how})"}
    else:
        proc.join(10)
        if "__worker_error__" in row:
            row = {**base_row, "status": "error", "message": f"worker: {row['__worker_error__']}"}
    row["isolation"] = "process"
    row["worker_wall_s"] = elapsed
    return row
