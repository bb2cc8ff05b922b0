"""Where the cells of a run are measured: the executors (issue 16).

``inprocess`` (the default): the runner's own loop, in this process (or a fresh worker per cell with
``isolation: process``). ``gpus``: one long-lived worker process per visible GPU of this host, pinned
with ``CUDA_VISIBLE_DEVICES``, each measuring one cell at a time (:mod:`attnbench.executors.gpus`).
``ray``: each cell a Ray task asking for one whole GPU (or, on CPU cells, a stated number of CPUs), so
Ray's scheduler keeps GPUs exclusive (:mod:`attnbench.executors.ray_exec`).

Whatever the executor, the driver (:func:`attnbench.runner.run_suite`) keeps one run folder: an
executor only takes jobs (:meth:`Executor.submit`) and hands back finished rows as they end
(:meth:`Executor.wait`); the driver appends each at once, so a killed driver loses only the cells in
flight and ``--resume`` finishes the run. Workers measure their own device peaks and sentinel
(:mod:`attnbench.executors.worker`): a row's ``peak_fraction`` and ``device_speed`` are its own GPU's.
"""

from __future__ import annotations

from typing import Any

from ..errors import AttnbenchError

EXECUTORS = ("inprocess", "gpus", "ray")
RETRIES = 1  # a cell whose worker died is tried once more (elsewhere where there is an elsewhere)


class ExecutorError(AttnbenchError):
    """An executor that cannot be used here: ray not installed, no cluster at --ray-address, no GPU."""


class Executor:
    """Takes jobs, hands back rows. ``capacity``: how many cells it measures at once (the driver keeps at
    most that many outstanding, so a cell's time-out starts when it can start)."""

    name = "?"
    capacity = 1

    def submit(self, key: str, job: Any, timeout_s: float) -> None:
        raise NotImplementedError

    def wait(self, timeout_s: float) -> list[tuple[str, dict[str, Any], dict[str, Any] | None]]:
        """Finished cells: (key, row, the environment of the worker that measured it or None)."""
        raise NotImplementedError

    def cancel(self) -> None:
        """Stop every outstanding cell (Ctrl-C): nothing more comes back."""

    def close(self) -> None:
        pass


def make_executor(name: str, *, measure_peaks: bool, cpus_per_cell: int = 1, ray_address: str | None = None
                  ) -> Executor:
    """The executor ``name`` (``gpus`` or ``ray``; ``inprocess`` is the runner's own loop)."""
    if name == "gpus":
        from .gpus import GpuExecutor

        return GpuExecutor(measure_peaks=measure_peaks)
    if name == "ray":
        from .ray_exec import RayExecutor

        return RayExecutor(measure_peaks=measure_peaks, cpus_per_cell=cpus_per_cell, address=ray_address)
    raise ExecutorError(f"unknown executor {name!r} (known: {', '.join(EXECUTORS)})")
