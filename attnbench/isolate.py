"""Run one cell in a fresh worker process, with a time-out.

A crash (a segfault, an abort, a killed process), a hang or a fragmented allocator then spoils only
that cell: the parent records a row with status ``crashed`` or ``timeout`` and goes on. The worker
is started with the ``spawn`` method (a clean interpreter, CUDA initialised afresh) and receives the
same :class:`attnbench.job.Job` the in-process runner measures; :func:`attnbench.cell.run_job`
loads the job's plugin files, applies its process-wide settings and measures the cell; the row
comes back through a pipe.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any

from .cell import base_row, run_job
from .job import Job
from .schema import Status


def _worker(conn, job: Job) -> None:
    try:
        conn.send(run_job(job))
    except BaseException as exc:  # report, do not hang the parent
        conn.send({"__worker_error__": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


def measure_in_worker(job: Job, timeout_s: float) -> dict[str, Any]:
    """Measure ``job`` in a spawned process; return its row, or its base row marked timeout/crashed/error."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker, daemon=True, args=(child, job))
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
            row = {**base_row(job.case), "status": Status.TIMEOUT.value,
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
            row = {**base_row(job.case), "status": Status.CRASHED.value, "message": f"the worker process died ({how})"}
    else:
        proc.join(10)
        if "__worker_error__" in row:
            row = {**base_row(job.case), "status": Status.ERROR.value, "message": f"worker: {row['__worker_error__']}"}
    row["isolation"] = "process"
    row["worker_wall_s"] = elapsed
    return row
