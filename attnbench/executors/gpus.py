"""The ``gpus`` executor: one long-lived worker process per visible GPU of this host.

Each worker is started (``spawn``) with ``CUDA_VISIBLE_DEVICES`` naming its one GPU, measures its own
peaks and sentinel once, then takes one cell at a time through a pipe: two cells never share a GPU.
A cell past its time-out has its worker killed (its other cells are not lost: a worker holds one cell
at a time) and a fresh worker takes that GPU's next cell. A worker that dies mid-cell has the cell
put back in the queue once (the next free worker, on any GPU, takes it); a second death is ``crashed``.

``ATTNBENCH_FAKE_GPUS=N`` (tests): believe there are N GPUs; each worker is pinned by
``CUDA_VISIBLE_DEVICES`` as on a real host but runs the cells on the device they name (the CPU).
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import os
import time
from multiprocessing.connection import wait as conn_wait
from typing import Any

from . import RETRIES, Executor, ExecutorError

FAKE_GPUS = "ATTNBENCH_FAKE_GPUS"
STARTUP_S = 300.0  # a fresh worker that has not taken its cell within this long is hung in start-up


def visible_gpus() -> list[str]:
    """The GPU ids this host lets us use: $CUDA_VISIBLE_DEVICES's list when set, else 0..count-1."""
    fake = os.environ.get(FAKE_GPUS)
    if fake:
        return [str(i) for i in range(int(fake))]
    import torch

    n = torch.cuda.device_count()
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:n] if listed else [str(i) for i in range(n)]


def _serve(conn, measure_peaks: bool) -> None:
    """A worker's loop: receive (key, job, known), send back ("start", key) then ("row", key, row, env);
    None ends it."""
    from .worker import measure

    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        key, job, known = msg
        try:  # the cell's time-out runs from "start" (not from the worker's start-up and its own peaks)
            row, env = measure(job, measure_peaks, known, on_start=lambda: conn.send(("start", key)))
            conn.send(("row", key, row, env))
        except BaseException as exc:  # report, do not hang the driver
            conn.send(("row", key, {"__worker_error__": f"{type(exc).__name__}: {exc}"}, None))


class _Worker:
    def __init__(self, gpu: str, measure_peaks: bool):
        ctx = mp.get_context("spawn")
        self.gpu = gpu
        self.conn, child = ctx.Pipe()
        saved = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # read by the spawned interpreter when it starts
        try:
            self.proc = ctx.Process(target=_serve, args=(child, measure_peaks), daemon=True,
                                    name=f"attnbench-gpu{gpu}")
            self.proc.start()
        finally:
            if saved is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved
        child.close()
        self.task: tuple[str, Any, float, int] | None = None  # key, job, deadline, attempt
        self.started = 0.0

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(10)
        self.conn.close()


class GpuExecutor(Executor):
    name = "gpus"

    def __init__(self, measure_peaks: bool = True):
        self.gpus = visible_gpus()
        if not self.gpus:
            raise ExecutorError("executor gpus: no GPU is visible on this host (CUDA_VISIBLE_DEVICES, "
                                "torch.cuda.device_count())")
        self.capacity = len(self.gpus)
        self.measure_peaks = measure_peaks
        self.workers: dict[str, _Worker | None] = {g: None for g in self.gpus}
        self.queue: collections.deque = collections.deque()  # (key, job, timeout_s, attempt)
        self.known: dict[str, Any] = {}  # worker id -> its environment (peaks, sentinel), for fresh workers
        self.done: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = []
        self.timeouts: dict[str, float] = {}

    def submit(self, key: str, job: Any, timeout_s: float) -> None:
        self.timeouts[key] = timeout_s
        self.queue.append((key, job, timeout_s, 1))
        self._dispatch()

    def _dispatch(self) -> None:
        for gpu in self.gpus:
            if not self.queue:
                return
            w = self.workers[gpu]
            if w is not None and w.task is not None:
                continue
            if w is None or not w.proc.is_alive():
                w = self.workers[gpu] = _Worker(gpu, self.measure_peaks)
            key, job, timeout_s, attempt = self.queue.popleft()
            w.conn.send((key, job, self.known))
            w.task = (key, job, time.monotonic() + STARTUP_S + timeout_s, attempt)  # until it says "start"
            w.started = time.perf_counter()

    def _finish(self, w: _Worker, row: dict[str, Any], env: dict[str, Any] | None) -> None:
        key, job, _deadline, attempt = w.task
        w.task = None
        if env is not None:
            self.known[env["worker"]] = {"peaks": env.get("peaks"),
                                         "sentinel_tflops_start": env.get("sentinel_tflops_start")}
        row["attempts"] = attempt
        row["worker_wall_s"] = time.perf_counter() - w.started
        self.done.append((key, row, env))

    def _failed(self, w: _Worker, status: str, message: str) -> None:
        from ..cell import base_row

        key, job, _deadline, attempt = w.task
        w.kill()
        self.workers[w.gpu] = None
        if status == "crashed" and attempt <= RETRIES:  # once more, on the next free worker
            w.task = None
            self.queue.appendleft((key, job, self.timeouts[key], attempt + 1))
            return
        self._finish(w, {**base_row(job.case), "status": status, "message": message}, None)

    def wait(self, timeout_s: float):
        busy = [w for w in self.workers.values() if w is not None and w.task is not None]
        if busy:
            now = time.monotonic()
            first_deadline = min(w.task[2] for w in busy)
            ready = conn_wait([w.conn for w in busy] + [w.proc.sentinel for w in busy],
                              max(0.0, min(timeout_s, first_deadline - now)))
            for w in busy:
                if w.conn in ready or w.proc.sentinel in ready:
                    try:
                        while w.conn.poll():
                            msg = w.conn.recv()
                            if msg[0] == "start":
                                w.task = (*w.task[:2], time.monotonic() + self.timeouts[w.task[0]], w.task[3])
                                w.started = time.perf_counter()
                                continue
                            _tag, key, row, env = msg
                            if "__worker_error__" in row:
                                from ..cell import base_row

                                row = {**base_row(w.task[1].case), "status": "error",
                                       "message": f"worker: {row['__worker_error__']}"}
                            self._finish(w, row, env)
                            break
                        if w.task is None:
                            continue
                    except (EOFError, OSError):
                        pass
                    if not w.proc.is_alive() or w.proc.sentinel in ready:
                        w.proc.join(5)
                        code = w.proc.exitcode
                        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                        self._failed(w, "crashed", f"the worker process on GPU {w.gpu} died ({how})"
                                     + (" twice: retried once" if w.task[3] > RETRIES else ""))
                elif time.monotonic() >= w.task[2]:
                    self._failed(w, "timeout", f"the cell did not finish within {self.timeouts[w.task[0]]:g} s "
                                               f"and its worker (GPU {w.gpu}) was killed")
        self._dispatch()
        out, self.done = self.done, []
        return out

    def cancel(self) -> None:
        self.queue.clear()
        for gpu, w in self.workers.items():
            if w is not None:
                w.kill()
            self.workers[gpu] = None

    def close(self) -> None:
        for gpu, w in self.workers.items():
            if w is not None:
                try:
                    w.conn.send(None)
                except OSError:
                    pass
                w.proc.join(10)
                w.kill()
            self.workers[gpu] = None
