"""The ``ray`` executor: each cell a Ray task asking for one whole GPU (``num_gpus=1``; CPU cells: a
stated number of CPUs), so Ray's scheduler, not attnbench, keeps two cells off one GPU.

``address`` joins an existing cluster (``ray start --head`` on one node, ``ray start --address`` on the
others); without it :func:`ray.init` starts a local one (or uses the one this process already has).
Every node needs the same Python environment with attnbench (and the suite's plugin files at the same
paths). Rows come back with :func:`ray.wait` as each task ends. A task whose worker or node dies is
retried once by Ray (``max_retries=1``); a second death raises here and the cell is ``crashed``. A
task past the cell time-out is cancelled with ``force=True`` (its worker process is killed; the other
tasks run in other processes). The driver keeps at most the cluster's capacity outstanding, so a
task's time-out starts about when it can start.

ray is imported only here, only when this executor is used.
"""

from __future__ import annotations

import time
from typing import Any

from . import RETRIES, Executor, ExecutorError


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ExecutorError(f"executor ray needs the ray package ({exc}); install it with "
                            "`pip install 'attnbench[ray]'` or `pip install ray`") from None
    return ray


def _task(job: Any, measure_peaks: bool, known: dict[str, Any]):
    from .worker import measure

    return measure(job, measure_peaks, known)


class RayExecutor(Executor):
    name = "ray"

    def __init__(self, measure_peaks: bool = True, cpus_per_cell: int = 1, address: str | None = None):
        ray = self.ray = import_ray()
        self.started_cluster = False
        if not ray.is_initialized():
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            except Exception as exc:  # a wrong address, a cluster that is down
                what = f"join the cluster at {address}" if address else "start a local cluster"
                first = str(exc).splitlines()[0] if str(exc) else ""
                raise ExecutorError(f"executor ray: cannot {what}: {type(exc).__name__}: {first}") from None
            self.started_cluster = address is None
        self.measure_peaks = measure_peaks
        self.cpus_per_cell = cpus_per_cell
        self.remote = ray.remote(_task)
        res = ray.cluster_resources()
        self.gpus_total = int(res.get("GPU", 0))
        self.cpus_total = int(res.get("CPU", 1))
        self.capacity = max(1, self.gpus_total or self.cpus_total // max(1, cpus_per_cell))
        self.refs: dict[Any, tuple[str, Any, float, float]] = {}  # ref -> key, job, deadline, submitted
        self.known: dict[str, Any] = {}
        self.timeouts: dict[Any, float] = {}

    def submit(self, key: str, job: Any, timeout_s: float) -> None:
        gpu = job.case.device.startswith("cuda")
        if gpu and not self.gpus_total:
            raise ExecutorError("executor ray: the cells are on cuda but the Ray cluster has no GPU")
        opts = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": self.cpus_per_cell}
        ref = self.remote.options(max_retries=RETRIES, retry_exceptions=False, **opts).remote(
            job, self.measure_peaks, self.known)
        now = time.monotonic()
        self.refs[ref] = (key, job, now + timeout_s, time.perf_counter())
        self.timeouts[ref] = timeout_s

    def wait(self, timeout_s: float):
        from ..cell import base_row

        ray, out = self.ray, []
        if not self.refs:
            return out
        now = time.monotonic()
        first_deadline = min(d for _k, _j, d, _t in self.refs.values())
        ready, _ = ray.wait(list(self.refs), num_returns=len(self.refs),
                            timeout=max(0.0, min(timeout_s, first_deadline - now)))
        for ref in ready:
            key, job, _deadline, t0 = self.refs.pop(ref)
            self.timeouts.pop(ref, None)
            env = None
            try:
                row, env = ray.get(ref)
                self.known[env["worker"]] = {"peaks": env.get("peaks"),
                                             "sentinel_tflops_start": env.get("sentinel_tflops_start")}
            except Exception as exc:  # the worker or node died twice (or the task could not run)
                text = str(exc).strip().splitlines()
                row = {**base_row(job.case), "status": "crashed",
                       "message": f"ray: {type(exc).__name__}: {text[0] if text else ''}"[:400]
                                  + f" (tried {1 + RETRIES} times)"}
            row["worker_wall_s"] = time.perf_counter() - t0
            out.append((key, row, env))
        now = time.monotonic()
        for ref, (key, job, deadline, t0) in list(self.refs.items()):
            if now >= deadline:
                ray.cancel(ref, force=True)  # kills the worker process running it; not retried
                del self.refs[ref]
                row = {**base_row(job.case), "status": "timeout",
                       "message": f"the Ray task did not finish within {self.timeouts.pop(ref):g} s of its submission "
                                  "and was cancelled (its worker killed)",
                       "worker_wall_s": time.perf_counter() - t0}
                out.append((key, row, None))
        return out

    def cancel(self) -> None:
        for ref in list(self.refs):
            try:
                self.ray.cancel(ref, force=True)
            except Exception:
                pass
        self.refs.clear()

    def close(self) -> None:
        if self.started_cluster:
            self.ray.shutdown()
