"""The headline of a report: what was run, how it went and what the answers are, in a few lines a
reader sees before any table. pandas only (no torch, no matplotlib).

:func:`headline` returns the facts (suite, device, cell counts by status) and the answers the suite
was run for: the fastest design at the largest size, each pair's speed-up range, the fitted growth
exponents against theory, and the cells the reader must distrust, with why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from ..schema import Status
from . import fmt
from . import run as runs
from .summary import attention_cells

OFF_THEORY = 0.25  # a fitted exponent further than this from its family's theory is called out


@dataclass
class Answer:
    title: str  # "Fastest at the largest size"
    lines: list[str] = field(default_factory=list)
    warn: bool = False  # the reader should look before trusting the run


@dataclass
class Headline:
    suite: str
    description: str
    device: str
    counts: list[tuple[str, int]]  # (status, cells), ok first
    total: int
    groups: list[str]  # "float32 · forward"
    answers: list[Answer]


def status_counts(df: pd.DataFrame) -> list[tuple[str, int]]:
    counts = df["status"].value_counts().to_dict()
    order = [Status.OK.value] + sorted(k for k in counts if k != Status.OK.value)
    return [(k, int(counts[k])) for k in order if k in counts]


def _where(run: runs.Run, r: pd.Series) -> str:
    if run.by_shape:
        return str(r["shape"])
    return f"{int(r['resolution'])} px ({fmt.group(r['tokens'])} tokens)"


def fastest(run: runs.Run, g: pd.DataFrame) -> list[str]:
    """The fastest design at the largest size where any design finished (each stage for named shapes)."""
    ok = g[g["status"] == Status.OK]
    if ok.empty:
        return ["no cell finished: nothing to rank"]
    if run.by_shape:
        out = []
        for s in runs.shape_order(run, g):
            cells = ok[ok["shape"] == s].sort_values("latency_ms_median")
            if len(cells):
                r = cells.iloc[0]
                nxt = (f", {fmt.times(cells.iloc[1]['latency_ms_median'] / r['latency_ms_median'])} ahead of "
                       f"{cells.iloc[1]['label']}" if len(cells) > 1 else "")
                out.append(f"{s}: {r['label']} {fmt.ms(r['latency_ms_median'])}{nxt}")
        return out
    top = ok["tokens"].max()
    cells = ok[ok["tokens"] == top].sort_values("latency_ms_median")
    r = cells.iloc[0]
    at_top = g[g["tokens"] == g["tokens"].max()]
    line = f"at {_where(run, r)}: {r['label']}, {fmt.ms(r['latency_ms_median'])}"
    if len(cells) > 1:
        r2 = cells.iloc[1]
        line += (f"; next {r2['label']} {fmt.ms(r2['latency_ms_median'])} "
                 f"({fmt.times(r2['latency_ms_median'] / r['latency_ms_median'])} slower)")
    lines = [line]
    if top < g["tokens"].max():
        lines.append(f"no design finished at the largest size, {_where(run, at_top.iloc[0])}")
    else:
        failed = at_top[at_top["status"] != Status.OK]
        if len(failed):
            words = pd.Series([str(s).replace("_", " ") for s in failed["status"]]).value_counts()
            lines.append(f"{len(cells)} of {len(at_top)} designs finished there; "
                         + ", ".join(f"{n} {w}" for w, n in words.items()))
    return lines


def speedup_lines(run: runs.Run, g: pd.DataFrame) -> list[str]:
    sp = runs.speedups(run, g)
    out = []
    for pair, s in sp.groupby("pair", sort=False):
        lo, hi = s.loc[s["speedup"].idxmin()], s.loc[s["speedup"].idxmax()]
        where = (lambda r: r["shape"]) if run.by_shape else (lambda r: f"{int(r['resolution'])} px")
        if len(s) == 1:
            out.append(f"{pair}: {fmt.times(lo['speedup'])} at {where(lo)}")
        else:
            out.append(f"{pair}: {fmt.times(lo['speedup'])} ({where(lo)}) to {fmt.times(hi['speedup'])} "
                       f"({where(hi)}), {len(s)} sizes")
    return out


def exponent_lines(run: runs.Run, g: pd.DataFrame) -> tuple[list[str], bool]:
    """``label: k = 1.98 ± 0.03, theory 2`` per fitted series, those off theory first; and whether any is."""
    off, near, unfitted = [], [], []
    for r in runs.exponent_rows(run, g):
        lat = r["latency"]
        if lat is None:
            unfitted.append(r["series"])
            continue
        if r["theory"] is not None and abs(lat.k - r["theory"]) > OFF_THEORY:
            off.append(f"{r['series']}: k = {fmt.exponent(lat.k, lat.stderr)}, theory {r['theory']:g} "
                       f"(off by {lat.k - r['theory']:+.2f})")
        else:
            near.append(f"{r['series']} {lat.k:.2f}" + (f" (theory {r['theory']:g})" if r["theory"] is not None
                                                        else ""))
    lines = off + ([("as theory says (within ±%g): " % OFF_THEORY if off else "all as theory says (within ±%g): "
                     % OFF_THEORY) + ", ".join(near)] if near else [])
    if unfitted:
        lines.append(f"no fit (fewer than 3 measured sizes): {', '.join(unfitted)}")
    return lines, bool(off)


def distrust_lines(df: pd.DataFrame) -> list[str]:
    cells = attention_cells(df)
    for c in cells:  # "mha.math 384px (9216 tokens) float32 forward batch 1" -> "mha.math 384px"
        c["cell"] = c["cell"].split(" (")[0]
        c["detail"] = c["detail"].split(" on a median of ")[0]
    out = []
    for kind, why in (("noisy", "timed calls spread: IQR above 10% of the median"),
                      ("drift", "the machine was slowed while they ran"),
                      ("throttled", "the GPU throttled"), ("over peak", "faster than the device's measured peak")):
        hit = [c for c in cells if c["kind"] == kind]
        if hit:
            names = "; ".join(f"{c['cell']} ({c['detail']})" for c in hit[:3])
            more = f"; and {len(hit) - 3} more" if len(hit) > 3 else ""
            out.append(f"{len(hit)} {kind} ({why}): {names}{more}")
    errors = [c for c in cells if c["kind"] == "failed" and c["status"] not in runs.PREDICTABLE]
    if errors:
        out.append(f"{len(errors)} failed for a reason other than size: "
                   + "; ".join(f"{c['cell']}: {c['status']}, {c['detail']}" for c in errors[:3])
                   + (f"; and {len(errors) - 3} more" if len(errors) > 3 else ""))
    return out


def headline(run: runs.Run) -> Headline:
    groups = run.groups()
    answers: list[Answer] = []
    many = len(groups) > 1
    for dtype, mode, g in groups:
        tag = f" ({dtype}, {mode})" if many else ""
        answers.append(Answer("Fastest at the largest size" if not run.by_shape else "Fastest per stage",
                              fastest(run, g)))
        answers[-1].title += tag
        sp = speedup_lines(run, g)
        if sp:
            answers.append(Answer("Speed-ups of the pairs (baseline / candidate latency)" + tag, sp))
        if not run.by_shape:
            lines, off = exponent_lines(run, g)
            if lines:
                answers.append(Answer(f"Latency growth, cost ~ N^k, against theory{tag}", lines, warn=off))
    distrust = distrust_lines(run.df)
    answers.append(Answer("Cells to distrust", distrust or ["none: no noisy, drifted, throttled or erroring cell"],
                          warn=bool(distrust)))
    return Headline(run.name, str(run.suite.get("description") or "").strip(), runs.device_name(run.env, run.df),
                    status_counts(run.df), len(run.df), [f"{d} · {m}" for d, m, _ in groups], answers)
