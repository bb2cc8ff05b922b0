"""Compare two run folders cell by cell, and judge a new run against a baseline.

No torch import: this works on run folders copied anywhere (it needs numpy and scipy).

Cells are matched by ``cell_id`` (a hash of implementation, parameters, resolution, patch, batch,
dim, heads, dtype, mode and device; rows without one are keyed by those fields). For each matched
cell and metric the verdict is one of:

* latency: ``slower``, ``faster`` or ``no significant change``. The ratio is NEW median / BASE median.
  A change needs BOTH a two-sided Mann-Whitney U test on the raw per-call samples with p < ``alpha``
  (default 0.01) AND an effect of at least ``min_effect`` (default 5%): slower means ratio >= 1 +
  min_effect, faster means ratio <= 1 / (1 + min_effect). With few samples the test cannot reach
  ``alpha`` at all (n = m = 5: smallest two-sided p is 0.008); the line says so.
  Each latency result also carries the cell's noise band (:mod:`attnbench.analysis.noise`): the
  normalized ratio it must exceed before ``check`` fails it (``limit``).
* peak memory (one value per cell, no samples): ``bigger`` / ``smaller`` when the difference exceeds
  the measuring method's resolution and ``memory_growth`` (default 5%) of the base: CUDA allocator
  peaks are exact (64 KiB); the CPU resident-set peak moves by MiBs between runs of unchanged code,
  tolerance max(6 MiB, 25%); see :mod:`attnbench.analysis.noise`.
* FLOPs (``flops_analytic``, ``flops_torch``, ``flops_torch_fwd_bwd``, ``macs_fvcore``) and
  ``params_count``: deterministic, so any difference is ``changed``.
* status: a cell that was ``ok`` and is now ``oom``, ``error``, ... is ``worse`` (a regression); the
  other way round ``better``; any other change of status ``changed``.

:func:`check` applies thresholds (``max_slowdown``, ``max_memory_growth``) to a comparison and
returns the failures. By default (``normalize=True``) latency is judged over the run-wide median
ratio (the machine's speed factor: on a shared CPU a busy machine slows every cell together).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import schema, store
from ..errors import AttnbenchError
from ..schema import Status
from ..measurement import Latency, median_ms
from . import noise

DEFAULT_ALPHA = 0.01
DEFAULT_MIN_EFFECT = 0.05
DEFAULT_MEMORY_GROWTH = 0.05
DEFAULT_MAX_SLOWDOWN = noise.DEFAULT_MAX_SLOWDOWN
EXACT_METRICS = schema.EXACT  # deterministic: any difference is a change
INFO_METRICS = schema.INFO  # shown side by side, never a verdict
IDENTITY = schema.IDENTITY_FIELDS
MIN_CELLS_TO_NORMALIZE = 4

SLOWER, FASTER, SAME = "slower", "faster", "no significant change"
BIGGER, SMALLER = "bigger", "smaller"
CHANGED, EQUAL = "changed", "equal"
WORSE, BETTER = "worse", "better"
SHOWN = "shown, not judged"  # an info column


class CompareError(AttnbenchError):
    """Runs that cannot be compared (not run folders, bad thresholds)."""


@dataclass
class MetricResult:
    """One metric of one matched cell."""

    metric: str  # latency_ms, peak_mem_bytes, flops_analytic, ..., status
    base: Any
    new: Any
    ratio: float | None = None  # new / base
    p_value: float | None = None  # latency only
    verdict: str = SAME
    note: str = ""
    n_base: int | None = None
    n_new: int | None = None
    scale: float = 1.0  # latency with normalization: the speed factor the base was scaled by
    ratio_normalized: float | None = None  # ratio / scale
    p_normalized: float | None = None  # the test of NEW against BASE x scale
    ci_base: float = 1.0  # latency: BASE median / its lower 95% bound
    ci_new: float = 1.0  # latency: NEW's upper 95% bound / NEW median
    spread: float | None = None  # run-to-run spread the baseline recorded (latency: fraction; memory: bytes)
    limit: float | None = None  # latency: the normalized ratio check fails above (the noise band)
    tolerance: float | None = None  # memory: bytes NEW may exceed BASE by (resolution, growth threshold)
    resolution: float | None = None  # memory: the method's resolution (bytes), before any growth threshold
    why: str = ""  # where limit / tolerance came from

    oversubscribed: float | None = None  # latency: other processes' cores while NEW ran without a core of its own

    def latency_limit(self, max_slowdown: float) -> tuple[float, str]:
        return noise.latency_limit(max_slowdown, self.ci_base, self.ci_new, self.spread)

    @property
    def significant(self) -> bool:
        return self.verdict not in (SAME, EQUAL, SHOWN)


@dataclass
class CellComparison:
    key: str
    label: str  # human-readable description of the cell
    base: dict[str, Any]
    new: dict[str, Any]
    metrics: list[MetricResult] = field(default_factory=list)

    def metric(self, name: str) -> MetricResult | None:
        return next((m for m in self.metrics if m.metric == name), None)


@dataclass
class Comparison:
    base_dir: Path
    new_dir: Path
    cells: list[CellComparison]
    only_base: list[tuple[str, str]]  # (key, label) of cells missing from the new run
    only_new: list[tuple[str, str]]  # (key, label) of cells missing from the base run
    alpha: float
    min_effect: float
    memory_growth: float
    env_notes: list[str] = field(default_factory=list)
    speed_factor: float | None = None  # median latency ratio over the matched ok cells
    memory_floor_bytes: float | None = None  # None: by measuring method
    max_slowdown: float = DEFAULT_MAX_SLOWDOWN  # the noise band's floor
    normalized: bool = False  # latency judged over the speed factor
    recorded_runs: int = 0  # runs the baseline's recorded spread came from (0: none recorded)

    def significant(self) -> list[tuple[CellComparison, MetricResult]]:
        return [(c, m) for c in self.cells for m in c.metrics if m.significant]


# --- matching -------------------------------------------------------------------------------------

def cell_key(row: dict[str, Any]) -> str:
    """The row's cell_id (or the same identity hashed from its fields) on its device key: cells measured
    on two GPU models never match."""
    return f"{schema.row_key(row)}@{schema.device_key(row)}"


def describe(row: dict[str, Any]) -> str:
    """``sra.conv(sr_ratio=8) 224px b1 float32 forward cpu`` (the shape's name when it has one)."""
    where = f"{row.get('shape')}({row.get('resolution')}px/{row.get('patch')})" if row.get("shape") \
        else f"{row.get('resolution')}px"
    label = row.get("label") or row.get("impl")
    return f"{label} {where} b{row.get('batch')} d{row.get('dim')}h{row.get('heads')} " \
           f"{row.get('dtype')} {row.get('mode')} {row.get('device')}"


def read_run(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows and environment of a run folder (or a baseline folder, which is one)."""
    path = Path(path)
    if not path.exists():
        raise CompareError(f"{path} does not exist")
    if not path.is_dir() or not (path / store.ROWS_FILE).is_file():
        raise CompareError(f"{path} is not a run folder (no {store.ROWS_FILE})")
    return store.read_rows(path), store.read_env(path)


def _index(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        out[cell_key(r)] = r  # a cell measured twice (resumed runs): the last row wins
    return out


# --- metrics --------------------------------------------------------------------------------------

def _num(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _samples(row: dict[str, Any]) -> np.ndarray | None:
    lat = Latency.from_row(row)
    return np.asarray(lat.samples_ms, dtype=float) if lat is not None else None


def _median(row: dict[str, Any], samples: np.ndarray | None = None) -> float | None:
    """Median latency (ms) of the raw samples, or the row's recorded median when it has none."""
    return float(np.median(samples)) if samples is not None else median_ms(row)


def mann_whitney_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided Mann-Whitney U p-value (exact for small samples without ties, else asymptotic)."""
    from scipy.stats import mannwhitneyu

    if np.array_equal(np.sort(a), np.sort(b)):
        return 1.0
    return float(mannwhitneyu(a, b, alternative="two-sided", method="auto").pvalue)


def min_p_value(n: int, m: int) -> float:
    """The smallest two-sided p-value a rank test can give with samples of n and m (complete separation)."""
    return min(1.0, 2.0 / math.comb(n + m, n))


def _verdict(p: float, ratio: float, alpha: float, min_effect: float) -> str:
    if p < alpha and ratio >= 1 + min_effect:
        return SLOWER
    if p < alpha and ratio <= 1 / (1 + min_effect):
        return FASTER
    return SAME


def latency_result(base: dict[str, Any], new: dict[str, Any], alpha: float, min_effect: float,
                   scale: float = 1.0, max_slowdown: float = DEFAULT_MAX_SLOWDOWN,
                   spread: float | None = None, cores: float | None = None) -> MetricResult | None:
    """Latency verdict from the raw samples.

    ``scale`` (the machine's speed factor, 1 without normalization) multiplies the base samples for
    a second test, ``p_normalized`` / ``ratio_normalized``; the verdict then uses that one.
    """
    a, b = _samples(base), _samples(new)
    mb, mn = _median(base, a), _median(new, b)
    if mb is None or mn is None:
        return None
    ratio = mn / mb if mb > 0 else math.inf
    res = MetricResult("latency_ms", mb, mn, ratio, scale=scale, ratio_normalized=ratio / scale)
    if a is None or b is None:
        res.note = "no raw samples on one side: ratio only, not tested"
        return res
    res.n_base, res.n_new = int(a.size), int(b.size)
    res.ci_base, res.ci_new = noise.confidence_factor(a, b)
    res.spread = spread
    res.oversubscribed = noise.oversubscribed(new, cores)
    res.limit, res.why = res.latency_limit(max_slowdown)
    res.p_value = mann_whitney_p(a, b)
    res.p_normalized = mann_whitney_p(a * scale, b) if scale != 1.0 else res.p_value
    if min_p_value(a.size, b.size) >= alpha:
        res.note = f"{a.size} vs {b.size} samples cannot reach p < {alpha:g}"
    res.verdict = _verdict(res.p_normalized, res.ratio_normalized, alpha, min_effect)
    return res


def memory_result(base: dict[str, Any], new: dict[str, Any], growth: float,
                  floor: float | None = None, spread: float | None = None) -> MetricResult | None:
    """``bigger`` / ``smaller`` beyond the method's resolution and ``growth`` of the base."""
    vb, vn = _num(base.get("peak_mem_bytes")), _num(new.get("peak_mem_bytes"))
    if vb is None or vn is None:
        return None
    resolution, why = noise.memory_resolution(base, new, floor, spread)
    tol, why = noise.memory_tolerance(resolution, why, vb, growth)
    ratio = vn / vb if vb > 0 else (1.0 if vn == 0 else math.inf)
    res = MetricResult("peak_mem_bytes", vb, vn, ratio, spread=spread, tolerance=tol, resolution=resolution,
                       why=why)
    if abs(vn - vb) <= tol:
        res.note = f"within +-{tol / 2**20:.3g} MiB ({why})" if vn != vb else ""
    elif vn > vb:
        res.verdict = BIGGER
    else:
        res.verdict = SMALLER
    return res


def exact_result(metric: str, base: dict[str, Any], new: dict[str, Any]) -> MetricResult | None:
    vb, vn = base.get(metric), new.get(metric)
    nb, nn = _num(vb), _num(vn)
    if nb is None and nn is None:
        return None
    ratio = nn / nb if nb and nn is not None else None
    res = MetricResult(metric, vb, vn, ratio, verdict=EQUAL if nb == nn else CHANGED)
    if nb is None or nn is None:
        res.note = "counted on one side only"
    return res


def status_result(base: dict[str, Any], new: dict[str, Any]) -> MetricResult:
    sb, sn = base.get("status", Status.OK), new.get("status", Status.OK)
    res = MetricResult("status", sb, sn, verdict=EQUAL)
    if sb != sn:
        res.verdict = WORSE if sb == Status.OK else BETTER if sn == Status.OK else CHANGED
        res.note = str(new.get("message") or "")[:200]
    return res


# --- comparing ------------------------------------------------------------------------------------

def _env_notes(eb: dict[str, Any], en: dict[str, Any]) -> list[str]:
    def dev(e: dict[str, Any]) -> str:
        gpu = e.get("gpu")
        return gpu.get("name") if isinstance(gpu, dict) and gpu.get("name") else \
            f"CPU {(e.get('cpu') or {}).get('model')}"

    notes = []
    pairs = [("device", dev(eb), dev(en)),
             ("torch", (eb.get("torch") or {}).get("version"), (en.get("torch") or {}).get("version")),
             ("threads", (eb.get("torch") or {}).get("num_threads"), (en.get("torch") or {}).get("num_threads"))]
    for what, b, n in pairs:
        if eb and en and b != n:
            notes.append(f"{what} differs: base {b}, new {n}")
    return notes


def compare_runs(base_dir: str | Path, new_dir: str | Path, alpha: float = DEFAULT_ALPHA,
                 min_effect: float = DEFAULT_MIN_EFFECT, memory_growth: float = DEFAULT_MEMORY_GROWTH,
                 memory_floor_bytes: float | None = None, normalize: bool = True,
                 max_slowdown: float = DEFAULT_MAX_SLOWDOWN, speed_factor: float | None = None) -> Comparison:
    """Match the cells of two runs and give each metric a verdict (see the module's docstring).

    ``normalize`` (default) scales the base latencies by the median NEW/BASE latency ratio over all
    matched ok cells before judging (only with at least 4 such cells), so a uniformly slower machine
    does not make every cell "slower"; ``Comparison.speed_factor`` records that ratio either way.
    ``speed_factor`` imposes the factor (a re-measurement of a few cells judged by its first run's).
    ``max_slowdown`` is the floor of each cell's noise band; a baseline written from several runs
    adds its recorded run-to-run spread (:mod:`attnbench.analysis.noise`).
    """
    _check_fraction("alpha", alpha, upper=1.0)
    _check_fraction("min_effect", min_effect)
    _check_fraction("memory_growth", memory_growth)
    _check_fraction("max_slowdown", max_slowdown)
    rows_b, env_b = read_run(base_dir)
    rows_n, env_n = read_run(new_dir)
    ib, inew = _index(rows_b), _index(rows_n)
    spreads = noise.read_noise(base_dir)
    cpu = env_n.get("cpu") or {}
    cores = cpu.get("affinity") or cpu.get("logical_cores")
    common = [k for k in ib if k in inew]
    only_base = [(k, describe(ib[k])) for k in ib if k not in inew]
    only_new = [(k, describe(inew[k])) for k in inew if k not in ib]

    ratios = []
    for k in common:
        if ib[k].get("status", Status.OK) == Status.OK and inew[k].get("status", Status.OK) == Status.OK:
            mb, mn = _median(ib[k]), _median(inew[k])
            if mb and mn and math.isfinite(mn / mb):
                ratios.append(mn / mb)
    speed = float(np.exp(np.median(np.log(ratios)))) if ratios else None
    scale = speed if normalize and speed and len(ratios) >= MIN_CELLS_TO_NORMALIZE else 1.0
    if normalize and speed_factor is not None:  # given: a re-measurement of a few cells judged like its run
        _check_fraction("speed_factor", speed_factor)
        speed = scale = float(speed_factor)

    cells = []
    for k in common:
        b, n = ib[k], inew[k]
        cc = CellComparison(k, describe(n), b, n)
        cc.metrics.append(status_result(b, n))
        if b.get("status", Status.OK) == Status.OK and n.get("status", Status.OK) == Status.OK:
            sp = spreads.get(schema.row_key(b), {})
            lat = latency_result(b, n, alpha, min_effect, scale, max_slowdown, sp.get("latency_spread"), cores)
            if lat is not None:
                cc.metrics.append(lat)
            mem = memory_result(b, n, memory_growth, memory_floor_bytes, sp.get("memory_spread_bytes"))
            if mem is not None:
                cc.metrics.append(mem)
        for metric in EXACT_METRICS:
            ex = exact_result(metric, b, n)
            if ex is not None:
                cc.metrics.append(ex)
        for metric in INFO_METRICS:
            vb, vn = _num(b.get(metric)), _num(n.get(metric))
            if vb is not None or vn is not None:
                cc.metrics.append(MetricResult(metric, vb, vn, vn / vb if vb and vn is not None else None,
                                               verdict=SHOWN))
        cells.append(cc)
    cmp = Comparison(Path(base_dir), Path(new_dir), cells, only_base, only_new, alpha, min_effect, memory_growth,
                     _env_notes(env_b, env_n), speed, memory_floor_bytes, max_slowdown,
                     bool(normalize and speed and (len(ratios) >= MIN_CELLS_TO_NORMALIZE or speed_factor is not None)),
                     noise.recorded_runs(base_dir))
    if normalize and scale == 1.0 and speed is not None:
        cmp.env_notes.append(f"not normalized: only {len(ratios)} matched ok cell(s), "
                             f"{MIN_CELLS_TO_NORMALIZE} needed")
    return cmp


def _check_fraction(name: str, value: float, upper: float | None = None) -> None:
    if not isinstance(value, (int, float)) or math.isnan(value) or value < 0 or (upper is not None and value >= upper):
        raise CompareError(f"{name} must be a number >= 0{f' and < {upper:g}' if upper else ''}, got {value!r}")


def _fmt_int(v: Any) -> str:
    n = _num(v)
    return "none" if n is None else f"{int(n):,}" if n == int(n) else f"{n:g}"
