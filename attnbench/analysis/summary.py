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

TABLES = schema.TABLES


def _cell(row: pd.Series, col: str, scale: float, fmt: str) -> str:
    if row["status"] != Status.OK and col in schema.MEASURED:
        return status_word(row["status"])
    v = row.get(col)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    text = format(float(v) / scale, fmt)
    return text + ("~" if col == "latency_ms_median" and row.get("noisy") is True else "")


def table(df: pd.DataFrame, col: str, scale: float = 1.0, fmt: str = ".3g") -> pd.DataFrame:
    """label (x whatever varies: dtype, mode, batch, dim, heads) by resolution or named shape; failed cells
    show their status (OOM, budget, ERR, n/a) in measured columns."""
    by_shape = bool(len(df)) and df["shape"].fillna("").astype(str).astype(bool).all()
    columns = "shape" if by_shape else "resolution"
    varying = ("dtype", "mode", "batch") if by_shape else ("dtype", "mode", "batch", "dim", "heads")
    index = ["label"] + [c for c in varying if df[c].nunique() > 1]
    d = df.assign(_cell=[_cell(r, col, scale, fmt) for _, r in df.iterrows()])
    if not by_shape:
        d = d.assign(resolution=d["resolution"].astype("Int64"))
    t = d.pivot_table(index=index, columns=columns, values="_cell", aggfunc="first", sort=False)
    if not by_shape:
        t = t[sorted(t.columns)]
    t.columns.name = columns
    return t.fillna("")



def summary_text(df: pd.DataFrame) -> str:
    """The end-of-run summary: the tables by implementation and resolution, and the cells to look at."""
    if df.empty:
        return "no rows"
    parts = [f"{title}\n{table(df, col, scale, fmt).to_string()}" for title, col, scale, fmt in schema.TABLES]
    counts = df["status"].value_counts().to_dict()
    parts.append("cells: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
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
            detail = (f"IQR {iqr:.3g} ms on a median of {med:.3g} ms ({100 * iqr / med:.0f}%)"
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
                        "detail": f"{r['tflops_achieved']:.3g} TFLOP/s achieved, above the device's matmul peak "
                                  f"{r['peak_tflops']:.3g} measured again (peak_fraction {r['peak_fraction']:.2f})"})
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
