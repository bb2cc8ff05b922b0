"""Grouped bar charts for runs over named shapes (e.g. the four Swin stages, whose dims differ): a
metric, or the speed-ups of the suite's pairs, per stage. Not resolution sweeps: no curves, no
exponents."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .draw import Style, _legend, _new_figure, mcolors_patch, title_for
from ..schema import Status, status_word
from .run import Run, metric_of, series_of, shape_order


def _shape_ticklabels(g: pd.DataFrame, shapes: list[str]) -> list[str]:
    out = []
    for s in shapes:
        r = g[g["shape"] == s].iloc[0]
        grid = f"{int(r['grid_h'])}x{int(r['grid_w'])}" if r.get("grid_h") == r.get("grid_h") else ""
        out.append(f"{s}\n{grid} tokens\ndim {int(r['dim'])}, {int(r['heads'])} heads")
    return out



def bar_figure(run: Run, g: pd.DataFrame, key: str, dtype: str, mode: str) -> tuple[Figure, dict[str, Any]]:
    """One metric per named shape (stage) as grouped bars; failed cells shown by their status."""
    metric = metric_of(key, g)
    timed = key in ("latency", "throughput")  # noisiness is a property of the timing
    shapes = shape_order(run, g)
    series = series_of(run, g)
    fig, ax = _new_figure(height=4.4)
    width = 0.8 / max(len(series), 1)
    info: dict[str, Any] = {"metric": key, "series": [], "marked": []}
    handles = []
    top = 0.0
    bars = []
    for j, (name, label, rows) in enumerate(series):
        st = run.styles.get(label, Style("black", "o"))
        info["series"].append({"name": name, "label": label})
        for i, s in enumerate(shapes):
            r = rows[rows["shape"] == s]
            if r.empty:
                continue
            r = r.iloc[0]
            x = i - 0.4 + width * (j + 0.5)
            v = float(r[metric.column]) / metric.scale if r[metric.column] == r[metric.column] else math.nan
            if r["status"] == Status.OK or (metric.complete and v == v):
                if v == v:
                    hatch = "//" if r["status"] != Status.OK else None
                    ax.bar(x, v, width * 0.92, color=st.color if r["status"] == Status.OK else "white",
                           edgecolor=st.color, hatch=hatch, linewidth=1.2)
                    bars.append((x, v, r))
                    top = max(top, v)
                if r["status"] != Status.OK:
                    info["marked"].append({"label": label, "series": name, "shape": s, "status": r["status"],
                                           "value": v, "placement": "counted"})
            else:
                bars.append((x, math.nan, r))
                info["marked"].append({"label": label, "series": name, "shape": s, "status": r["status"],
                                       "value": math.nan, "placement": "strip"})
        handles.append(mcolors_patch(st.color, name))
    for x, v, r in bars:
        if v == v:
            ax.annotate(f"{v:.3g}" + ("~" if timed and r["noisy"] and r["status"] == Status.OK else ""), (x, v),
                        textcoords="offset points", xytext=(0, 2), ha="center", va="bottom", fontsize=7.5, rotation=90
                        if len(series) > 4 else 0)
        else:
            word = status_word(r["status"])
            ax.text(x, top * 0.02, word, rotation=90, ha="center", va="bottom", fontsize=8, color="black")
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels(_shape_ticklabels(g, shapes), fontsize=8)
    ax.set_ylabel(metric.axis)
    ax.set_ylim(0, top * 1.15 if top > 0 else 1)
    ax.grid(True, axis="y", alpha=0.3)
    extra = []
    if timed and g["noisy"].any():
        extra.append(Line2D([], [], linestyle="none", label="~ noisy: IQR > 10% of the median"))
    if any(m["placement"] == "counted" for m in info["marked"]):
        extra.append(mcolors_patch("white", "counted, not measured", hatch="//", edge="0.3"))
    _legend(ax, handles + extra)
    ax.set_title(title_for(run, f"{metric.title} by stage", dtype, mode, g), fontsize=10)
    return fig, info



def _speedup_bars(run: Run, g: pd.DataFrame, sp: pd.DataFrame, dtype: str, mode: str):
    shapes = shape_order(run, g)
    pairs = list(dict.fromkeys(sp["pair"]))
    fig, ax = _new_figure(height=4.2)
    width = 0.8 / len(pairs)
    handles = []
    top = 1.0
    for j, pair in enumerate(pairs):
        s = sp[sp["pair"] == pair]
        st = run.styles.get(s["candidate"].iloc[0], Style("black", "o"))
        for i, shape in enumerate(shapes):
            r = s[s["shape"] == shape]
            if r.empty:
                continue
            v = float(r["speedup"].iloc[0])
            x = i - 0.4 + width * (j + 0.5)
            ax.bar(x, v, width * 0.92, color=st.color)
            ax.annotate(f"{v:.2f}x", (x, v), textcoords="offset points", xytext=(0, 2), ha="center", va="bottom",
                        fontsize=8)
            top = max(top, v)
        handles.append(mcolors_patch(st.color, pair))
    ax.axhline(1.0, color="black", linewidth=0.9)
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels(_shape_ticklabels(g, shapes), fontsize=8)
    ax.set_ylim(0, top * 1.15)
    ax.set_ylabel("speed-up (baseline latency / candidate latency)\n> 1: the first-named is faster")
    ax.grid(True, axis="y", alpha=0.3)
    _legend(ax, handles, "candidate over baseline")
    ax.set_title(title_for(run, "speed-ups by stage", dtype, mode, g), fontsize=10)
    return fig, {"speedups": sp}
