"""The regression gate: a comparison judged against thresholds, and the text of both. No torch.

:func:`check` turns a :class:`attnbench.analysis.compare.Comparison` into the failures that exceed
the thresholds (``max_slowdown``, ``max_memory_growth``; FLOPs, parameters and statuses exactly);
:func:`confirm` keeps only the noisy failures that a re-run repeats; :func:`parse_fraction` reads
thresholds written ``10%`` or ``0.1``. With ``normalize=True`` in the comparison a cell's latency must
also be slower than the run-wide median ratio (the machine's speed factor) by more than
``max_slowdown`` to fail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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



def check(cmp: Comparison, max_slowdown: float = 0.10, max_memory_growth: float = 0.05,
          fail_on_flops: bool = True, fail_on_status: bool = True, fail_on_missing: bool = False,
          ) -> list[Failure]:
    """The significant regressions beyond the thresholds (an empty list: the check passes).

    Latency fails when p < ``cmp.alpha`` and NEW/BASE median >= 1 + ``max_slowdown`` (with
    normalization, both the plain ratio and the ratio over the speed factor must pass it); peak
    memory when the ratio passes 1 + ``max_memory_growth`` and the difference exceeds the floor;
    any change of FLOPs or parameter count, and an ``ok`` cell that no longer is, fail by default;
    missing cells only with ``fail_on_missing``.
    """
    failures = []
    for c in cmp.cells:
        for m in c.metrics:
            why = None
            if m.metric == "status" and m.verdict == WORSE and fail_on_status:
                why = f"status {m.base} -> {m.new}" + (f" ({m.note})" if m.note else "")
            elif m.metric == "latency_ms" and m.p_value is not None:
                limit = 1 + max_slowdown
                if (m.p_value < cmp.alpha and m.ratio >= limit
                        and m.p_normalized < cmp.alpha and m.ratio_normalized >= limit):
                    norm = (f"; x{m.ratio_normalized:.3f}, p={m.p_normalized:.2g} over the speed factor "
                            f"x{m.scale:.3f}") if m.scale != 1.0 else ""
                    why = (f"latency {m.base:.4g} -> {m.new:.4g} ms (x{m.ratio:.3f}, p={m.p_value:.2g}{norm}) "
                           f"exceeds +{100 * max_slowdown:g}% at alpha {cmp.alpha:g}")
            elif m.metric == "peak_mem_bytes" and m.verdict == BIGGER and m.ratio >= 1 + max_memory_growth:
                why = (f"peak memory {m.base / 2**20:.4g} -> {m.new / 2**20:.4g} MiB (x{m.ratio:.3f}) "
                       f"exceeds +{100 * max_memory_growth:g}%")
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



RETRIABLE = ("status", "latency_ms", "peak_mem_bytes")  # noisy metrics: a retry can confirm or clear them



def confirm(failures: list[Failure], retried: list[Failure]) -> tuple[list[Failure], list[Failure]]:
    """(confirmed, cleared): a noisy failure stays only if the re-measured run fails on the same cell and
    metric; deterministic ones (FLOPs, parameters, missing cells) stay as they are."""
    again = {(f.cell.key, f.metric.metric): f for f in retried}
    confirmed, cleared = [], []
    for f in failures:
        if f.metric.metric not in RETRIABLE:
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
        text = f"latency   {m.base:>10.4g} -> {m.new:<10.4g} ms   x{m.ratio:<7.3f} {p}{n}{norm}  {m.verdict}"
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
    return "CPU resident set 2 MiB, CUDA allocator 64 KiB"



def comparison_text(cmp: Comparison, verbose: bool = False) -> str:
    """Per cell: every metric with its ratio and verdict (``verbose=False``: the changed metrics of
    each cell only, plus a one-line latency summary of the unchanged ones)."""
    lines = [f"base: {cmp.base_dir}", f"new:  {cmp.new_dir}",
             f"latency: two-sided Mann-Whitney U on the raw samples, alpha {cmp.alpha:g}, minimum effect "
             f"{100 * cmp.min_effect:g}%; peak memory: {100 * cmp.memory_growth:g}% beyond a floor "
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
