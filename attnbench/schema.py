"""The row schema: what one measured cell's row holds, in one place. No torch, no pandas.

Every module that writes or reads rows takes its knowledge from here: the statuses (:class:`Status`),
the columns grouped by what they describe (:data:`COLUMNS`, :func:`group`), the identity of a cell
(:func:`cell_id`), the dtype table (:data:`DTYPE_BYTES`), and the schema version, checked when a
run folder is read (:func:`check_version`).

Adding a measured column end to end is two changes: compute it where it is measured (for example
:meth:`attnbench.measurement.Latency.columns`) and declare it below with its group, its kind, and
whether baselines keep it (``compact``), comparisons judge or show it (``compare``) and the summary
tables show it (``table``). The store, compare, baselines, plots and reports read the declaration.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from enum import Enum
from typing import Any, Iterable, Mapping

SCHEMA_VERSION = 1  # rows written by this code; older rows load, newer ones are refused


class SchemaError(ValueError):
    """Rows written by a newer attnbench than this one (wrapped into a RunDirError by the store)."""


class Status(str, Enum):
    """How a cell ended. A ``str``: rows hold the plain value (``"ok"``) and compare equal to it."""

    OK = "ok"
    OOM = "oom"  # out of memory
    OVER_BUDGET = "over_budget"  # predicted or found to exceed the cell's time or memory budget
    UNSUPPORTED = "unsupported"  # the implementation, the device's dtype or a pinned SDPA backend cannot take it
    ERROR = "error"  # any other exception; traceback in errors.log
    TIMEOUT = "timeout"  # isolation: process; the worker was killed at budget.cell_timeout_s
    CRASHED = "crashed"  # isolation: process; the worker died

    def __str__(self) -> str:
        return self.value

    @property
    def word(self) -> str:
        """The short word the summary tables show in a failed cell's place."""
        return _WORDS[self]


_WORDS = {Status.OK: "ok", Status.OOM: "OOM", Status.OVER_BUDGET: "budget", Status.UNSUPPORTED: "n/a",
          Status.ERROR: "ERR", Status.TIMEOUT: "timeout", Status.CRASHED: "crashed"}
FAILED = tuple(s for s in Status if s is not Status.OK)
BLOCKING = (Status.OOM, Status.OVER_BUDGET, Status.TIMEOUT)  # larger cells of the series are not tried
FAILED_FOR_SIZE = (Status.OOM, Status.OVER_BUDGET)  # their latency can be predicted from a smaller cell
SKIPPED_PREFIX = "skipped:"  # message of a cell not tried because a smaller one of its series failed


def status_word(status: Any) -> str:
    try:
        return Status(status).word
    except ValueError:
        return str(status or "?")


DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"  # a suite's `device` and `--device`: auto, cpu, cuda, cuda:N

# dtype name -> bytes per element (the torch dtypes themselves live in attnbench.device)
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
MODES = ("forward", "train")


@dataclass(frozen=True)
class Column:
    """One column of a row.

    ``compare``: ``exact`` (deterministic; any difference is a change), ``latency`` / ``memory``
    (judged statistically by :mod:`attnbench.analysis.compare`), ``info`` (shown side by side), or
    empty. ``table``: (position, title with units, scale, format) of a summary table of this column.
    """

    name: str
    group: str
    kind: str = "float"  # int | float | str | bool | json
    doc: str = ""
    compact: bool = False  # kept in compact baselines
    compare: str = ""
    table: tuple[int, str, float, str] | None = None


IDENTITY, SETUP, OUTCOME, COUNTS, LATENCY, MEMORY, TELEMETRY, DERIVED, ACCOUNTING = (
    "identity", "setup", "outcome", "counts", "latency", "memory", "telemetry", "derived", "accounting")

_C = Column
COLUMNS: tuple[Column, ...] = (
    # identity: what was measured (the fields of cell_id, then descriptions derived from them)
    _C("impl", IDENTITY, "str", "registered implementation name", True),
    _C("label", IDENTITY, "str", "implementation with its parameters, e.g. sra.conv(sr_ratio=8)", True),
    _C("family", IDENTITY, "str", "the implementation's family", True),
    _C("shape", IDENTITY, "str", "name of an explicit shape (S1..S4), empty for a resolution sweep", True),
    _C("resolution", IDENTITY, "int", "image side, px", True),
    _C("patch", IDENTITY, "int", "effective stride: token grid = resolution / patch", True),
    _C("tokens", IDENTITY, "int", "tokens N = grid_h x grid_w", True),
    _C("grid_h", IDENTITY, "int", "token grid height", True),
    _C("grid_w", IDENTITY, "int", "token grid width", True),
    _C("batch", IDENTITY, "int", "batch measured (after find_max_batch)", True),
    _C("dim", IDENTITY, "int", "channels C", True),
    _C("heads", IDENTITY, "int", "attention heads", True),
    _C("dtype", IDENTITY, "str", "float32 | float16 | bfloat16", True),
    _C("mode", IDENTITY, "str", "forward (inference) | train (forward + backward)", True),
    _C("device", IDENTITY, "str", "cpu | cuda | cuda:N", True),
    _C("params", IDENTITY, "json", "the implementation's parameters set by the suite", True),
    _C("model", IDENTITY, "str", "whole-model cells: the timm model (impl is then its attention's label)", True),
    _C("attention", IDENTITY, "str", "whole-model cells: JSON role -> [design, parameters] swapped in ({}: timm's)",
       True),
    _C("model_kwargs", IDENTITY, "str", "whole-model cells: JSON of timm.create_model's extra arguments", True),
    _C("model_blocks", SETUP, "str", "whole-model cells: attention blocks swapped, timm weights loaded, kept", True),
    _C("cell_id", IDENTITY, "str", "hash of impl, params, resolution, patch, batch, dim, heads, dtype, mode, "
                                   "device (:func:`cell_id`)", True),
    _C("batch_requested", IDENTITY, "int", "the suite's batch when find_max_batch changed it", True),
    _C("batch_search", IDENTITY, "json", "find_max_batch: the batches tried"),
    # outcome
    _C("status", OUTCOME, "str", "ok | oom | over_budget | unsupported | error | timeout | crashed", True),
    _C("message", OUTCOME, "str", "why a cell did not finish ok (or a note)", True),
    # setup: how it was measured
    _C("schema_version", SETUP, "int", "version of this schema the row was written with", True),
    _C("session", SETUP, "int", "which session of a resumed run measured the cell"),
    _C("cpu_threads", SETUP, "int", "torch CPU threads", True),
    _C("sdpa_backend", SETUP, "str", "auto | flash | efficient | cudnn | math", True),
    _C("compiled", SETUP, "bool", "run under torch.compile", True),
    _C("tf32", SETUP, "bool", "CUDA float32 matmul in TF32 (None on CPU)", True),
    _C("tf32_cudnn", SETUP, "bool", "cuDNN float32 convolutions in TF32 (None on CPU)", True),
    _C("reparameterized", SETUP, "bool", "measured in its re-parameterized (merged) form", True),
    _C("isolation", SETUP, "str", "process: measured in a fresh worker"),
    _C("executor", SETUP, "str", "inprocess | gpus | ray: what placed the cell on its worker"),
    _C("worker", SETUP, "str", "the worker that measured the cell: its key in env.json's workers (host/GPU UUID)"),
    _C("worker_host", SETUP, "str", "host the cell ran on"),
    _C("worker_gpu_uuid", SETUP, "str", "UUID of the GPU the cell ran on (None on CPU)"),
    _C("worker_gpu_name", SETUP, "str", "name of the GPU the cell ran on"),
    _C("worker_driver", SETUP, "str", "NVIDIA driver version of that worker"),
    _C("worker_torch", SETUP, "str", "torch version of that worker"),
    _C("worker_sm_clock_max_mhz", SETUP, "float", "maximum SM clock of that GPU, MHz"),
    _C("attempts", SETUP, "int", "executor gpus: times the cell was started (2: its first worker died)"),
    # counts: deterministic, on the meta device
    _C("params_count", COUNTS, "int", "parameters of the module", True, "exact"),
    _C("flops_analytic", COUNTS, "int", "closed form, matmul-type ops, 2 FLOPs per MAC, forward", True, "exact",
       (3, "FLOPs (analytic, forward, 2 per MAC), GFLOP", 1e9, ".4g")),
    _C("flops_torch", COUNTS, "int", "torch FlopCounterMode, 2 per MAC, forward", True, "exact"),
    _C("flops_torch_fwd_bwd", COUNTS, "int", "torch FlopCounterMode, forward + backward (train mode)", True, "exact"),
    _C("macs_fvcore", COUNTS, "int", "fvcore FlopCountAnalysis total, 1 per MAC (the papers' FLOPs)", True, "exact"),
    _C("macs_fvcore_matmul", COUNTS, "int", "fvcore's matmul-type part", True),
    _C("fvcore_device", COUNTS, "str", "meta, or the real device where fvcore could not trace on meta"),
    _C("fvcore_uncounted_ops", COUNTS, "str", "operators fvcore does not count"),
    _C("fvcore_message", COUNTS, "str", "why fvcore could not count"),
    _C("count_message", COUNTS, "str", "why a counter failed"),
    # latency: see attnbench.measurement.Latency
    _C("latency_ms_median", LATENCY, "float", "median of the timed calls, ms", True, "latency",
       (1, "latency, median ms (~ = noisy: IQR > 10% of the median)", 1.0, ".3g")),
    _C("latency_ms_iqr", LATENCY, "float", "p75 - p25 of the timed calls, ms", True),
    _C("latency_ms_min", LATENCY, "float", "fastest timed call, ms", True),
    _C("latency_ms_p10", LATENCY, "float", "10th percentile, ms", True),
    _C("latency_ms_p90", LATENCY, "float", "90th percentile, ms", True),
    _C("latency_n", LATENCY, "int", "timed calls", True),
    _C("noisy", LATENCY, "bool", "IQR above 10% of the median", True),
    _C("latency_cv", LATENCY, "float", "coefficient of variation: std / mean of the timed calls", True, "info",
       (5, "latency spread, coefficient of variation % (std / mean of the timed calls)", 0.01, ".2g")),
    _C("latency_ms_samples", LATENCY, "json", "every timed call, ms", True),
    _C("timing_method", LATENCY, "str", "perf_counter | cuda_events | cuda_graph_replay | cuda_events (graph "
                                        "capture failed: <reason>)", True),
    _C("l2_flush", LATENCY, "bool", "GPU L2 overwritten before each timed call", True),
    _C("warmup_calls", LATENCY, "int", "calls before the timed ones (first call included)"),
    _C("latency_steady_ms_median", LATENCY, "float", "GPU: median over blocks of back-to-back calls (no flush, "
                                                     "no sync), ms per call"),
    _C("latency_steady_ms_samples", LATENCY, "json", "each steady block's time over its calls, ms"),
    _C("steady_calls", LATENCY, "int", "calls per steady-state block"),
    _C("launch_bound", LATENCY, "bool", "steady time more than 20% above the flushed median: launches set the pace"),
    _C("compile_s", LATENCY, "float", "torch.compile: the first call, s"),
    _C("compile_graphs", LATENCY, "int", "torch.compile: graphs dynamo compiled in the cell (1 a shape: whole; "
       "each batch the largest-batch search tried is a shape)"),
    _C("compile_graph_breaks", LATENCY, "int", "torch.compile: graph breaks dynamo hit in the cell (0: whole)"),
    _C("compile_cache_hits", LATENCY, "int", "torch.compile: graphs inductor loaded from its on-disk cache "
       "(compile_s is then a cache load; TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 for cold compiles)"),
    # memory
    _C("peak_mem_bytes", MEMORY, "float", "peak memory of one call above what was held before it", True, "memory",
       (2, "peak memory of one call, MiB", 2.0 ** 20, ".4g")),
    _C("peak_mem_method", MEMORY, "str", "cuda_allocator_peak_delta | rss_hwm_delta | unavailable", True),
    _C("peak_mem_predicted_bytes", MEMORY, "int", "the call's peak memory traced on the meta device, before it ran"),
    _C("predict_message", MEMORY, "str", "why the peak memory could not be predicted"),
    # telemetry (GPU state, and the machine's speed drift)
    _C("telemetry", TELEMETRY, "str", "nvml | absent"),
    _C("throttled", TELEMETRY, "str", "thermal/hardware slowdown reasons seen before, during or after the timed "
                                      "calls (sw_power_cap excluded: see power_capped)"),
    _C("power_capped", TELEMETRY, "bool", "the GPU held its clocks at its power limit (normal at full load)"),
    _C("telemetry_reason", TELEMETRY, "str", "why telemetry is absent on a GPU cell"),
    _C("gpu_load_samples", TELEMETRY, "int", "NVML readings taken during the timed calls"),
    _C("gpu_load_idle_samples", TELEMETRY, "int", "of those, readings with the gpu_idle reason (left out)"),
    _C("gpu_load_sm_clock_mhz_median", TELEMETRY, "float", "median SM clock during the timed calls, MHz"),
    _C("gpu_load_sm_clock_mhz_min", TELEMETRY, "float", "lowest SM clock during the timed calls, MHz"),
    _C("gpu_load_mem_clock_mhz_median", TELEMETRY, "float", "median memory clock during the timed calls, MHz"),
    _C("gpu_load_power_w_median", TELEMETRY, "float", "median board power during the timed calls, W"),
    _C("gpu_load_power_w_max", TELEMETRY, "float", "highest board power during the timed calls, W"),
    _C("gpu_load_power_method", TELEMETRY, "str", "instant (NVML's instantaneous power field) or average (the "
       "driver's power reading, on Hopper and later a 1 s average: a short cell's peak is under-read)"),
    _C("gpu_load_temperature_c_max", TELEMETRY, "float", "highest GPU temperature during the timed calls, C"),
    _C("gpu_load_clock_event_reasons", TELEMETRY, "str", "clock-event reasons seen during the timed calls"),
    _C("gpu_load_throttle_power_fraction", TELEMETRY, "float", "share of the timed window held down by power"),
    _C("gpu_load_throttle_thermal_fraction", TELEMETRY, "float", "the same for temperature"),
    _C("sentinel_tflops_before", TELEMETRY, "float", "the sentinel matmul's TFLOP/s before the timed calls"),
    _C("sentinel_tflops_after", TELEMETRY, "float", "the same after the timed calls"),
    _C("device_speed_before", TELEMETRY, "float", "sentinel before / the run's fastest reading up to the cell's end"),
    _C("device_speed_after", TELEMETRY, "float", "the same after the timed calls"),
    _C("device_speed", TELEMETRY, "float", "geometric mean of the two (at most 1)"),
    _C("sentinel_drift", TELEMETRY, "bool", "both sentinel readings more than 10% below the fastest"),
    _C("cpu_others_cores", TELEMETRY, "float", "CPU: cores other processes took during the timed calls"),
    _C("drift", TELEMETRY, "bool", "the cell ran slowed: sentinel drift, or other processes took > 0.25 cores"),
    _C("drift_reason", TELEMETRY, "str", "why drift was flagged"),
    # derived from the above
    _C("throughput_img_s", DERIVED, "float", "batch / median latency", True, "",
       (4, "throughput, img/s", 1.0, ".3g")),
    _C("throughput_tok_s", DERIVED, "float", "batch x tokens / median latency", True),
    _C("tflops_achieved", DERIVED, "float", "torch FLOPs / median latency, TFLOP/s"),
    _C("tflops_count", DERIVED, "str", "the FLOP count tflops_achieved used (empty: none in train mode)"),
    _C("peak_tflops", DERIVED, "float", "the device's matmul peak (its dtype) the fraction is taken of"),
    _C("peak_fraction", DERIVED, "float", "tflops_achieved / peak_tflops"),
    _C("over_peak", DERIVED, "bool", "achieved more than the peak even after measuring it again"),
    # the harness's own time
    _C("measure_s", ACCOUNTING, "float", "time inside the implementation's calls, s"),
    _C("harness_s", ACCOUNTING, "float", "the rest of the cell's wall time, s"),
    _C("cell_wall_s", ACCOUNTING, "float", "the cell's wall time, s"),
    _C("worker_wall_s", ACCOUNTING, "float", "isolation: process; the worker's wall time, s"),
)
del _C

BY_NAME: dict[str, Column] = {c.name: c for c in COLUMNS}
# Telemetry snapshots add gpu_before_* / gpu_after_* columns (see attnbench.measure.telemetry.flatten).

IDENTITY_FIELDS = ("impl", "params", "resolution", "patch", "batch", "dim", "heads", "dtype", "mode", "device")


def group(name: str) -> list[str]:
    """The names of one group's columns, in schema order."""
    return [c.name for c in COLUMNS if c.group == name]


def names(columns: Iterable[Column] = COLUMNS) -> list[str]:
    return [c.name for c in columns]


COMPACT = tuple(c.name for c in COLUMNS if c.compact)
EXACT = tuple(c.name for c in COLUMNS if c.compare == "exact")
INFO = tuple(c.name for c in COLUMNS if c.compare == "info")
NUMERIC = tuple(c.name for c in COLUMNS if c.kind in ("int", "float"))
TABLES = tuple((c.table[1], c.name, c.table[2], c.table[3])  # (title, column, scale, format), by position
               for c in sorted((c for c in COLUMNS if c.table), key=lambda c: c.table[0]))
MEASURED = tuple(c.name for c in COLUMNS if c.group in (LATENCY, MEMORY, DERIVED))  # no value unless ok


def cell_id(fields: Mapping[str, Any]) -> str:
    """The identity of a cell: a hash of :data:`IDENTITY_FIELDS`, ``params`` as a mapping or (name,
    value) pairs. One definition for the runner (resume), compare and baselines."""
    params = fields.get("params") or {}
    items = sorted(params.items()) if isinstance(params, Mapping) else [tuple(p) for p in params]
    key = {k: fields.get(k) for k in IDENTITY_FIELDS}
    key["params"] = [list(p) for p in items]
    if fields.get("model"):  # whole-model cells (attention cells keep the hashes they always had)
        key["model"], key["attention"] = fields["model"], fields.get("attention") or ""
        if fields.get("model_kwargs"):
            key["model_kwargs"] = fields["model_kwargs"]
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def device_key(row: Mapping[str, Any]) -> str:
    """The device a row was measured on, for grouping: ``device``, with the GPU's model where the row
    names it (``cuda [NVIDIA H100 80GB HBM3]``), so cells measured on two GPU models of one cluster
    are never drawn on one curve or compared with each other."""
    device = str(row.get("device") or "")
    gpu = row.get("worker_gpu_name")
    if device.startswith("cuda") and isinstance(gpu, str) and gpu and not device.endswith(f"[{gpu}]"):
        return f"{device} [{gpu}]"
    return device


def row_key(row: Mapping[str, Any]) -> str:
    """The row's ``cell_id``, or the same hash computed from its fields when it has none."""
    return str(row.get("cell_id") or cell_id(row))


def check_version(row: Mapping[str, Any], where: str = "row") -> None:
    """Raise :class:`SchemaError` for a row written by a newer schema; rows without a version are old (v1)."""
    version = row.get("schema_version", 1)
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise SchemaError(f"{where} was written with row schema version {version}, newer than this attnbench "
                          f"understands ({SCHEMA_VERSION}); upgrade attnbench to read it")
