"""Plots of a run folder, from its rows alone (matplotlib, Agg; no torch).

:func:`plot_run` writes PNGs into ``RUN_DIR/plots/`` (the folder is owned by it: PNGs left there by an
earlier call are replaced), one set per (dtype, mode) of the run, named ``<kind>-<dtype>-<mode>.png``:

- ``latency``, ``memory``, ``flops``, ``throughput``: against tokens, log-log, one line per series
  (label x batch x dim x heads). Cells that did not finish ``ok`` are marked, not dropped:
  ``over_budget`` and ``oom`` cells after a measured one at the position the runner's own rule predicts
  (last measured latency scaled by the FLOP ratio), joined by a dotted line; other failed cells, and
  all failed cells on the memory plot, on a strip at the top of the axes at their token count. FLOPs
  are counted for every cell, so the FLOPs curves are complete (failed cells hollow). Noisy cells
  (IQR > 10% of the median) are drawn hollow; latency error bars span p10..p90.
- ``exponents``: the fitted growth exponent k (cost ~ N^k over the large-token part, see
  :mod:`attnbench.analysis.fit`) of latency, peak memory and FLOPs per series, +-1 standard error,
  next to the theoretical exponent of the implementation's family.
- ``speedup``: baseline latency / candidate latency across resolutions for the default pairs
  (:data:`DEFAULT_PAIRS`) and the suite's ``pairs``, where both are in the run.
- ``roofline``: achieved TFLOP/s against arithmetic intensity, under the device's measured matmul
  peak and copy bandwidth (``env.json`` ``peaks``); only where the run has them. Arithmetic intensity
  is a stated convention, not a hardware count: FLOPs / (dtype bytes x (parameters + 2 x batch x
  tokens x dim)), i.e. weights, input and output each moved once (a lower bound on traffic, so an
  upper bound on intensity).

Which figures a run gets is :func:`attnbench.analysis.run.figure_plan`: a figure needs two points, so
a group whose every series has one resolution gets no curves and no exponents, and a roofline needs
two measured cells.

Runs over named ``shapes`` (e.g. the four Swin stages, whose dims differ) are not resolution sweeps:
their latency/memory/FLOPs/throughput and speed-ups are grouped bar charts per stage, and they get no
exponent plot.

The data behind each figure comes from :mod:`attnbench.analysis.run`; colours, axes and legends from
:mod:`attnbench.analysis.draw`; the grouped bars of named-shape runs from :mod:`attnbench.analysis.bars`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from . import fmt
from . import run as run_mod
from .bars import _speedup_bars, bar_figure
from .draw import (AI_LABEL, LEGEND_FONT, PLOTS_DIR, STATUS_MARKERS, Style, _fit_text, _legend, _new_figure,  # noqa: F401
                   _status_handles, _token_axis, failed_band, label_styles, save_png, span_ok, title_for)
from .fit import Fit, theoretical_exponent
from .run import (DEFAULT_PAIRS, FAILED, METRICS, Run, _ok, _series_keys, _value, device_peaks,  # noqa: F401
                  exponent_rows, fit_series, metric_of, predicted, roofline_points, series_of, speedups)


def load_run(run_dir: str | Path) -> Run:
    """:func:`attnbench.analysis.run.load_run`, with the plots' colours and markers attached."""
    run = run_mod.load_run(run_dir)
    run.styles = label_styles(run.df)
    return run


# --------------------------------------------------------------------------------------- sweep figures


def metric_figure(run: Run, g: pd.DataFrame, key: str, dtype: str, mode: str) -> tuple[Figure, dict[str, Any]]:
    """One metric against tokens (log-log) for one (dtype, mode) group.

    Returns the figure and what it shows: ``series`` (name, label, fit, theory) and ``marked`` (one dict
    per failed cell: label, tokens, status, value, placement ``predicted``, ``counted`` or ``strip``).
    """
    metric = metric_of(key, g)
    fig, ax = _new_figure()
    info: dict[str, Any] = {"metric": key, "series": [], "marked": []}
    handles: list = []
    statuses: set[str] = set()
    strip: list[tuple[float, str, str, str]] = []  # (tokens, status, colour, series name)
    strip_rows: dict[str, int] = {}
    all_y: list[float] = []
    noisy_seen = False
    for name, label, rows in series_of(run, g):
        st = run.styles.get(label, Style("black", "o"))
        tokens = rows["tokens"].to_numpy(dtype=float)
        y = _value(rows, metric)
        ok = _ok(rows)
        show = np.isfinite(y) & (y > 0) & (ok | metric.complete)
        fit = fit_series(rows, metric) if metric.fit else None
        impl = str(rows["impl"].iloc[0])
        theory = theoretical_exponent(impl) if key in ("latency", "flops") else None  # not a memory law
        info["series"].append({"name": name, "label": label, "impl": impl, "fit": fit, "theory": theory})
        ax.plot(tokens, np.where(show, y, np.nan), color=st.color, linewidth=1.6, zorder=2)  # broken at failures
        noisy = rows["noisy"].to_numpy(bool) & ok & (key in ("latency", "throughput"))
        noisy_seen |= bool((noisy & show).any())
        solid = show & ok & ~noisy
        ax.plot(tokens[solid], y[solid], linestyle="none", marker=st.marker, color=st.color, markersize=6, zorder=3)
        hollow = show & ok & noisy
        ax.plot(tokens[hollow], y[hollow], linestyle="none", marker=st.marker, markerfacecolor="white",
                markeredgecolor=st.color, markersize=6, zorder=3)
        if key == "latency":
            lo, hi = rows["latency_ms_p10"].to_numpy(dtype=float), rows["latency_ms_p90"].to_numpy(dtype=float)
            eb = show & ok & np.isfinite(lo) & np.isfinite(hi)
            if eb.any():
                yerr = [np.clip(y[eb] - lo[eb], 0, None), np.clip(hi[eb] - y[eb], 0, None)]
                ax.errorbar(tokens[eb], y[eb], yerr=yerr,
                            fmt="none", ecolor=st.color, alpha=0.5, linewidth=1, zorder=2)
        all_y += list(y[show])
        # failed cells
        predicted_at = predicted(rows, metric)
        pred_x, pred_y = [], []
        last_ok = None
        for (idx, r), t, v, is_ok in zip(rows.iterrows(), tokens, y, ok):
            if is_ok and v == v and v > 0:
                last_ok = (t, v)
                continue
            status = r["status"]
            if status not in FAILED:
                continue
            statuses.add(status)
            marker = STATUS_MARKERS[status][0]
            if metric.complete and v == v and v > 0:
                ax.plot([t], [v], linestyle="none", marker=marker, markersize=8, markerfacecolor="white",
                        markeredgecolor=st.color, markeredgewidth=1.5, zorder=4)
                info["marked"].append({"label": label, "series": name, "tokens": t, "status": status, "value": v,
                                       "placement": "counted"})
            elif idx in predicted_at:
                pv = predicted_at[idx]
                pred_x.append(t)
                pred_y.append(pv)
                ax.plot([t], [pv], linestyle="none", marker=marker, markersize=8, markerfacecolor=st.color,
                        markeredgecolor="black", markeredgewidth=0.8, alpha=0.85, zorder=4)
                info["marked"].append({"label": label, "series": name, "tokens": t, "status": status, "value": pv,
                                       "placement": "predicted"})
                all_y.append(pv)
            else:
                strip.append((t, status, st.color, name))
                strip_rows.setdefault(name, len(strip_rows))
                info["marked"].append({"label": label, "series": name, "tokens": t, "status": status,
                                       "value": math.nan, "placement": "strip"})
        if pred_x and last_ok is not None:
            ax.plot([last_ok[0]] + pred_x, [last_ok[1]] + pred_y, color=st.color, linestyle=":", linewidth=1.2,
                    zorder=1)
        handles.append(Line2D([], [], color=st.color, marker=st.marker, linewidth=1.6, markersize=6,
                              label=name + (f"   {_fit_text(fit, theory)}" if metric.fit else "")))
    ax.set_yscale("log")
    ax.set_ylabel(metric.axis)
    _token_axis(ax, run, g["tokens"].to_numpy(dtype=float))
    finite = [v for v in all_y if v == v and v > 0]
    if finite:
        lo, hi = min(finite), max(finite)
        span = max(math.log10(hi / lo), 0.5)
        ax.set_ylim(lo / 10 ** (0.06 * span), hi * 10 ** (0.08 * span))
    strip_pad = failed_band(ax, strip, strip_rows)
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    extra = []
    if noisy_seen:
        extra.append(Line2D([], [], linestyle="none", marker="o", markerfacecolor="white", markeredgecolor="0.3",
                            label="noisy (IQR > 10% of median)"))
    if key == "latency":
        extra.append(Line2D([], [], color="0.3", linewidth=1, label="bars: p10..p90 of timed calls"))
    if any(m["placement"] == "predicted" for m in info["marked"]):
        extra.append(Line2D([], [], color="0.3", linestyle=":", label="predicted from FLOPs (not measured)"))
    if any(m["placement"] == "counted" for m in info["marked"]):
        extra.append(Line2D([], [], linestyle="none", marker="o", markerfacecolor="white", markeredgecolor="0.3",
                            markeredgewidth=1.5, label="counted, not measured (hollow status marker)"))
    if strip:
        extra.append(Line2D([], [], linestyle="none", marker="s", markerfacecolor="0.93", markeredgecolor="0.93",
                            markersize=9, label="band above the plot: failed, no value (a row per series)"))
    legend_title = "k: cost ~ N^k over the large-token part, ±1 s.e." if metric.fit else None
    _legend(ax, handles + extra + _status_handles(statuses), legend_title)
    ax.set_title(title_for(run, f"{metric.title} vs tokens", dtype, mode, g), fontsize=10, pad=8 + strip_pad)
    return fig, info


def exponent_figure(run: Run, g: pd.DataFrame, dtype: str, mode: str) -> tuple[Figure, dict[str, Any]]:
    rows = exponent_rows(run, g)
    n = len(rows)
    fig, ax = _new_figure(height=max(3.0, 1.4 + 0.42 * n))
    ys = np.arange(n)[::-1]
    kinds = [("latency", "o", 0.18, "latency"), ("memory", "^", 0.0, "peak memory"), ("flops", "s", -0.18, "FLOPs")]
    xs = [0.0, 2.2]
    for y, r in zip(ys, rows):
        color = run.styles.get(r["label"], Style("black", "o")).color
        for kind, marker, dy, _text in kinds:
            f: Fit | None = r[kind]
            if f is None:
                continue
            face = color if kind == "latency" else "white"
            ax.errorbar([f.k], [y + dy], xerr=[[f.stderr]] if f.stderr == f.stderr else None, fmt=marker,
                        color=color, markerfacecolor=face, markeredgecolor=color, markersize=7, capsize=3,
                        linewidth=1.2)
            xs += [f.k - (f.stderr if f.stderr == f.stderr else 0), f.k + (f.stderr if f.stderr == f.stderr else 0)]
        if r["theory"] is not None:
            ax.plot([r["theory"]], [y], marker="|", markersize=22, markeredgewidth=2.5, color="black", zorder=5)
    for ref in (1, 2):
        ax.axvline(ref, color="0.6", linestyle="--", linewidth=0.8, zorder=0)
    finite = [v for v in xs if v == v and abs(v) < 10]
    ax.set_xlim(min(finite) - 0.15, max(finite) + 0.15)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_yticks(ys)
    ax.set_yticklabels([r["series"] for r in rows], fontsize=8.5)
    ax.set_ylabel("series (implementation and parameters)")
    for tick, r in zip(ax.get_yticklabels(), rows):
        tick.set_color(run.styles.get(r["label"], Style("black", "o")).color)
    ax.set_xlabel("growth exponent k  (cost ~ N^k, least squares in log-log over the large-token part; bars ±1 s.e.)")
    ax.grid(True, axis="x", alpha=0.3)
    handles = [Line2D([], [], linestyle="none", marker=m, color="0.3",
                      markerfacecolor="0.3" if kind == "latency" else "white", label=text)
               for kind, m, _dy, text in kinds]
    handles.append(Line2D([], [], linestyle="none", marker="|", markersize=14, markeredgewidth=2.5, color="black",
                          label="theory (family)"))
    ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4,
              fontsize=LEGEND_FONT, frameon=False)
    ax.set_title(title_for(run, "fitted growth exponents", dtype, mode, g), fontsize=10, pad=26)
    return fig, {"rows": rows}


# ------------------------------------------------------------------------------------------- pairs


def speedup_ticks(lo: float, hi: float) -> list[float]:
    """Ticks of a log speed-up axis: powers of two (0.25x, 0.5x, 1x, 2x, 4x ...) and, over less than
    two octaves, the halves between them (0.75x, 1.5x, 3x ...)."""
    k0, k1 = math.floor(math.log2(lo)), math.ceil(math.log2(hi))
    ticks = [2.0 ** k for k in range(k0, k1 + 1)]
    if k1 - k0 <= 3:
        ticks += [1.5 * 2.0 ** k for k in range(k0, k1)]
    return sorted(t for t in ticks if lo <= t <= hi) or [1.0]


def speedup_figure(run: Run, g: pd.DataFrame, dtype: str, mode: str) -> tuple[Figure, dict[str, Any]] | None:
    sp = speedups(run, g)
    if sp.empty:
        return None
    if run.by_shape:
        return _speedup_bars(run, g, sp, dtype, mode)
    fig, ax = _new_figure()
    handles = []
    varying = _series_keys(g, run.by_shape)
    styles = ["-", "--", "-.", ":"]
    for i, (key, s) in enumerate(sp.groupby(["pair"] + varying, sort=False)):
        key = key if isinstance(key, tuple) else (key,)
        name = key[0] + "".join(f" {c[0]}{int(v)}" for c, v in zip(varying, key[1:]))
        st = run.styles.get(s["candidate"].iloc[0], Style("black", "o"))
        ax.plot(s["tokens"], s["speedup"], color=st.color, marker=st.marker, linestyle=styles[i // 10 % 4],
                linewidth=1.6, markersize=6)
        last = s.iloc[-1]
        ax.annotate(fmt.times(last["speedup"]), (last["tokens"], last["speedup"]), textcoords="offset points",
                    xytext=(6, 0), fontsize=8, color=st.color, va="center")
        handles.append(Line2D([], [], color=st.color, marker=st.marker, linestyle=styles[i // 10 % 4], label=name))
    ax.axhline(1.0, color="black", linewidth=0.9)
    ax.set_yscale("log")
    lo, hi = float(sp["speedup"].min()), float(sp["speedup"].max())
    lo, hi = min(lo, 0.8), max(hi, 1.25)
    ax.set_ylim(lo / 1.25, hi * 1.25)
    ax.yaxis.set_major_locator(FixedLocator(speedup_ticks(lo / 1.25, hi * 1.25)))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}x"))
    ax.set_ylabel("speed-up (baseline latency / candidate latency)\n> 1: the first-named is faster")
    _token_axis(ax, run, g["tokens"].to_numpy(dtype=float))
    x0, x1 = ax.get_xlim()
    ax.set_xlim(x0, x1 * (x1 / x0) ** 0.06)  # room for the last value's label
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    _legend(ax, handles, "candidate over baseline")
    ax.set_title(title_for(run, "speed-ups across resolutions", dtype, mode, g), fontsize=10, pad=10)
    return fig, {"speedups": sp}


# ------------------------------------------------------------------------------------ shape figures


# ---------------------------------------------------------------------------------------- roofline


def roofline_flops(g: pd.DataFrame) -> tuple[str, str]:
    """(column, words) of the one FLOP count a roofline uses: the analytic count of the FLOPs table in
    forward mode; torch's forward + backward count in train mode (the analytic one is forward only)."""
    if (g["mode"] == "train").all() and "flops_torch_fwd_bwd" in g and (g["flops_torch_fwd_bwd"] > 0).any():
        return "flops_torch_fwd_bwd", "torch FlopCounterMode, forward + backward, 2 per MAC"
    return "flops_analytic", "analytic, forward, 2 per MAC (the FLOPs table's count)"


def roofline_figure(run: Run, g: pd.DataFrame, dtype: str, mode: str) -> tuple[Figure, dict[str, Any]] | None:
    peak, bw = device_peaks(run.env, dtype)
    pts = roofline_points(run, g)
    if peak is None or pts.empty:
        return None
    column, words = roofline_flops(g)
    pts = pts.copy()
    counted = pts[column].where(pts[column] > 0)
    pts["flops"] = counted.fillna(pts["flops"])
    pts["ai"] = pts["flops"] / pts["bytes"]
    pts["tflops"] = pts["flops"] / (pts["latency_ms_median"] / 1e3) / 1e12
    fig, ax = _new_figure()
    handles = []
    for name, label, rows in series_of(run, pts):
        st = run.styles.get(label, Style("black", "o"))
        if run.by_shape:
            rows = rows.set_index("shape").reindex([s for s in run_mod.shape_order(run, g) if s in set(rows["shape"])])
        ax.plot(rows["ai"], rows["tflops"], color=st.color, marker=st.marker, linewidth=1.0, markersize=6,
                alpha=0.9)
        handles.append(Line2D([], [], color=st.color, marker=st.marker, label=name))
    ai_lo, ai_hi = float(pts["ai"].min()), float(pts["ai"].max())
    ridge = peak * 1e12 / (bw * 1e9) if bw else None
    x_lo = min(ai_lo / 3, ridge / 30) if ridge else ai_lo / 3
    x_hi = max(ai_hi, ridge or ai_hi) * 3
    xs = np.logspace(math.log10(x_lo), math.log10(x_hi), 200)
    roof = np.minimum(peak, xs * bw * 1e9 / 1e12) if bw else np.full_like(xs, peak)
    ax.plot(xs, roof, color="black", linewidth=2)
    if bw:
        ax.axvline(ridge, color="0.6", linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(x_lo, x_hi)
    y_lo = min(float(pts["tflops"].min()), float(roof.min())) / 2
    ax.set_ylim(y_lo, peak * 2.5)
    ax.set_xlabel(AI_LABEL, fontsize=8.5)
    ax.set_ylabel("achieved TFLOP/s\n(FLOPs / median latency)")
    ax.text(0.01, 0.98, f"FLOPs: {words}", transform=ax.transAxes, ha="left", va="top", fontsize=8, color="0.25")
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    ceiling = f"ceiling: matmul peak {fmt.sig(peak)} TFLOP/s ({dtype}, measured)"
    if bw:
        ceiling += f",\ncopy bandwidth {fmt.sig(bw)} GB/s (measured); dotted: the ridge"
    handles.append(Line2D([], [], color="black", linewidth=2, label=ceiling))
    _legend(ax, handles, "points: stages in order S1 → S4 along each line" if run.by_shape
            else "points: resolutions, N increasing to the right", ncol=1 if len(handles) < 6 else 2)
    ax.set_title(title_for(run, "roofline", dtype, mode, g), fontsize=10)
    return fig, {"points": pts, "peak_tflops": peak, "copy_gb_s": bw, "flops": column}


# ------------------------------------------------------------------------------------------ driver


def build_figures(run: Run) -> list[tuple[str, Figure, dict[str, Any]]]:
    """Every figure of the run's :func:`attnbench.analysis.run.figure_plan` as (file name, figure, what
    it shows), without writing anything."""
    if not run.styles:
        run.styles = label_styles(run.df)
    groups = {(dtype, mode): g for dtype, mode, g in run.groups()}
    out = []
    for name, kind, dtype, mode in run_mod.figure_plan(run):
        g = groups[(dtype, mode)]
        if kind in METRICS:
            made = (bar_figure if run.by_shape else metric_figure)(run, g, kind, dtype, mode)
        elif kind == "exponents":
            made = exponent_figure(run, g, dtype, mode)
        elif kind == "speedup":
            made = speedup_figure(run, g, dtype, mode)
        else:
            made = roofline_figure(run, g, dtype, mode)
        if made:
            out.append((name, *made))
    return out


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write every plot of a run folder into ``RUN_DIR/plots/`` and return their paths.

    Raises :class:`attnbench.errors.RunDirError` when ``run_dir`` is not a run folder.
    """
    run = load_run(run_dir)
    out_dir = run.path / PLOTS_DIR
    out_dir.mkdir(exist_ok=True)
    for old in out_dir.glob("*.png"):
        old.unlink()
    paths = []
    with matplotlib.rc_context({"font.size": 9, "axes.titlesize": 10, "savefig.facecolor": "white"}):
        for name, fig, _info in build_figures(run):
            path = out_dir / name
            save_png(fig, path)
            paths.append(path)
    return paths


