"""Figures and the static dashboard of a benchmark history (matplotlib, Agg). No torch.

:func:`plot_series` draws one cell over commits: median latency (with the commits' IQR as error
bars), peak memory and FLOPs, one panel each, commits on the x axis by short hash, a red dashed line
where a change point starts. :func:`publish` writes ``index.html``: every cell's table and figure,
the figures embedded as base64 PNG, so the one file is the whole dashboard (asv's ``publish``).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
from pathlib import Path

from .history import DEFAULT_ROOT, HistoryError, Series, series

PANELS = (("latency_ms_median", "median latency, ms", 1.0), ("peak_mem_bytes", "peak memory, MiB", 2.0 ** 20),
          ("flops_analytic", "FLOPs (analytic), GFLOP", 1e9))


def _figure(s: Series):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(PANELS), 1, figsize=(8, 6.4), sharex=True)
    x = list(range(len(s.points)))
    for ax, (metric, title, scale) in zip(axes, PANELS):
        ys = [p.values.get(metric) for p in s.points]
        pts = [(i, y / scale) for i, y in zip(x, ys) if y is not None]
        if pts:
            xi, yi = zip(*pts)
            if metric == "latency_ms_median":
                err = [s.points[i].spread * 2 * y for i, y in pts]  # the IQR
                ax.errorbar(xi, yi, yerr=[[e / 2 for e in err], [e / 2 for e in err]], fmt="o-", ms=4, capsize=2)
            else:
                ax.plot(xi, yi, "o-", ms=4)
        for i in s.changes.get(metric, []):
            ax.axvline(i - 0.5, color="red", ls="--", lw=1)
        ax.set_ylabel(title, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xticks(x)
    axes[-1].set_xticklabels([p.commit[:7] for p in s.points], rotation=45, ha="right", fontsize=7)
    axes[0].set_title(f"{s.label}\n{s.group}; red dashed: change point", fontsize=9)
    fig.tight_layout()
    return fig


def plot_series(s: Series, path: str | Path) -> Path:
    """Write the figure of one series (PNG or SVG by the suffix)."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = _figure(s)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _png_base64(s: Series) -> str:
    import matplotlib.pyplot as plt

    fig = _figure(s)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _table(s: Series) -> str:
    rows = []
    for i, p in enumerate(s.points):
        def td(metric: str, scale: float) -> str:
            v = p.values.get(metric)
            mark = i in s.changes.get(metric, [])
            text = "-" if v is None else f"{v / scale:.4g}"
            return f'<td class="{"cp" if mark else ""}">{text}{" &#9650;" if mark else ""}</td>'

        date = _dt.datetime.fromtimestamp(p.commit_time, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
        rows.append(f"<tr><td><code>{html.escape(p.commit[:12])}</code></td><td>{date}</td><td>{p.runs}</td>"
                    f"{td('latency_ms_median', 1)}{td('peak_mem_bytes', 2**20)}{td('flops_analytic', 1e9)}"
                    f"<td>{html.escape(p.subject[:90])}</td></tr>")
    return ("<table><tr><th>commit</th><th>commit time (UTC)</th><th>runs</th><th>median latency, ms</th>"
            "<th>peak memory, MiB</th><th>GFLOP</th><th>subject</th></tr>" + "".join(rows) + "</table>")


CSS = """body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;font-size:12px;
margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}td:last-child{text-align:left}
td.cp{background:#fdd;font-weight:bold}section{margin-bottom:2.5em}img{max-width:100%}nav a{margin-right:1em}"""


def publish(root: str | Path = DEFAULT_ROOT, out: str | Path | None = None) -> Path:
    """Write the self-contained dashboard of every recorded cell to ``out/index.html`` (default
    ``<root>/html``); returns its path."""
    all_series = series(root)
    out = Path(out) if out is not None else Path(root) / "html"
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[Series]] = {}
    for s in all_series:
        groups.setdefault(s.group, []).append(s)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>attnbench history</title>"
             f"<style>{CSS}</style></head><body><h1>attnbench benchmark history</h1>",
             f"<p>{len(all_series)} cell(s); one point per commit (the median over its runs), ordered by commit time. "
             "A marked value (&#9650;, red line in the figure) starts a new level: binary segmentation on the log "
             "latency, kept where the two sides' medians differ by more than max(15%, the cells' own spread, 3x the "
             "series' point-to-point noise); memory beyond the measuring method's resolution; FLOPs at any change."
             "</p><nav>"]
    parts += [f"<a href='#c{i}'>{html.escape(s.label)}</a>" for i, s in enumerate(all_series)]
    parts.append("</nav>")
    i = 0
    for group, members in groups.items():
        parts.append(f"<h2>{html.escape(group)}</h2>")
        for s in members:
            changes = "; ".join(f"{m.split('_')[0]} at {', '.join(s.points[k].commit[:12] for k in ks)}"
                                for m, ks in s.changes.items() if ks) or "none"
            parts.append(f"<section id='c{i}'><h3>{html.escape(s.label)}</h3><p>change points: {html.escape(changes)}"
                         f"</p>{_table(s)}<img alt='{html.escape(s.label)}' "
                         f"src='data:image/png;base64,{_png_base64(s)}'></section>")
            i += 1
    parts.append(f"<p>written {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}</p></body></html>")
    path = out / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


__all__ = ["plot_series", "publish", "HistoryError"]
