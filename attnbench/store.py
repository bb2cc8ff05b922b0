"""Run folders <-> pandas DataFrames. No torch import: analysis runs wherever a folder is copied.

A run folder holds ``rows.jsonl`` (one JSON object per finished cell, appended and fsynced as each
cell ends), ``env.json`` (the environment record; ``env.N.json`` for the N-th resumed session),
``suite.yaml`` (the suite as run) and ``errors.log`` (tracebacks of cells that raised).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import RunDirError

ROWS_FILE = "rows.jsonl"
ENV_FILE = "env.json"
SCHEMA_VERSION = 1

BASE_COLUMNS = [
    "impl", "label", "family", "shape", "resolution", "tokens", "grid_h", "grid_w", "batch", "dim", "heads", "dtype",
    "mode", "device", "status", "message", "params", "flops_analytic", "macs_fvcore", "macs_fvcore_matmul",
    "flops_torch", "flops_torch_fwd_bwd", "peak_mem_bytes", "peak_mem_method", "latency_ms_median",
    "latency_ms_iqr", "latency_ms_min", "latency_ms_p10", "latency_ms_p90", "latency_n", "noisy",
    "throughput_img_s", "throughput_tok_s", "tflops_achieved", "peak_fraction", "timing_method", "l2_flush",
    "sdpa_backend", "compiled", "compile_s", "tf32", "telemetry", "throttled", "device_speed", "drift", "cpu_threads",
    "cell_id",
]


def append_row(run_dir: Path, row: dict[str, Any]) -> None:
    """Append one cell's row and force it to disk, so an interrupted run loses at most the cell in flight."""
    line = json.dumps(row, default=str)
    with open(Path(run_dir) / ROWS_FILE, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def repair_rows(run_dir: Path) -> None:
    """Cut a last line left half-written by a killed run, so appending can go on."""
    path = Path(run_dir) / ROWS_FILE
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def read_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run folder; a half-written last line is ignored."""
    run_dir = Path(run_dir)
    path = run_dir / ROWS_FILE
    if not path.is_file():
        raise RunDirError(f"{run_dir} is not a run folder (no {ROWS_FILE})")
    rows = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # the cell in flight when the run was killed
            raise RunDirError(f"{path}: line {i + 1} is not valid JSON") from None
    return rows


def read_env(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / ENV_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def load_results(run_dir: str | Path, samples: bool = False) -> pd.DataFrame:
    """A run folder's rows as a DataFrame, one row per cell.

    Each implementation parameter becomes a column of its own (``sr_ratio``, ``pool_size``; prefixed
    ``param_`` where the name would clash). ``samples=True`` keeps ``latency_ms_samples`` (a list of
    raw per-call latencies in ms) per row.
    """
    rows = read_rows(run_dir)
    flat = []
    for row in rows:
        r = {k: v for k, v in row.items() if samples or k != "latency_ms_samples"}
        for name, value in (row.get("params") or {}).items():
            r[name if name not in BASE_COLUMNS else f"param_{name}"] = value
        flat.append(r)
    df = pd.DataFrame(flat)
    for col in BASE_COLUMNS:
        if col not in df.columns:
            df[col] = math.nan if col not in ("status", "message", "impl", "label") else ""
    extra = [c for c in df.columns if c not in BASE_COLUMNS]
    return df[BASE_COLUMNS + extra]


# The summary tables: (title with units, column, scale, format)
TABLES = [
    ("latency, median ms (~ = noisy: IQR > 10% of the median)", "latency_ms_median", 1.0, ".3g"),
    ("peak memory of one call, MiB", "peak_mem_bytes", 2.0 ** 20, ".4g"),
    ("FLOPs (analytic, forward, 2 per MAC), GFLOP", "flops_analytic", 1e9, ".4g"),
    ("throughput, img/s", "throughput_img_s", 1.0, ".3g"),
]
MEASURED = ("latency_ms_median", "peak_mem_bytes", "throughput_img_s", "throughput_tok_s", "tflops_achieved")
STATUS_WORD = {"oom": "OOM", "over_budget": "budget", "unsupported": "n/a", "error": "ERR", "timeout": "timeout",
               "crashed": "crashed"}



def _cell(row: pd.Series, col: str, scale: float, fmt: str) -> str:
    if row["status"] != "ok" and col in MEASURED:
        return STATUS_WORD.get(row["status"], row["status"] or "?")
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



pivot = table  # the name the first API used


def summary_text(df: pd.DataFrame) -> str:
    """The end-of-run summary: the tables by implementation and resolution, and the cells to look at."""
    if df.empty:
        return "no rows"
    parts = [f"{title}\n{table(df, col, scale, fmt).to_string()}" for title, col, scale, fmt in TABLES]
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
    """Every failed, skipped, noisy, throttled or drifted cell: dicts with kind, status, cell and detail."""
    out = []
    for _, r in df.iterrows():
        where = _where(r)
        if r["status"] != "ok":
            skipped = str(r["message"]).startswith("skipped:")
            out.append({"kind": "skipped" if skipped else "failed", "status": r["status"], "cell": where,
                        "detail": str(r["message"]).splitlines()[0] if r["message"] else ""})
            continue
        if r.get("noisy") is True:
            med, iqr = r["latency_ms_median"], r["latency_ms_iqr"]
            detail = (f"IQR {iqr:.3g} ms on a median of {med:.3g} ms ({100 * iqr / med:.0f}%)"
                      if med == med and iqr == iqr and med > 0 else "IQR > 10% of the median")
            out.append({"kind": "noisy", "status": "ok", "cell": where, "detail": detail})
        throttled = r.get("throttled")
        if isinstance(throttled, str) and throttled:
            out.append({"kind": "throttled", "status": "ok", "cell": where, "detail": throttled})
        if r.get("drift") is True:
            out.append({"kind": "drift", "status": "ok", "cell": where,
                        "detail": f"the device ran at {r['device_speed']:.2f}x its speed at the start of the run "
                                  "(sentinel matmul)"})
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


