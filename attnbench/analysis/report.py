"""Reports of a run folder: a Markdown file with its PNGs and one self-contained HTML file, and the
terminal tables of ``attnbench show``. No torch.

:func:`write_report` writes ``RUN_DIR/report/report.md`` (next to copies of the run's PNGs, so the
folder can be moved or pasted as it is) and ``RUN_DIR/report/report.html`` (one file: the PNGs are
embedded as base64 data URIs). Both hold the environment, the summary tables, the fitted growth
exponents, the speed-ups, the plots, and every noisy, throttled or failed cell.
"""

from __future__ import annotations

import html
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from ..errors import AttnbenchError
from ..schema import Status, status_word
from . import fmt, page, summary
from . import run as runs
from .fit import Fit
from .headline import Headline, headline
from .summary import TABLES, attention_cells, best_cells, headings, summary_text, table, titled  # shared with the run summary

REPORT_DIR = "report"


# ------------------------------------------------------------------------------------------ tables


def _flat(t: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a pivot with its index as leading columns."""
    names = [n or "" for n in t.index.names]
    header = names + [str(c) for c in t.columns]
    rows = []
    for idx, vals in zip(t.index, t.to_numpy()):
        idx = idx if isinstance(idx, tuple) else (idx,)
        rows.append([str(i) for i in idx] + [str(v) for v in vals])
    return header, rows


def _md(header: list[str], rows: list[list[str]], align_right_from: int = 1) -> str:
    def esc(s: str) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(h) for h in header) + " |",
             "|" + "|".join(":---" if i < align_right_from else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _filter(df: pd.DataFrame, impl: str | None, resolution: str | int | None, dtype: str | None,
            mode: str | None) -> pd.DataFrame:
    d = df[runs.match_impl(df, impl)]
    if resolution is not None and str(resolution) != "":
        r = str(resolution)
        keep = d["shape"].astype(str) == r
        if r.isdigit():
            keep |= d["resolution"] == int(r)
        d = d[keep]
    if dtype:
        d = d[d["dtype"] == dtype]
    if mode:
        d = d[d["mode"] == mode]
    return d


def show_text(run_dir: str | Path, impl: str | None = None, resolution: str | int | None = None,
              dtype: str | None = None, mode: str | None = None) -> str:
    """The summary tables of a run (latency ms, peak memory MiB, FLOPs GFLOP, throughput img/s) for the
    cells matching the filters: ``impl`` comma-separated shell patterns on implementation or label,
    ``resolution`` an image side in px or a shape name, ``dtype``, ``mode``."""
    run = runs.load_run(run_dir)
    d = _filter(run.df, impl, resolution, dtype, mode)
    if d.empty:
        asked = ", ".join(f"{k}={v!r}" for k, v in (("impl", impl), ("resolution", resolution), ("dtype", dtype),
                                                      ("mode", mode)) if v)
        have = (f"impls {', '.join(dict.fromkeys(run.df['label']))}; resolutions "
                f"{', '.join(str(x) for x in dict.fromkeys(run.df['shape'] if run.by_shape else run.df['resolution']))}"
                f"; dtypes {', '.join(dict.fromkeys(run.df['dtype']))}"
                f"; modes {', '.join(dict.fromkeys(run.df['mode']))}")
        raise AttnbenchError(f"no cell of {run.path} matches {asked} (the run has {have})")
    head = f"{run.name}: {runs.device_name(run.env, run.df)}, {len(d)} of {len(run.df)} cells"
    if run.torn:
        head += ("\nnote: the last line of rows.jsonl was cut mid-write (a killed run): that cell is not shown; "
                 "`attnbench run SUITE --resume --out RUN_DIR` measures it again")
    return head + "\n\n" + summary_text(d)


# ----------------------------------------------------------------------------------------- sections


def environment_rows(run: runs.Run) -> list[list[str]]:
    env = run.env
    t = env.get("torch") or {}
    rows = [["device", runs.device_name(env, run.df)]]
    gpu = env.get("gpu")
    if isinstance(gpu, dict):
        mem = gpu.get("total_memory_bytes")
        rows.append(["GPU", f"{gpu.get('name', '?')}, compute capability {gpu.get('capability', '?')}"
                     + (f", {mem / 2 ** 30:.0f} GiB" if isinstance(mem, (int, float)) else "")])
    cpu = env.get("cpu") or {}
    if cpu:
        rows.append(["CPU", f"{cpu.get('model', '?')}, {cpu.get('logical_cores', '?')} logical cores"])
    if t:
        rows.append(["torch", f"{t.get('version', '?')} (CUDA {t.get('cuda')}, cuDNN {t.get('cudnn')}, "
                              f"{t.get('num_threads')} threads)"])
        rows.append(["TF32", f"matmul {t.get('tf32_matmul')}, cuDNN {t.get('tf32_cudnn')}, float32 matmul "
                             f"precision {t.get('float32_matmul_precision')}"])
    pk = env.get("packages") or {}
    if pk:
        rows.append(["packages", ", ".join(f"{k} {v}" for k, v in pk.items())])
    if env.get("python"):
        rows.append(["python / platform", f"{env.get('python')} / {env.get('platform', '?')}"])
    git = env.get("git") or {}
    if git.get("commit"):
        rows.append(["git commit", f"{git['commit'][:12]}" + (" (dirty)" if git.get("dirty") else "")])
    if env.get("created_utc"):
        rows.append(["started (UTC)", str(env["created_utc"])])
    peaks = env.get("peaks")
    if isinstance(peaks, dict) and (peaks.get("matmul_tflops") or peaks.get("copy_gb_s")):
        mm = ", ".join(f"{k} {fmt.sig(v)} TFLOP/s" for k, v in (peaks.get("matmul_tflops") or {}).items()
                       if isinstance(v, (int, float)))
        bw = peaks.get("copy_gb_s")
        rows.append(["measured peaks", f"matmul {mm or '-'}; copy {f'{fmt.sig(bw)} GB/s' if bw else '-'}"])
    else:
        rows.append(["measured peaks", "not in env.json (run predates them or measure_peaks: false): no roofline"])
    s = run.suite
    if s:
        rows.append(["suite", f"{s.get('name', '?')}: {s.get('description', '')}".strip().rstrip(":")])
        for key in ("timing", "budget"):
            if isinstance(s.get(key), dict):
                rows.append([key, ", ".join(f"{k} {v}" for k, v in s[key].items())])
    counts = run.df["status"].value_counts().to_dict()
    rows.append(["cells", f"{len(run.df)}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))])
    return rows


def _fit_cell(f: Fit | None) -> str:
    return fmt.exponent(f.k, f.stderr) if f else "-"


def exponent_table(run: runs.Run) -> tuple[list[str], list[list[str]]]:
    header = ["series", "dtype", "mode", "latency k", "fit range (tokens)", "points", "FLOPs k", "memory k",
              "theory k"]
    rows = []
    if run.by_shape:
        return header, rows
    for dtype, mode, g in run.groups():
        for r in runs.exponent_rows(run, g):
            lat: Fit | None = r["latency"]
            rows.append([r["series"], dtype, mode, _fit_cell(lat),
                         f"{lat.n_min:.0f}..{lat.n_max:.0f}" if lat else f"no fit ({r['ok_points']} measured)",
                         str(lat.n_points) if lat else "-", _fit_cell(r["flops"]), _fit_cell(r["memory"]),
                         f"{r['theory']:g}" if r["theory"] is not None else "-"])
    return header, rows


def speedup_table(run: runs.Run) -> tuple[list[str], list[list[str]]]:
    sp = runs.speedups(run)
    if sp.empty:
        return [], []
    col = "shape" if run.by_shape else "resolution"
    keys = ["pair"] + [c for c in ("dtype", "mode", "batch", "dim", "heads")
                       if sp[c].nunique() > 1 and not (run.by_shape and c in ("dim", "heads"))]
    sp = sp.assign(_v=[fmt.times(v) for v in sp["speedup"]])
    t = sp.pivot_table(index=keys, columns=col, values="_v", aggfunc="first", sort=False)
    if not run.by_shape:
        t = t[sorted(t.columns)]
    else:
        t = t[[s for s in runs.shape_order(run, run.df) if s in t.columns]]
    t.columns.name = col
    header, rows = _flat(t.fillna(""))
    return header[:len(keys)] + headings(run.df, t.columns), rows


PLOT_CAPTIONS = {
    "latency": "Latency against tokens (log-log), bars p10..p90. k: fitted growth exponent over the large-token "
               "part, ±1 s.e.; X on a dotted line: over budget (or out of memory), drawn at the latency predicted "
               "from FLOPs, not measured; grey band above the plot: failed cells without a value.",
    "memory": "Peak memory of one call against tokens (log-log); grey band above the plot: cells without a value.",
    "flops": "Analytic FLOPs against tokens (log-log): counted for every cell, failed ones hollow.",
    "throughput": "Throughput against tokens (log-log).",
    "exponents": "Fitted growth exponents (latency, peak memory, FLOPs) next to each family's theoretical exponent.",
    "speedup": "Speed-ups: baseline latency over candidate latency, cell by cell (> 1: the candidate is faster).",
    "roofline": "Achieved TFLOP/s against arithmetic intensity under the measured matmul peak and copy bandwidth. "
                "One FLOP count, named on the figure: the analytic one of the FLOPs table (forward), torch's "
                "forward + backward count in train mode. Intensity = FLOPs / (dtype bytes x (parameters + 2 x "
                "batch x tokens x dim)).",
}


def _caption(name: str, by_shape: bool = False) -> str:
    kind = name.split("-")[0]
    what = PLOT_CAPTIONS.get(kind, "")
    if by_shape:
        what = {"latency": "Latency by stage; failed cells show their status.",
                "memory": "Peak memory of one call by stage.",
                "flops": "Analytic FLOPs by stage (counted for every cell; hatched: not measured).",
                "throughput": "Throughput by stage.",
                "speedup": "Speed-ups by stage: baseline latency over candidate latency (> 1: the candidate is "
                           "faster)."}.get(kind, what)
    return what


# ------------------------------------------------------------------------------------------- report

FIGURE_OF = {"latency_ms_median": "latency", "peak_mem_bytes": "memory", "flops_analytic": "flops",
             "throughput_img_s": "throughput"}
STATUS_WORDS = {status_word(s): s.value for s in Status if s is not Status.OK}


def metric_table(run: runs.Run, col: str) -> page.Table:
    """A summary table for the page: headings with px and tokens (or the stage's shape), statuses as
    badges, the best value of each column marked, the p10..p90 spread of each latency as its tooltip."""
    df = run.df
    t = table(df, col)
    best = best_cells(df, col).reindex_like(t).fillna(False).astype(bool)
    tips = summary._pivot(df, [f"p10-p90 {fmt.spread(r['latency_ms_p10'], r['latency_ms_p90'])} of "
                               f"{int(r['latency_n']) if r['latency_n'] == r['latency_n'] else '?'} timed calls"
                               if col == "latency_ms_median" and r["status"] == Status.OK else ""
                               for _, r in df.iterrows()]).reindex_like(t).fillna("")
    lead = len(t.index.names)
    header = [n or "" for n in t.index.names] + headings(df, t.columns)
    rows = []
    for i, idx in enumerate(t.index):
        idx = idx if isinstance(idx, tuple) else (idx,)
        cells = [page.Cell(str(v), "txt") for v in idx]
        for j, text in enumerate(t.iloc[i]):
            if text in STATUS_WORDS:
                cells.append(page.Cell(text, "status", status=STATUS_WORDS[text]))
            else:
                kind = "best" if best.iloc[i, j] else "noisy" if text.endswith(fmt.NOISY_MARK) else "num"
                cells.append(page.Cell(text, kind, str(tips.iloc[i, j])))
        rows.append(cells)
    note = "Bold on green: the best value of its column." if fmt.better(col) else ""
    if col == "latency_ms_median":
        note += " ~: noisy (IQR > 10% of the median). Hover a value for the p10-p90 spread of its timed calls."
    return page.Table(header, rows, lead, note.strip())


def spread_table(run: runs.Run) -> page.Table:
    t = summary._pivot(run.df, [fmt.spread(r["latency_ms_p10"], r["latency_ms_p90"]) if r["status"] == Status.OK
                                else status_word(r["status"]) for _, r in run.df.iterrows()]).fillna("")
    header, rows = _flat(t)
    header = header[:len(t.index.names)] + headings(run.df, t.columns)
    return page.text_table(header, rows, len(t.index.names))


def rows_csv(run: runs.Run) -> str:
    d = run.df.copy()
    d["params"] = [json.dumps(p, sort_keys=True) for p in d["params"]]
    return d.to_csv(index=False)


def _figures(pngs: list[Path], kind: str, by_shape: bool) -> list[tuple[Path, str]]:
    return [(p, _caption(p.name, by_shape)) for p in pngs if p.name.split("-")[0] == kind]


def build_sections(run: runs.Run, pngs: list[Path]) -> list[page.Section]:
    """The report's sections, rendered to Markdown and HTML alike (the headline comes first, apart)."""
    secs: list[page.Section] = []
    for title, col, _scale, _fmt in TABLES:
        kind = FIGURE_OF.get(col, "")
        short = fmt.COLUMNS.get(col, (None, titled(title), ""))[1]
        long = titled(title)[0].upper() + titled(title)[1:] + "."
        s = page.Section(short[0].upper() + short[1:], long if long.lower() != short.lower() + "." else "",
                         tables=[metric_table(run, col)], figures=_figures(pngs, kind, run.by_shape),
                         anchor=kind or col.replace("_", "-"))
        if col == "latency_ms_median":
            s.folded.append(("latency spread: p10-p90 of the timed calls", spread_table(run)))
        secs.append(s)
    if "model" in run.df and run.df["model"].fillna("").astype(str).astype(bool).any():
        secs.append(page.Section("MACs of whole models", "Whole-model cells have no closed-form FLOP count: "
                                 "fvcore's multiply-accumulates of one call (the vision papers' \"FLOPs\"), "
                                 "counted on the meta device.", tables=[metric_table(run, "macs_fvcore")],
                                 anchor="macs"))
    header, rows = exponent_table(run)
    if rows:
        secs.append(page.Section(
            "Growth exponents", "Cost ~ N^k: least squares of log(cost) on log(tokens) over the large-token part of "
            "each curve (measured cells at or above the median token count, at least 3; FLOPs over all cells), ± one "
            "standard error. Theory: the family's exponent for large N.", [page.text_table(header, rows, 3)],
            _figures(pngs, "exponents", run.by_shape), anchor="exponents"))
    header, rows = speedup_table(run)
    if rows:
        lead = len([h for h in header if h in ("pair", "dtype", "mode", "batch", "dim", "heads")])
        secs.append(page.Section("Speed-ups", "Baseline latency / candidate latency for matching cells (> 1: the "
                                 "first-named is faster).", [page.text_table(header, rows, lead)],
                                 _figures(pngs, "speedup", run.by_shape), anchor="speedup"))
    roof = _figures(pngs, "roofline", run.by_shape)
    if roof:
        secs.append(page.Section("Roofline", PLOT_CAPTIONS["roofline"], figures=roof, anchor="roofline"))
    cells = attention_cells(run.df)
    failed = [c for c in cells if c["kind"] == "failed"]
    noisy = [c for c in cells if c["kind"] not in ("failed", "skipped")]
    skipped = [c for c in cells if c["kind"] == "skipped"]
    look = page.Section("Cells to look at", f"{len(failed)} failed, {len(skipped)} not tried after a failure at a "
                        f"smaller size, {len([c for c in noisy if c['kind'] == 'noisy'])} noisy (IQR > 10% of the "
                        f"median), {len([c for c in noisy if c['kind'] == 'throttled'])} throttled, "
                        f"{len([c for c in noisy if c['kind'] == 'drift'])} measured while the device's speed had "
                        "drifted more than 10% from the start of the run.", anchor="cells")
    for what, items, head in (("Failed cells", failed, "status"), ("Not tried (status of the failure that stopped "
                              "the series)", skipped, "status"), ("Noisy, throttled or drifted cells", noisy, "kind")):
        if items:
            t = page.Table([head, "cell", "message" if head == "status" else "detail"],
                           [[page.Cell(c["status"], "status", status=c["status"]) if head == "status"
                             else page.Cell(c["kind"], "txt"), page.Cell(c["cell"], "txt"),
                             page.Cell(c["detail"], "txt")] for c in items], 3)
            look.folded.append((f"{what}: {len(items)}", t))
    secs.append(look)
    secs.append(page.Section("Environment", folded=[("device, software, suite settings",
                                                     page.text_table(["", ""], environment_rows(run), 2))],
                             anchor="environment"))
    secs.append(page.Section("Raw data", f"The {len(run.df)} rows of the run (one per cell, without the per-call "
                             "samples) as CSV: rows.csv beside this report, or the download link below (inside this "
                             "file).", anchor="data"))
    return secs


def head_html(run: runs.Run, h: Headline, generated: str) -> str:
    e = html.escape
    out = [f"<h1>{e(h.suite)}</h1>"]
    sub = " · ".join(x for x in (h.description, h.device, ", ".join(h.groups)) if x)
    out.append(f'<p class="sub">{e(sub)}</p>')
    out.append('<div class="headline" id="headline">')
    out.append('<div class="counts">' + f"<b>{h.total} cells:</b> "
               + " ".join(page.badge(s, f"{n} {s.replace('_', ' ')}") for s, n in h.counts) + "</div>")
    out.append('<div class="answers">')
    for a in h.answers:
        out.append(f'<div class="{"warn" if a.warn else "answer"}"><h3>{e(a.title)}</h3><ul>'
                   + "".join(f"<li>{e(x)}</li>" for x in a.lines) + "</ul></div>")
    out.append("</div></div>")
    out.append(f'<p class="sub">run folder <code>{e(str(run.path))}</code> · generated {e(generated)} by '
               f"<code>attnbench report</code></p>")
    return "\n".join(out)


def _markdown(run: runs.Run, h: Headline, sections: list[page.Section], generated: str) -> str:
    out = [f"# attnbench report: {run.name}", "",
           f"{h.description + ' · ' if h.description else ''}{h.device} · run folder `{run.path}` · generated "
           f"{generated} by `attnbench report`", "",
           f"**{h.total} cells:** " + ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in h.counts), ""]
    for a in h.answers:
        out += [f"**{a.title}**", ""] + [f"- {x}" for x in a.lines] + [""]
    for s in sections:
        out += [f"## {s.title}", ""]
        if s.text:
            out += [s.text, ""]
        for name, t in [("", t) for t in s.tables] + s.folded:
            out += [f"### {name[0].upper()}{name[1:]}", ""] if name else []
            out += [_md(t.header, [[f"**{c.text}**" if c.kind == "best" else c.text for c in r] for r in t.rows],
                        t.lead), ""]
            if t.caption:
                out += [t.caption, ""]
        for p, caption in s.figures:
            out += [f"![{p.stem}]({p.name})", "", f"*{p.name}*: {caption}", ""]
        if s.anchor == "data":
            out += ["[rows.csv](rows.csv)", ""]
    return "\n".join(out)


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Plot the run, then write ``RUN_DIR/report/report.md`` (with copies of the PNGs and rows.csv) and
    ``RUN_DIR/report/report.html`` (one file: PNGs and rows embedded). Returns (md path, html path)."""
    from .plots import plot_run  # the only part of the report that needs matplotlib

    pngs = plot_run(run_dir)
    run = runs.load_run(run_dir)
    out = run.path / REPORT_DIR
    out.mkdir(exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    copies = []
    for p in pngs:
        shutil.copyfile(p, out / p.name)
        copies.append(out / p.name)
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    h = headline(run)
    sections = build_sections(run, copies)
    csv_text = rows_csv(run)
    (out / "rows.csv").write_text(csv_text)
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text(_markdown(run, h, sections, generated))
    sections[-1].raw_html = f'<p>{page.csv_link(csv_text, f"{run.name}-rows.csv")}</p>'
    doc = page.page(f"attnbench report: {run.name}", head_html(run, h, generated), sections)
    html_path.write_text(doc)
    return md_path, html_path
