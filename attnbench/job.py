"""The job description of one cell: everything measuring it reads, frozen. No torch.

The in-process runner and an isolated worker receive the same :class:`Job` and hand it to
:func:`attnbench.cell.measure_cell`, so the two paths cannot differ: a worker applies the same
process-wide settings (threads, TF32) from ``job.settings`` that the runner applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .budget import Prior
from .suite import BudgetSettings, Case, SuiteModel, TimingSettings


@dataclass(frozen=True)
class CellSettings:
    """The suite settings a cell reads (and nothing else of the suite)."""

    seed: int = 0
    timing: TimingSettings = TimingSettings()
    budget: BudgetSettings = BudgetSettings()
    sdpa_backend: str = "auto"
    compile: bool = False
    find_max_batch: bool = False
    threads: int | None = None  # process-wide: applied by attnbench.device.apply_globals
    tf32: bool | None = None  # process-wide, CUDA only

    @classmethod
    def from_suite(cls, model: SuiteModel) -> "CellSettings":
        return cls(seed=model.seed, timing=model.timing, budget=model.budget, sdpa_backend=model.sdpa_backend,
                   compile=model.compile, find_max_batch=model.find_max_batch, threads=model.threads,
                   tf32=model.tf32)


@dataclass(frozen=True)
class Job:
    """One cell to measure.

    ``prior``: the last measured cell of its series (the budget rule's basis); ``peaks``: the
    device's measured matmul and copy peaks (``env.json``); ``sentinel_start``: the sentinel's
    TFLOP/s at the start of the run (None: drift not tracked); ``errors_log``: where tracebacks go;
    ``plugins``: plugin files a fresh worker must load to know the implementation.
    """

    case: Case
    settings: CellSettings = CellSettings()
    prior: Prior | None = None
    peaks: Mapping[str, Any] | None = None
    sentinel_start: float | None = None
    errors_log: str | None = None
    plugins: tuple[str, ...] = ()
