"""One HTML report comparing two run folders side by side: ``attnbench report RUN_A RUN_B``. No torch.

RUN_A is the base, RUN_B the new run. Cells are matched and judged by
:func:`attnbench.analysis.compare.compare_runs` (its regression verdicts: Mann-Whitney U on the raw
samples for latency, the method's resolution for memory, any change for counts and statuses). The
tables show B / A per cell (latency, peak memory, throughput), coloured where compare found a
significant change; the figure overlays the latency curves of both runs (A solid, B dashed).
"""

from __future__ import annotations

import html
import math
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from ..schema import Status, status_word
from . import compare, fmt, page
from . import run as runs
from .summary import _pivot, headings

VERDICT_KIND = {compare.SLOWER: "worse", compare.BIGGER: "worse", compare.WORSE: "worse", compare.CHANGED: "worse",
                compare.FASTER: "better", compare.SMALLER: "better", compare.BETTER: "better"}
RATIO_CSS = """
td.worse { background: #ffebe9; color: #a40e26; font-weight: 600; text-align: right; }
td.better { background: #dafbe1; color: #116329; font-weight: 600; text-align: right; }
"""


def _key(row: pd.Series) -> str:
    return compare.cell_key({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})


def ratio_table(b: runs.Run, cmp: compare.Comparison, metric: str, column: str) -> page.Table:
    """B / A of one metric for every cell of B, laid out like B's summary tables."""
    by_key = {c.key: c for c in cmp.cells}
    cells = []
    for _, r in b.df.iterrows():
        cc = by_key.get(_key(r))
        if cc is None:
            cells.append(page.Cell("only in B", "txt"))
            continue
        st = cc.metric("status")
        if st is not None and st.verdict != compare.EQUAL:
            cells.append(page.Cell(f"{status_word(st.base)} → {status_word(st.new)}", "status", st.note,
                                   status=str(st.new)))
            continue
        if r["status"] != Status.OK:
            cells.append(page.Cell(status_word(r["status"]), "status", status=str(r["status"])))
            continue
        if metric == "throughput":
            vb, vn = cc.base.get(column), cc.new.get(column)
            ok = isinstance(vb, (int, float)) and isinstance(vn, (int, float)) and vb > 0
            cells.append(page.Cell(fmt.times(vn / vb) if ok else "-", "num",
                                   f"A {fmt.value(column, vb)} → B {fmt.value(column, vn)}" if ok else ""))
            continue
        m = cc.metric(metric)
        if m is None or m.ratio is None:
            cells.append(page.Cell("-", "num"))
            continue
        tip = f"A {fmt.value(column, m.base)} → B {fmt.value(column, m.new)}; {m.verdict}"
        if m.p_value is not None:
            tip += f", p = {m.p_normalized if m.p_normalized is not None else m.p_value:.2g}"
        cells.append(page.Cell(fmt.times(m.ratio), VERDICT_KIND.get(m.verdict, "num"), tip + (f"; {m.note}" if
                                                                                              m.note else "")))
    t = _pivot(b.df, list(range(len(cells))))
    header = [n or "" for n in t.index.names] + headings(b.df, t.columns)
    rows = []
    for idx, vals in zip(t.index, t.to_numpy()):
        idx = idx if isinstance(idx, tuple) else (idx,)
        rows.append([page.Cell(str(v), "txt") for v in idx]
                    + [cells[int(v)] if v == v else page.Cell("", "num") for v in vals])
    note = ("B / A per cell; red: significantly worse, green: significantly better (compare's verdicts"
            + (f", latency judged after dividing out the run-wide speed factor {fmt.times(cmp.speed_factor)}"
               if cmp.normalized and metric == "latency_ms" else "") + "); hover for both values and the test.")
    return page.Table(header, rows, len(t.index.names), note)


def verdict_table(cmp: compare.Comparison) -> page.Table:
    rows = []
    for cc, m in cmp.significant():
        col = {"latency_ms": "latency_ms_median"}.get(m.metric, m.metric)
        show = (lambda v: status_word(v)) if m.metric == "status" else (lambda v: fmt.value(col, v))
        rows.append([page.Cell(cc.label, "txt"), page.Cell(m.metric, "txt"), page.Cell(show(m.base)),
                     page.Cell(show(m.new)), page.Cell(fmt.times(m.ratio) if m.ratio else "-"),
                     page.Cell(m.verdict, VERDICT_KIND.get(m.verdict, "txt")),
                     page.Cell(f"{m.p_value:.2g}" if m.p_value is not None else "", "num", m.note)])
    return page.Table(["cell", "metric", "A", "B", "B / A", "verdict", "p"], rows, 2)


def overlay_figure(a: runs.Run, b: runs.Run, path: Path) -> Path | None:
    """Latency against tokens of both runs, A solid and B dashed, one colour per label."""
    if a.by_shape or b.by_shape:
        return None
    import matplotlib

    from .draw import _legend, _new_figure, _token_axis, label_styles, save_png

    styles = label_styles(pd.concat([a.df, b.df]))
    fig, ax = _new_figure(height=4.6)
    from matplotlib.lines import Line2D

    handles = []
    for run, ls in ((a, "-"), (b, "--")):
        ok = run.df[run.df["status"] == Status.OK]
        for label, rows in ok.groupby("label", sort=False):
            rows = rows.sort_values("tokens")
            st = styles[label]
            ax.plot(rows["tokens"], rows["latency_ms_median"], color=st.color, marker=st.marker, linestyle=ls,
                    markersize=4.5, linewidth=1.4, markerfacecolor=st.color if ls == "-" else "white")
            if run is a:
                handles.append(Line2D([], [], color=st.color, marker=st.marker, label=label))
    if not handles:
        return None
    handles += [Line2D([], [], color="0.3", linestyle="-", label="A (base)"),
                Line2D([], [], color="0.3", linestyle="--", markerfacecolor="white", label="B (new)")]
    ax.set_yscale("log")
    ax.set_ylabel("latency, median of timed calls (ms)")
    _token_axis(ax, b, pd.concat([a.df, b.df])["tokens"].to_numpy(dtype=float))
    ax.grid(True, which="major", alpha=0.35)
    _legend(ax, handles, "A solid, B dashed")
    ax.set_title(f"latency, A vs B — {a.name} / {b.name}", fontsize=10)
    with matplotlib.rc_context({"font.size": 9}):
        save_png(fig, path)
    return path


def write_compare_report(run_a: str | Path, run_b: str | Path, out: str | Path | None = None) -> Path:
    """Write the comparison of RUN_A (base) and RUN_B (new) as one HTML file; returns its path (default
    ``RUN_B/report/compare-<RUN_A folder>.html``, with the overlay PNG beside it)."""
    a, b = runs.load_run(run_a), runs.load_run(run_b)
    cmp = compare.compare_runs(run_a, run_b)
    path = Path(out) if out else b.path / "report" / f"compare-{a.path.name}.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    e = html.escape
    sig = cmp.significant()
    counts = pd.Series([m.verdict for _, m in sig]).value_counts().to_dict()
    lines = [f"{len(cmp.cells)} cells matched, {len(cmp.only_base)} only in A, {len(cmp.only_new)} only in B",
             "speed factor (median B / A latency over matched ok cells): "
             + (fmt.times(cmp.speed_factor) if cmp.speed_factor else "-")
             + (" — latencies judged after dividing it out" if cmp.normalized else ""),
             "significant changes: " + (", ".join(f"{n} {v}" for v, n in counts.items()) or "none")]
    lines += cmp.env_notes
    head = (f"<h1>{e(a.name)} vs {e(b.name)}</h1><p class=\"sub\">A (base): <code>{e(str(a.path))}</code>, "
            f"{e(runs.device_name(a.env, a.df))} · B (new): <code>{e(str(b.path))}</code>, "
            f"{e(runs.device_name(b.env, b.df))}</p><div class=\"headline\" id=\"headline\"><h3>Comparison</h3><ul>"
            + "".join(f"<li>{e(x)}</li>" for x in lines) + "</ul></div>"
            f"<p class=\"sub\">generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} by "
            f"<code>attnbench report RUN_A RUN_B</code></p>")
    png = overlay_figure(a, b, path.with_suffix(".png"))
    secs = [page.Section("Latency B / A", tables=[ratio_table(b, cmp, "latency_ms", "latency_ms_median")],
                         figures=[(png, "Latency of both runs against tokens (log-log): A solid, B dashed.")]
                         if png else [], anchor="latency"),
            page.Section("Peak memory B / A", tables=[ratio_table(b, cmp, "peak_mem_bytes", "peak_mem_bytes")],
                         anchor="memory"),
            page.Section("Throughput B / A", tables=[ratio_table(b, cmp, "throughput", "throughput_img_s")],
                         anchor="throughput"),
            page.Section("Verdicts", f"{len(sig)} significant change(s) (alpha {cmp.alpha:g}, minimum effect "
                         f"{fmt.pct(cmp.min_effect)}, memory growth {fmt.pct(cmp.memory_growth)}).",
                         tables=[verdict_table(cmp)] if sig else [], anchor="verdicts")]
    only = [(f"only in A: {len(cmp.only_base)}", cmp.only_base), (f"only in B: {len(cmp.only_new)}", cmp.only_new)]
    secs.append(page.Section("Unmatched cells", folded=[(t, page.text_table(["cell"], [[d] for _, d in rows]))
                                                        for t, rows in only if rows], anchor="unmatched"))
    doc = page.page(f"attnbench comparison: {a.name} vs {b.name}", head, secs)
    path.write_text(doc.replace("</style>", RATIO_CSS + "</style>", 1))
    return path
