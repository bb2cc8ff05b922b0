"""Reports of a run folder: a Markdown file with its PNGs and one self-contained HTML file, and the
terminal tables of ``attnbench show``. No torch.

:func:`write_report` writes ``RUN_DIR/report/report.md`` (next to copies of the run's PNGs, so the
folder can be moved or pasted as it is) and ``RUN_DIR/report/report.html`` (one file: the PNGs are
embedded as base64 data URIs). Both hold the environment, the summary tables, the fitted growth
exponents, the speed-ups, the plots, and every noisy, throttled or failed cell.
"""

from __future__ import annotations

import base64
import html
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import AttnbenchError
from . import run as runs
from .fit import Fit
from .summary import TABLES, attention_cells, summary_text, table  # shared with the run summary

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


def _html_table(header: list[str], rows: list[list[str]], align_right_from: int = 1) -> str:
    out = ["<table>", "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr></thead>",
           "<tbody>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td class=\"{'num' if i >= align_right_from else 'txt'}\">{html.escape(c)}</td>"
                                    for i, c in enumerate(r)) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


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
        mm = ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in (peaks.get("matmul_tflops") or {}).items()
                       if isinstance(v, (int, float)))
        bw = peaks.get("copy_gb_s")
        rows.append(["measured peaks", f"matmul {mm or '-'}; copy {f'{bw:.3g} GB/s' if bw else '-'}"])
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
    return f"{f.k:.2f} ± {f.stderr:.2f}" if f else "-"


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
    sp = sp.assign(_v=[f"{v:.2f}x" for v in sp["speedup"]])
    t = sp.pivot_table(index=keys, columns=col, values="_v", aggfunc="first", sort=False)
    if not run.by_shape:
        t = t[sorted(t.columns)]
    else:
        t = t[[s for s in runs.shape_order(run, run.df) if s in t.columns]]
    t.columns.name = col
    return _flat(t.fillna(""))


PLOT_CAPTIONS = {
    "latency": "Latency against tokens (log-log). k: fitted growth exponent over the large-token part, ±1 s.e.; "
               "crosses: cells over budget (or out of memory) at the latency predicted from FLOPs.",
    "memory": "Peak memory of one call against tokens (log-log); markers along the top: cells without a value.",
    "flops": "Analytic FLOPs against tokens (log-log): counted for every cell, failed ones hollow.",
    "throughput": "Throughput against tokens (log-log).",
    "exponents": "Fitted growth exponents (latency, peak memory, FLOPs) next to each family's theoretical exponent.",
    "speedup": "Speed-ups: baseline latency over candidate latency, cell by cell (> 1: the candidate is faster).",
    "roofline": "Achieved TFLOP/s against arithmetic intensity under the measured matmul peak and copy bandwidth. "
                "Intensity = FLOPs / (dtype bytes x (parameters + 2 x batch x tokens x dim)).",
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


def build_sections(run: runs.Run, pngs: list[Path]) -> list[tuple[str, str, Any]]:
    """The report as (kind, title, payload) sections, rendered to Markdown and HTML alike."""
    sections: list[tuple[str, str, Any]] = []
    sections.append(("table", "Environment", (["", ""], environment_rows(run), 99)))
    for title, col, scale, fmt in TABLES:
        sections.append(("table", title[0].upper() + title[1:], (*_flat(table(run.df, col, scale, fmt)), 1)))
    header, rows = exponent_table(run)
    if rows:
        sections.append(("text", "Growth exponents",
                         "Cost ~ N^k: least squares of log(cost) on log(tokens) over the large-token part of each "
                         "curve (measured cells at or above the median token count, at least 3; FLOPs over all "
                         "cells), ± one standard error. Theory: the family's exponent for large N."))
        sections.append(("table", "", (header, rows, 3)))
    header, rows = speedup_table(run)
    if rows:
        sections.append(("text", "Speed-ups", "Baseline latency / candidate latency for matching cells "
                                              "(> 1: the first-named is faster)."))
        sections.append(("table", "", (header, rows, 1)))
    sections.append(("plots", "Plots", pngs))
    cells = attention_cells(run.df)
    failed = [c for c in cells if c["kind"] == "failed"]
    noisy = [c for c in cells if c["kind"] in ("noisy", "throttled", "drift")]
    skipped = [c for c in cells if c["kind"] == "skipped"]
    sections.append(("text", "Cells to look at",
                     f"{len(failed)} failed, {len(skipped)} not tried after a failure at a smaller size, "
                     f"{len([c for c in noisy if c['kind'] == 'noisy'])} noisy (IQR > 10% of the median), "
                     f"{len([c for c in noisy if c['kind'] == 'throttled'])} throttled, "
                     f"{len([c for c in noisy if c['kind'] == 'drift'])} measured while the device's speed had "
                     "drifted more than 10% from the start of the run."))
    if failed:
        sections.append(("table", "Failed cells", (["status", "cell", "message"],
                                                   [[c["status"], c["cell"], c["detail"]] for c in failed], 99)))
    if skipped:
        sections.append(("table", "Not tried (status of the failure that stopped the series)",
                         (["status", "cell", "message"], [[c["status"], c["cell"], c["detail"]] for c in skipped],
                          99)))
    if noisy:
        sections.append(("table", "Noisy, throttled or drifted cells", (["kind", "cell", "detail"],
                                                               [[c["kind"], c["cell"], c["detail"]] for c in noisy],
                                                               99)))
    return sections


def _markdown(run: runs.Run, sections, generated: str) -> str:
    out = [f"# attnbench report: {run.name}", "",
           f"{runs.device_name(run.env, run.df)} · run folder `{run.path}` · generated {generated} by "
           f"`attnbench report`", ""]
    for kind, title, payload in sections:
        if title:
            out += [f"## {title}", ""]
        if kind == "table":
            header, rows, right = payload
            out += [_md(header, rows, right), ""]
        elif kind == "text":
            out += [payload, ""]
        elif kind == "plots":
            for p in payload:
                out += [f"![{p.stem}]({p.name})", "", f"*{p.name}*: {_caption(p.name, run.by_shape)}", ""]
    return "\n".join(out)


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1250px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.85em; }
th, td { border: 1px solid #ddd; padding: 0.2em 0.55em; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
"""


def _html(run: runs.Run, sections, generated: str) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
           f"<title>attnbench report: {e(run.name)}</title>", f"<style>{CSS}</style></head><body>",
           f"<h1>attnbench report: {e(run.name)}</h1>",
           f"<p>{e(runs.device_name(run.env, run.df))} · run folder <code>{e(str(run.path))}</code> · generated "
           f"{e(generated)} by <code>attnbench report</code></p>"]
    for kind, title, payload in sections:
        if title:
            out.append(f"<h2>{e(title)}</h2>")
        if kind == "table":
            header, rows, right = payload
            out.append(_html_table(header, rows, right))
        elif kind == "text":
            out.append(f"<p>{e(payload)}</p>")
        elif kind == "plots":
            for p in payload:
                data = base64.b64encode(p.read_bytes()).decode("ascii")
                out.append(f"<figure><img alt=\"{e(p.stem)}\" src=\"data:image/png;base64,{data}\">"
                           f"<figcaption><b>{e(p.name)}</b>: {e(_caption(p.name, run.by_shape))}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Plot the run, then write ``RUN_DIR/report/report.md`` (with copies of the PNGs) and
    ``RUN_DIR/report/report.html`` (one file, PNGs embedded). Returns (md path, html path)."""
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
    sections = build_sections(run, copies)
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text(_markdown(run, sections, generated))
    html_path.write_text(_html(run, sections, generated))
    return md_path, html_path
