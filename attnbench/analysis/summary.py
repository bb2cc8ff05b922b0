"""The summary tables of a run and the cells worth a look: shared by the run's end-of-run summary,
``attnbench show`` and the report. pandas only (no torch, no matplotlib).

The tables are the schema's (:data:`attnbench.schema.TABLES`): one per column declared with a
``table``, label (x whatever varies) by resolution or named shape, failed cells shown by status.
"""

from __future__ import annotations

import math

import pandas as pd

from .. import schema
from ..schema import Status, status_word
from . import fmt

TABLES = schema.TABLES
MARK_BEST = "*"  # the best value of a column, in the terminal's tables


def _nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def cell_text(row: pd.Series, col: str) -> str:
    """One cell of a summary table: the value formatted by :mod:`attnbench.analysis.fmt` (with its unit),
    ``~`` after a noisy latency, or the status word of a failed cell in a measured column."""
    if row["status"] != Status.OK and col in schema.MEASURED:
        return status_word(row["status"])
    v = row.get(col)
    if _nan(v):
        return "-"
    return fmt.value(col, v) + (fmt.NOISY_MARK if col == "latency_ms_median" and row.get("noisy") is True else "")


def _layout(df: pd.DataFrame) -> tuple[bool, list[str]]:
    by_shape = bool(len(df)) and df["shape"].fillna("").astype(str).astype(bool).all()
    varying = ("dtype", "mode", "batch") if by_shape else ("dtype", "mode", "batch", "dim", "heads")
    return by_shape, ["label"] + [c for c in varying if df[c].nunique() > 1]


def _pivot(df: pd.DataFrame, values: list) -> pd.DataFrame:
    by_shape, index = _layout(df)
    columns = "shape" if by_shape else "resolution"
    d = df.assign(_cell=values)
    if not by_shape:
        d = d.assign(resolution=d["resolution"].astype("Int64"))
    t = d.pivot_table(index=index, columns=columns, values="_cell", aggfunc="first", sort=False, dropna=False)
    t = t.dropna(how="all")
    if not by_shape:
        t = t[sorted(t.columns)]
    t.columns.name = columns
    return t


def table(df: pd.DataFrame, col: str, scale: float = 1.0, fmt_spec: str = "") -> pd.DataFrame:
    """label (x whatever varies: dtype, mode, batch, dim, heads) by resolution or named shape, each cell
    formatted by :mod:`attnbench.analysis.fmt` (``scale`` and ``fmt_spec`` are the schema's and ignored:
    the unit scales with the value); failed cells show their status (OOM, budget, ERR, n/a) in measured
    columns."""
    return _pivot(df, [cell_text(r, col) for _, r in df.iterrows()]).fillna("")


def best_cells(df: pd.DataFrame, col: str) -> pd.DataFrame:
    """Booleans shaped like :func:`table`: True where the cell holds the best value of its column (lowest
    latency or memory, highest throughput) among the measured cells; all False for columns without one."""
    how = fmt.better(col)
    raw = _pivot(df, [float(r[col]) if r["status"] == Status.OK and not _nan(r.get(col)) else math.nan
                      for _, r in df.iterrows()]).astype(float)
    if not how:
        return raw.notna() & False
    best = raw.min() if how == "low" else raw.max()
    counts = raw.notna().sum()
    return raw.eq(best, axis=1) & (counts > 1)


def headings(df: pd.DataFrame, columns) -> list[str]:
    """The column headings of a table: ``224 px · 3,136 tok`` or ``S1 · 56×56 tok · C96 h3``."""
    by_shape, _ = _layout(df)
    out = []
    for c in columns:
        if by_shape:
            r = df[df["shape"] == c].iloc[0]
            out.append(fmt.shape_heading(c, r.get("grid_h"), r.get("grid_w"), r.get("dim"), r.get("heads")))
        else:
            tok = df.loc[df["resolution"] == c, "tokens"].dropna()
            out.append(fmt.resolution_heading(c, tok.iloc[0] if len(tok) and tok.nunique() == 1 else None))
    return out


def titled(title: str) -> str:
    """The schema's table title without its unit (the cells carry their own)."""
    for unit in (", median ms", ", MiB", ", GFLOP", ", img/s"):
        title = title.replace(unit, "")
    return title


def table_text(df: pd.DataFrame, col: str) -> str:
    """A summary table for the terminal: headings with px and tokens (or the stage's shape), ``*`` after
    the best value of each column."""
    t = table(df, col)
    best = best_cells(df, col)
    t = t.where(~best.reindex_like(t).fillna(False).astype(bool), t + MARK_BEST)
    heads = [h.split(" · ", 1) + [""] * (" · " not in h) for h in headings(df, t.columns)]
    t.columns = pd.MultiIndex.from_tuples([tuple(h) for h in heads])
    return t.to_string()


def summary_text(df: pd.DataFrame) -> str:
    """The end-of-run summary: the tables by implementation and resolution, and the cells to look at."""
    if df.empty:
        return "no rows"
    parts = [f"{title}\n{table_text(df, col)}" for title, col, _scale, _fmt in schema.TABLES]
    counts = df["status"].value_counts().to_dict()
    parts.append("cells: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                 + f"   ({MARK_BEST}: best of its column, {fmt.NOISY_MARK}: noisy)")
    flagged = attention_lines(df)
    if flagged:
        parts.append("cells to look at:\n" + "\n".join(f"  {line}" for line in flagged))
    return "\n\n".join(parts)


def _where(r: pd.Series) -> str:
    at = r["shape"] if r["shape"] else f"{int(r['resolution'])}px"
    extra = [str(r["dtype"]), str(r["mode"])]
    if r.get("batch") == r.get("batch"):
        extra.append(f"batch {int(r['batch'])}")
    return f"{r['label']} {at} ({int(r['tokens']) if r['tokens'] == r['tokens'] else '?'} tokens) {' '.join(extra)}"


def attention_cells(df: pd.DataFrame) -> list[dict[str, str]]:
    """Every failed, skipped, noisy, throttled, drifted or over-peak cell: dicts with kind, status, cell and
    detail."""
    out = []
    for _, r in df.iterrows():
        where = _where(r)
        if r["status"] != Status.OK:
            skipped = str(r["message"]).startswith(schema.SKIPPED_PREFIX)
            out.append({"kind": "skipped" if skipped else "failed", "status": r["status"], "cell": where,
                        "detail": str(r["message"]).splitlines()[0] if r["message"] else ""})
            continue
        if r.get("noisy") is True:
            med, iqr = r["latency_ms_median"], r["latency_ms_iqr"]
            detail = (f"IQR {fmt.ms(iqr)} on a median of {fmt.ms(med)} ({100 * iqr / med:.0f}%)"
                      if med == med and iqr == iqr and med > 0 else "IQR > 10% of the median")
            out.append({"kind": "noisy", "status": Status.OK.value, "cell": where, "detail": detail})
        throttled = r.get("throttled")
        if isinstance(throttled, str) and throttled:
            out.append({"kind": "throttled", "status": Status.OK.value, "cell": where, "detail": throttled})
        if r.get("drift") is True:
            reason = r.get("drift_reason")
            if not isinstance(reason, str) or not reason:  # rows of earlier versions: the sentinel only
                reason = f"the device ran at {r['device_speed']:.2f}x its speed at the start of the run (sentinel matmul)"
            out.append({"kind": "drift", "status": Status.OK.value, "cell": where, "detail": reason})
        if r.get("over_peak") is True:
            out.append({"kind": "over peak", "status": Status.OK.value, "cell": where,
                        "detail": f"{fmt.sig(r['tflops_achieved'])} TFLOP/s achieved, above the device's matmul peak "
                                  f"{fmt.sig(r['peak_tflops'])} measured again (peak_fraction {r['peak_fraction']:.2f})"})
    return out


def attention_lines(df: pd.DataFrame) -> list[str]:
    lines = []
    cells = attention_cells(df)
    for c in cells:
        if c["kind"] != "skipped":
            lines.append(f"{c['kind'] if c['kind'] != 'failed' else c['status']}: {c['cell']}: {c['detail']}")
    skipped = [c for c in cells if c["kind"] == "skipped"]
    if skipped:
        lines.append(f"skipped: {len(skipped)} cell(s) not tried after a smaller resolution failed "
                     "(listed in the report)")
    return lines
