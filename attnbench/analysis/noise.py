"""How far a cell's numbers move when nothing changed: the noise model the regression gate judges
against. No torch.

Latency. Samples taken in one run agree with each other far better than two runs agree: on a shared
CPU a run's medians move by up to ~10% against an earlier run of the same code (other processes,
frequency, cache and allocator state), and a burst of load leaves some calls twice as slow, so the
rank test on the raw samples calls small shifts "significant" that are not. A cell therefore fails
only when its NEW/BASE median ratio, divided by the machine's speed factor (the median ratio over all
cells), exceeds the cell's **noise band**:

    limit = (1 + floor) x (BASE median / lower 95% bound of BASE median)
                        x (upper 95% bound of NEW median / NEW median)

``floor`` is ``max_slowdown`` (default 15%: the run-to-run shift unchanged code showed here, with
margin), raised to twice the cell's **run-to-run spread** when the baseline was written from two or
more runs (``baseline update RUN1 RUN2 ...``; recorded in ``baseline.json`` under ``noise``). The
two confidence factors are the distribution-free order-statistic bounds of each median, taken from
the cell's own samples: a steady cell adds about 1% each, one whose calls split between a fast and
a slowed mode (a burst of load) adds what its median could move, so such a cell needs a larger effect.

Contention. Another process can take a cell's core for its whole timed window (seen on this 2-core
machine: 2x to 6x, with a tight spread, nothing a band could absorb). A CPU cell whose NEW
measurement had no core of its own (other processes took more than ``cores - threads + 0.25`` cores
meanwhile: ``cpu_others_cores``) is not judged on latency at all: reported as NOT JUDGED, never a
failure. ``check`` given a suite re-measures failed and not-judged cells (``--retries``, default 3):
a failure counts only if it repeats; a not-judged cell measured on a free core is judged then.

Peak memory. Each measuring method has a resolution (:data:`MEMORY_RESOLUTION`): CUDA's allocator
peak is exact to its blocks (64 KiB tolerance); the CPU resident-set high-water mark is not (pages,
glibc keeping freed memory, the allocator's arena state): between runs of unchanged code it moved by
up to 4.7 MiB (40 runs of ci_smoke; 39% of a 12 MiB peak), so its tolerance is max(6 MiB, 25%). A cell is
``bigger`` when NEW - BASE exceeds ``max(resolution, max_memory_growth x BASE, 2 x recorded spread)``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

DEFAULT_MAX_SLOWDOWN = 0.15
CONFIDENCE_Z = 1.96  # 95% bounds of each median
OVERSUBSCRIBED_SLACK = 0.25  # cores
SPREAD_FACTOR = 2.0  # a recorded run-to-run spread is doubled: two or three runs under-estimate the range
META_FILE = "baseline.json"

MIB = 2.0 ** 20
# method -> (absolute tolerance in bytes, relative tolerance of the base value, why)
MEMORY_RESOLUTION: dict[str, tuple[float, float, str]] = {
    "cuda_allocator_peak_delta": (64 * 2.0 ** 10, 0.0, "CUDA allocator peak: exact to its blocks"),
    "rss_hwm_delta": (6 * MIB, 0.25, "CPU resident-set peak: pages and freed memory the allocator keeps"),
}
UNKNOWN_RESOLUTION = (6 * MIB, 0.25, "unknown method: treated like the resident set")


def median_bounds(samples: np.ndarray) -> tuple[float, float, float]:
    """(lower, median, upper): distribution-free ~95% bounds of the median from order statistics
    (ranks n/2 -+ 1.96 sqrt(n)/2); with fewer than 6 samples the smallest and largest sample."""
    s = np.sort(np.asarray(samples, dtype=float))
    n = s.size
    med = float(np.median(s))
    if n < 6:
        return float(s[0]), med, float(s[-1])
    k = int(math.floor((n - CONFIDENCE_Z * math.sqrt(n)) / 2))
    k = max(0, min(k, n // 2 - 1))
    return float(s[k]), med, float(s[n - 1 - k])


def confidence_factor(base: np.ndarray, new: np.ndarray) -> tuple[float, float]:
    """(base, new): BASE median / its lower 95% bound, and NEW's upper bound / NEW median (each >= 1)."""
    lo_b, med_b, _ = median_bounds(base)
    _, med_n, hi_n = median_bounds(new)
    return (med_b / lo_b if lo_b > 0 else math.inf), (hi_n / med_n if med_n > 0 else math.inf)


def oversubscribed(row: Mapping[str, Any], cores: float | None) -> float | None:
    """Other processes' CPU cores during the cell's timed calls (``cpu_others_cores``) when they left the
    cell's threads no core of their own (more than ``cores - threads +`` :data:`OVERSUBSCRIBED_SLACK`),
    else None. Such a measurement says how busy the machine was, not how fast the code is: on this
    2-core machine, cells measured so were up to 6x slower with a tight spread, and re-measured so again
    for minutes at a time."""
    oc, threads = row.get("cpu_others_cores"), row.get("cpu_threads") or 1
    if str(row.get("device") or "cpu") != "cpu" or not cores or not isinstance(oc, (int, float)) \
            or isinstance(oc, bool) or not math.isfinite(oc):
        return None
    return float(oc) if oc > cores - threads + OVERSUBSCRIBED_SLACK else None


def latency_limit(floor: float, ci_base: float, ci_new: float, run_spread: float | None = None
                  ) -> tuple[float, str]:
    """(limit, why): the normalized NEW/BASE ratio a cell must exceed to be slower (see the docstring)."""
    used, src = floor, f"{100 * floor:g}% floor"
    if run_spread is not None and SPREAD_FACTOR * run_spread > floor:
        used, src = SPREAD_FACTOR * run_spread, f"2 x run-to-run spread {100 * run_spread:.3g}%"
    limit = (1 + used) * ci_base * ci_new
    return limit, f"{src}, median bounds +{100 * (ci_base - 1):.2g}% base, +{100 * (ci_new - 1):.2g}% new"


def memory_resolution(base: Mapping[str, Any], new: Mapping[str, Any], floor: float | None = None,
                      spread: float | None = None) -> tuple[float, str]:
    """(bytes, why): how much NEW's peak may differ from BASE's as noise of the measuring method, before
    any growth threshold. ``floor`` (bytes) replaces the methods' absolute resolution; ``spread`` is
    the recorded range of the cell's peak over the baseline's runs."""
    methods = [m for m in (base.get("peak_mem_method"), new.get("peak_mem_method")) if m]
    res = [MEMORY_RESOLUTION.get(m, UNKNOWN_RESOLUTION) for m in methods] or [UNKNOWN_RESOLUTION]
    absolute, relative, why = max(res, key=lambda r: (r[0], r[1]))
    if floor is not None:
        absolute, relative, why = floor, 0.0, f"memory floor {floor / MIB:g} MiB"
    vb = float(base.get("peak_mem_bytes") or 0.0)
    cands = [(absolute, why)]
    if relative:
        cands.append((relative * vb, f"{why}: {100 * relative:g}% of the base"))
    if spread:
        cands.append((SPREAD_FACTOR * spread, f"2 x recorded spread {spread / MIB:.3g} MiB"))
    return max(cands, key=lambda c: c[0])


def memory_tolerance(resolution: float, why: str, base_bytes: float, growth: float) -> tuple[float, str]:
    """The resolution, or ``growth`` x BASE where that is larger."""
    if growth * base_bytes > resolution:
        return growth * base_bytes, f"+{100 * growth:g}% growth threshold"
    return resolution, why


# --- run-to-run spread, recorded in a baseline written from several runs --------------------------

def _medians(rows: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    from .. import schema
    from ..measurement import median_ms

    out = {}
    for r in rows:
        m = median_ms(r) if r.get("status", "ok") == "ok" else None
        if m and m > 0:
            out[schema.row_key(dict(r))] = m
    return out


def run_spread(runs: list[list[Mapping[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per cell (key), from two or more runs of the same suite: ``latency_spread``, the largest
    |log| deviation of a run's median (divided by that run's speed factor against the first run) from
    the median over runs, as a fraction; ``memory_spread_bytes``, max - min of the peak memory."""
    from .. import schema

    if len(runs) < 2:
        return {}
    meds = [_medians(r) for r in runs]
    ref = meds[0]
    normed: list[dict[str, float]] = []
    for m in meds:
        logs = [math.log(m[k] / ref[k]) for k in m if k in ref]
        sf = math.exp(float(np.median(logs))) if len(logs) >= 4 else 1.0
        normed.append({k: v / sf for k, v in m.items()})
    mems: dict[str, list[float]] = {}
    for rows in runs:
        for r in rows:
            v = r.get("peak_mem_bytes")
            if r.get("status", "ok") == "ok" and isinstance(v, (int, float)) and math.isfinite(v):
                mems.setdefault(schema.row_key(dict(r)), []).append(float(v))
    out: dict[str, dict[str, float]] = {}
    for k in ref:
        vals = [n[k] for n in normed if k in n]
        if len(vals) >= 2:
            centre = float(np.median(vals))
            out.setdefault(k, {})["latency_spread"] = max(abs(math.log(v / centre)) for v in vals)
    for k, vals in mems.items():
        if len(vals) >= 2:
            out.setdefault(k, {})["memory_spread_bytes"] = max(vals) - min(vals)
    return out


def read_noise(folder: str | Path) -> dict[str, dict[str, float]]:
    """The per-cell spread a baseline folder records (empty for a plain run or a one-run baseline)."""
    meta = Path(folder) / META_FILE
    if not meta.is_file():
        return {}
    try:
        data = json.loads(meta.read_text())
    except (OSError, ValueError):
        return {}
    noise = data.get("noise") if isinstance(data, dict) else None
    cells = noise.get("cells") if isinstance(noise, dict) else None
    return cells if isinstance(cells, dict) else {}


def recorded_runs(folder: str | Path) -> int:
    """How many runs a baseline's recorded spread came from (0: none recorded)."""
    try:
        data = json.loads((Path(folder) / META_FILE).read_text())
        return int((data.get("noise") or {}).get("runs") or 0)
    except (OSError, ValueError, TypeError, AttributeError):
        return 0
