"""Drawing helpers shared by the figures: colours and markers per label, titles, axes, legends, PNG
output (matplotlib, Agg). No data logic: what is drawn comes from :mod:`attnbench.analysis.run`.

Every implementation label keeps one colour in every plot of a run (:func:`label_styles`): a hue per
registered implementation, lighter to darker (and another marker) across its parameter variants.
"""

from __future__ import annotations

import colorsys
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib import colors as mcolors  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator  # noqa: E402

from ..schema import Status  # noqa: E402
from . import run as run_mod  # noqa: E402
from .fit import Fit  # noqa: E402
from .run import Run, device_name  # noqa: E402


PLOTS_DIR = "plots"

DPI = 200  # 2x: sharp on high-density screens and when a figure is opened full size
WIDTH_IN = 8.0  # every figure is saved this wide (padded after a tight crop), so they line up in a report
LEGEND_FONT = 9

STATUS_MARKERS: dict[str, tuple[str, str]] = {
    Status.OVER_BUDGET: ("X", "over budget"),
    Status.OOM: ("D", "oom"),
    Status.ERROR: ("*", "error"),
    Status.TIMEOUT: ("*", "timeout"),
    Status.CRASHED: ("*", "crashed"),
    Status.UNSUPPORTED: ("P", "unsupported"),
}

SERIES_MARKERS = ["o", "s", "^", "v", "<", ">", "p", "h", "8", "d"]

HUES = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
        "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd"]

AI_LABEL = ("arithmetic intensity (FLOP/byte)\nbytes = dtype size x (parameters + 2 x batch x tokens x dim): "
            "weights, input and output moved once")



@dataclass(frozen=True)
class Style:
    color: str
    marker: str



def _shade(color: str, amount: float) -> str:
    """amount < 0 lightens, > 0 darkens (in HLS lightness)."""
    r, g, b = mcolors.to_rgb(color)
    h, lum, s = colorsys.rgb_to_hls(r, g, b)
    lum = lum + (1 - lum) * -amount if amount < 0 else lum * (1 - amount)
    return mcolors.to_hex(colorsys.hls_to_rgb(h, min(max(lum, 0), 1), s))



def label_styles(df: pd.DataFrame) -> dict[str, Style]:
    """label -> colour and marker, fixed for the whole run: a hue per implementation (in the order the run
    has them, i.e. the suite's), its parameter variants from lighter to darker with different markers."""
    styles = {}
    for i, labels in enumerate(run_mod.label_variants(df).values()):
        hue = HUES[i % len(HUES)]
        m = len(labels)
        for j, label in enumerate(labels):
            amount = 0.0 if m == 1 else -0.35 + 0.75 * j / (m - 1)
            styles[label] = Style(_shade(hue, amount), SERIES_MARKERS[j % len(SERIES_MARKERS)])
    return styles



def _constants(g: pd.DataFrame, by_shape: bool) -> str:
    parts = []
    cols = ("batch",) if by_shape else ("batch", "dim", "heads")
    for col, word in zip(cols, ("batch", "dim", "heads")):
        vals = g[col].dropna().unique()
        if len(vals) == 1:
            parts.append(f"{word} {int(vals[0])}")
    return " · ".join(parts)



def title_for(run: Run, what: str, dtype: str, mode: str, g: pd.DataFrame) -> str:
    extra = _constants(g, run.by_shape)
    return (f"{what} — {run.name}\n{device_name(run.env, run.df)} · {dtype} · {mode}"
            + (f" · {extra}" if extra else ""))



def _fit_text(fit: Fit | None, theory: float | None) -> str:
    t = f" (theory {theory:g})" if theory is not None else ""
    return f"{fit.text()}{t}" if fit else f"k n/a, <3 points{t}"



def _token_axis(ax, run: Run, tokens: np.ndarray) -> None:
    """Log x axis with ticks at the measured token counts, each labelled with its count and, below it, the
    image side in px (one patch size in the run)."""
    ticks = np.unique(tokens[np.isfinite(tokens) & (tokens > 0)])
    ax.set_xscale("log")
    patches = run.df["patch"].dropna().unique()
    patch = float(patches[0]) if len(patches) == 1 else None
    ax.set_xlabel("tokens N = (image side / patch)²" + (f" · image side in px (patch {patch:.0f})" if patch else ""))
    if 0 < len(ticks) <= 14:
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())

        def label(v, _p):
            n = f"{v / 1000:.3g}k" if v >= 10000 else f"{v:,.0f}"
            return n + (f"\n{math.sqrt(v) * patch:.0f} px" if patch else "")

        ax.xaxis.set_major_formatter(FuncFormatter(label))
        lo, hi = ticks[0], ticks[-1]
        pad = (hi / lo) ** 0.04 if hi > lo else 1.3
        ax.set_xlim(lo / pad, hi * pad)
    ax.tick_params(axis="x", labelsize=8)


def _status_handles(statuses: set[str]) -> list[Line2D]:
    handles = []
    seen = set()
    for status in STATUS_MARKERS:
        if status in statuses:
            marker, text = STATUS_MARKERS[status]
            if text in seen:
                continue
            seen.add(text)
            handles.append(Line2D([], [], linestyle="none", marker=marker, markersize=8, markerfacecolor="0.6",
                                  markeredgecolor="black", label=text))
    return handles



def _legend(ax, handles: list, title: str | None = None, ncol: int | None = None) -> None:
    """The legend below the axes (so every figure keeps one width), in two columns when it is long."""
    longest = max((len(h.get_label()) for h in handles), default=0)
    ncol = ncol or (1 if longest > 62 or len(handles) < 5 else 2)
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=LEGEND_FONT,
              frameon=False, title=title, title_fontsize=LEGEND_FONT, borderaxespad=0.0, ncol=ncol,
              columnspacing=1.2, handletextpad=0.5)



def _new_figure(width: float = WIDTH_IN, height: float = 4.2) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height))
    ax = fig.add_subplot(1, 1, 1)
    return fig, ax



def span_ok(lo: float, hi: float) -> bool:
    """Label minor ticks of a log axis only when it spans less than a decade (else they crowd)."""
    return hi / lo < 10



def mcolors_patch(color: str, label: str, hatch: str | None = None, edge: str | None = None):
    from matplotlib.patches import Patch

    return Patch(facecolor=color, edgecolor=edge or color, hatch=hatch, label=label)



def save_png(fig: Figure, path: Path) -> None:
    """Save as PNG at :data:`DPI`, cropped to what is drawn, then centred on a white canvas :data:`WIDTH_IN`
    wide (narrowed to fit when wider), quantized to a 256-colour palette (a third of the size, same look
    for line plots)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.12)
    try:
        from PIL import Image

        buf.seek(0)
        with Image.open(buf) as im:
            im = im.convert("RGB")
            width = int(WIDTH_IN * DPI)
            if im.width > width:
                im = im.resize((width, round(im.height * width / im.width)), Image.Resampling.LANCZOS)
            if im.width < width:
                canvas = Image.new("RGB", (width, im.height), "white")
                canvas.paste(im, ((width - im.width) // 2, 0))
                im = canvas
            im.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)
    except (ImportError, AttributeError, OSError):
        path.write_bytes(buf.getvalue())


def failed_band(ax, strip: list[tuple[float, str, str, str]], strip_rows: dict[str, int]) -> float:
    """Failed cells without a value, in a grey band above the axes (outside the data), one row per
    series at the cell's token count. Returns the band's height in points (the title goes above it)."""
    if not strip:
        return 0.0
    n = len(strip_rows)
    frac = min(0.04 * n + 0.03, 0.4)
    band = ax.inset_axes([0.0, 1.02, 1.0, frac], sharex=ax)
    band.set_facecolor("0.93")
    band.set_ylim(-0.7, n - 0.3)
    band.set_yticks([])
    band.tick_params(axis="x", which="both", bottom=False, labelbottom=False)
    for side in band.spines.values():
        side.set_visible(False)
    band.text(-0.01, 0.5, "failed,\nno value", transform=band.transAxes, ha="right", va="center", fontsize=7.5,
              color="0.3")
    for t, status, color, name in strip:
        band.plot([t], [n - 1 - strip_rows[name]], linestyle="none", marker=STATUS_MARKERS[status][0],
                  markersize=6.5, markerfacecolor=color, markeredgecolor="black", markeredgewidth=0.6, clip_on=False)
    height_pt = ax.figure.get_figheight() * 72 * ax.get_position().height
    return (frac + 0.02) * height_pt
