"""The regression gate: a comparison judged against thresholds, and the text of both. No torch.

:func:`check` turns a :class:`attnbench.analysis.compare.Comparison` into the failures that exceed
the noise (latency beyond each cell's noise band over the machine's speed factor, memory beyond the
measuring method's resolution; see :mod:`attnbench.analysis.noise`; FLOPs, parameters and statuses
exactly); :func:`confirm` keeps only the noisy failures that a re-run repeats; :func:`parse_fraction`
reads thresholds written ``10%`` or ``0.1``; :func:`thresholds_text` and :func:`verdicts_text` say
which rules were applied and why each cell passed or failed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from . import noise
from .compare import (BIGGER, CHANGED, EXACT_METRICS, WORSE, CellComparison, Comparison, CompareError,
                      MetricResult, _fmt_int)


@dataclass
class Failure:
    cell: CellComparison
    metric: MetricResult
    why: str



def parse_fraction(text: str | float, name: str = "threshold") -> float:
    """``10%`` or ``0.1`` -> 0.1. A bare number above 1 (``10``) is refused as ambiguous."""
    if isinstance(text, (int, float)):
        value = float(text)
        if value > 1:
            raise CompareError(f"{name} {text!r} is ambiguous: write {value:g}% or {value / 100:g}")
        return value
    s = str(text).strip()
    try:
        if s.endswith("%"):
            value = float(s[:-1]) / 100
        else:
            value = float(s)
            if value > 1:
                raise CompareError(f"{name} {text!r} is ambiguous: write {value:g}% or {value / 100:g}")
    except ValueError:
        raise CompareError(f"{name} {text!r} is not a percentage (10%) or a fraction (0.1)") from None
    if not math.isfinite(value) or value < 0:
        raise CompareError(f"{name} {text!r} must be a finite percentage >= 0")
    return value



def latency_failure(cmp: Comparison, m: MetricResult, max_slowdown: float | None = None) -> tuple[bool, str]:
    """(fails, why) for one latency result: the normalized ratio beyond the cell's noise band with
    p < alpha, and slower than before at all (ratio >= 1 + min_effect)."""
    limit, band = m.latency_limit(cmp.max_slowdown if max_slowdown is None else max_slowdown)
    over = f" over the speed factor x{m.scale:.3f}" if m.scale != 1.0 else ""
    text = (f"latency {m.base:.4g} -> {m.new:.4g} ms (x{m.ratio:.3f}, p={m.p_value:.2g}; x{m.ratio_normalized:.3f}"
            f"{over}, p={m.p_normalized:.2g}) ")
    if m.oversubscribed is not None:
        return False, text + (f"NOT JUDGED: other processes took {m.oversubscribed:.2f} CPU cores while it ran, "
                              "leaving its thread(s) no core of their own")
    fails = (m.p_normalized is not None and m.p_normalized < cmp.alpha and m.ratio_normalized >= limit
             and m.ratio >= 1 + cmp.min_effect)
    if fails:
        return True, text + f"exceeds the noise band x{limit:.3f} ({band}) at alpha {cmp.alpha:g}"
    if m.ratio_normalized >= limit:
        return False, text + f"beyond the band x{limit:.3f} but not significant at alpha {cmp.alpha:g}"
    return False, text + f"within the noise band x{limit:.3f} ({band})"


def not_judged(cmp: Comparison) -> list[Failure]:
    """The cells whose latency was not judged (measured on an oversubscribed CPU), as Failure records."""
    out = []
    for c in cmp.cells:
        m = c.metric("latency_ms")
        if m is not None and m.p_value is not None and m.oversubscribed is not None:
            out.append(Failure(c, m, latency_failure(cmp, m)[1]))
    return out


def memory_failure(m: MetricResult, max_memory_growth: float) -> tuple[bool, str]:
    """(fails, why) for one peak-memory result: NEW - BASE beyond the method's resolution and the growth
    threshold."""
    tol, why = noise.memory_tolerance(m.resolution if m.resolution is not None else 0.0, m.why, m.base,
                                      max_memory_growth)
    ratio = f"x{m.ratio:.3f}" if math.isfinite(m.ratio) else "x inf"
    text = f"peak memory {m.base / 2**20:.4g} -> {m.new / 2**20:.4g} MiB ({ratio}, {(m.new - m.base) / 2**20:+.3g} MiB) "
    if m.new - m.base > tol:
        return True, text + f"exceeds the tolerance +{tol / 2**20:.3g} MiB ({why})"
    return False, text + f"within the tolerance +-{tol / 2**20:.3g} MiB ({why})"


def check(cmp: Comparison, max_slowdown: float | None = None, max_memory_growth: float = 0.05,
          fail_on_flops: bool = True, fail_on_status: bool = True, fail_on_missing: bool = False,
          ) -> list[Failure]:
    """The regressions beyond the noise (an empty list: the check passes).

    Latency fails when its ratio over the speed factor exceeds the cell's noise band (floor
    ``max_slowdown``, default the comparison's; see :mod:`attnbench.analysis.noise`) with p <
    ``cmp.alpha``; peak memory when it grew by more than the method's resolution and
    ``max_memory_growth``; any change of FLOPs or parameter count, and an ``ok`` cell that no longer
    is, fail by default; missing cells only with ``fail_on_missing``.
    """
    failures = []
    for c in cmp.cells:
        for m in c.metrics:
            why = None
            if m.metric == "status" and m.verdict == WORSE and fail_on_status:
                why = f"status {m.base} -> {m.new}" + (f" ({m.note})" if m.note else "")
            elif m.metric == "latency_ms" and m.p_value is not None:
                fails, text = latency_failure(cmp, m, max_slowdown)
                why = text if fails else None
            elif m.metric == "peak_mem_bytes" and m.verdict == BIGGER:
                fails, text = memory_failure(m, max_memory_growth)
                why = text if fails else None
            elif m.metric in EXACT_METRICS and m.verdict == CHANGED and fail_on_flops:
                why = f"{m.metric} {_fmt_int(m.base)} -> {_fmt_int(m.new)} (must match exactly)"
            if why:
                failures.append(Failure(c, m, why))
    if fail_on_missing:
        for k, label in cmp.only_base:
            dummy = CellComparison(k, label, {}, {})
            failures.append(Failure(dummy, MetricResult("cell", "present", "missing", verdict=CHANGED),
                                    "in the baseline, missing from the new run"))
        for k, label in cmp.only_new:
            dummy = CellComparison(k, label, {}, {})
            failures.append(Failure(dummy, MetricResult("cell", "missing", "present", verdict=CHANGED),
                                    "in the new run, missing from the baseline"))
    return failures


def thresholds_text(cmp: Comparison, max_slowdown: float | None = None, max_memory_growth: float = 0.05) -> str:
    """The rules a check applies, as printed before its verdicts."""
    floor = cmp.max_slowdown if max_slowdown is None else max_slowdown
    sf = f"x{cmp.speed_factor:.3f}" if cmp.speed_factor is not None else "n/a"
    norm = (f"over the machine's speed factor {sf} (median NEW/BASE ratio of all cells)" if cmp.normalized
            else f"not normalized (speed factor {sf})")
    spread = (f", or 2 x the run-to-run spread recorded from the baseline's {cmp.recorded_runs} runs where larger"
              if cmp.recorded_runs >= 2 else " (the baseline records no run-to-run spread: write it from 2+ runs)")
    mem = (f"{cmp.memory_floor_bytes / 2**20:g} MiB (--memory-floor)" if cmp.memory_floor_bytes is not None else
           "CPU resident set max(6 MiB, 25%), CUDA allocator 64 KiB")
    return "\n".join([
        f"thresholds: latency fails when its ratio {norm} exceeds the cell's noise band: (1 + {100 * floor:g}% floor"
        f"{spread}) x the 95% bounds of both medians, with p < {cmp.alpha:g} (Mann-Whitney U on the raw samples)",
        f"            peak memory fails when it grows by more than the method's resolution ({mem}) and "
        f"+{100 * max_memory_growth:g}%; FLOPs and parameters must match exactly; ok -> failed status fails"])


def verdicts_text(cmp: Comparison, max_slowdown: float | None = None, max_memory_growth: float = 0.05) -> str:
    """One line per cell and judged metric: PASS or FAIL and why."""
    lines = []
    for c in cmp.cells:
        for m in c.metrics:
            if m.metric == "latency_ms" and m.p_value is not None:
                fails, why = latency_failure(cmp, m, max_slowdown)
            elif m.metric == "peak_mem_bytes":
                fails, why = memory_failure(m, max_memory_growth)
            else:
                continue
            lines.append(f"{'FAIL' if fails else 'pass'} {c.label}: {why}")
    return "\n".join(lines)


RETRIABLE = ("status", "latency_ms", "peak_mem_bytes")  # noisy metrics: a retry can confirm or clear them



def confirm(failures: list[Failure], retried: list[Failure], unjudged: set[str] = frozenset()
            ) -> tuple[list[Failure], list[Failure]]:
    """(confirmed, cleared): a noisy failure stays only if the re-measured run fails on the same cell and
    metric; deterministic ones (FLOPs, parameters, missing cells) stay as they are, and so does a latency
    failure whose re-measurement could not be judged (cell keys in ``unjudged``: no free CPU core)."""
    again = {(f.cell.key, f.metric.metric): f for f in retried}
    confirmed, cleared = [], []
    for f in failures:
        if f.metric.metric not in RETRIABLE or (f.metric.metric == "latency_ms" and f.cell.key in unjudged):
            confirmed.append(f)
        elif (f.cell.key, f.metric.metric) in again:
            confirmed.append(again[(f.cell.key, f.metric.metric)])
        else:
            cleared.append(f)
    return confirmed, cleared



def failures_text(failures: list[Failure]) -> str:
    return "\n".join(f"REGRESSION {f.cell.label}: {f.why}" for f in failures)


# --- text -----------------------------------------------------------------------------------------


def _metric_line(m: MetricResult) -> str:
    if m.metric == "latency_ms":
        p = f"p={m.p_value:.2g}" if m.p_value is not None else "p=n/a"
        n = f", n={m.n_base}/{m.n_new}" if m.n_base is not None else ""
        norm = ""
        if m.scale != 1.0 and m.ratio_normalized is not None:
            pn = f"p={m.p_normalized:.2g}" if m.p_normalized is not None else "p=n/a"
            norm = f"; over speed factor x{m.ratio_normalized:.3f} {pn}"
        band = f"; noise band x{m.limit:.3f}" if m.limit is not None else ""
        text = f"latency   {m.base:>10.4g} -> {m.new:<10.4g} ms   x{m.ratio:<7.3f} {p}{n}{norm}{band}  {m.verdict}"
    elif m.metric == "peak_mem_bytes":
        ratio = f"x{m.ratio:<7.3f}" if math.isfinite(m.ratio) else "x inf   "
        text = f"peak mem  {m.base / 2**20:>10.4g} -> {m.new / 2**20:<10.4g} MiB  {ratio} {m.verdict}"
    elif m.metric == "status":
        text = f"status    {m.base} -> {m.new}  {m.verdict}"
    else:
        text = f"{m.metric:<9} {_fmt_int(m.base)} -> {_fmt_int(m.new)}  {m.verdict}"
    return text + (f"  ({m.note})" if m.note else "")



def _floor_text(floor: float | None) -> str:
    if floor is not None:
        return f"{floor / 2**20:g} MiB"
    return "CPU resident set max(6 MiB, 25%), CUDA allocator 64 KiB"



def comparison_text(cmp: Comparison, verbose: bool = False) -> str:
    """Per cell: every metric with its ratio and verdict (``verbose=False``: the changed metrics of
    each cell only, plus a one-line latency summary of the unchanged ones)."""
    lines = [f"base: {cmp.base_dir}", f"new:  {cmp.new_dir}",
             f"latency: two-sided Mann-Whitney U on the raw samples, alpha {cmp.alpha:g}, minimum effect "
             f"{100 * cmp.min_effect:g}%{' (over the speed factor)' if cmp.normalized else ''}; peak memory: "
             f"{100 * cmp.memory_growth:g}% beyond the method's resolution "
             f"({_floor_text(cmp.memory_floor_bytes)}); FLOPs and parameters: exact"]
    for note in cmp.env_notes:
        lines.append(f"note: {note}")
    if cmp.speed_factor is not None:
        lines.append(f"median latency ratio over matched ok cells (speed factor): x{cmp.speed_factor:.3f}")
    counts: dict[str, int] = {}
    lines.append("")
    for c in cmp.cells:
        shown = [m for m in c.metrics if verbose or m.significant or m.metric == "latency_ms"]
        flag = "*" if any(m.significant for m in c.metrics) else " "
        lines.append(f"{flag} {c.label}")
        for m in shown:
            lines.append(f"      {_metric_line(m)}")
            if m.significant:
                counts[f"{m.metric}: {m.verdict}"] = counts.get(f"{m.metric}: {m.verdict}", 0) + 1
    if cmp.only_base:
        lines.append(f"\nonly in base ({len(cmp.only_base)}):")
        lines += [f"  {label}" for _, label in cmp.only_base]
    if cmp.only_new:
        lines.append(f"\nonly in new ({len(cmp.only_new)}):")
        lines += [f"  {label}" for _, label in cmp.only_new]
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no significant change"
    lines.append(f"\n{len(cmp.cells)} matched cell(s): {summary}; {len(cmp.only_base)} only in base, "
                 f"{len(cmp.only_new)} only in new")
    return "\n".join(lines)
