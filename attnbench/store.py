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
    "sdpa_backend", "compiled", "compile_s", "tf32", "telemetry", "throttled", "cpu_threads", "cell_id",
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


def _cell(row: pd.Series, value: str, scale: float, fmt: str) -> str:
    if row["status"] != "ok" and (value.startswith("latency") or value.startswith("peak")):
        return {"oom": "OOM", "over_budget": "budget", "unsupported": "n/a", "error": "ERR"}.get(row["status"], "?")
    v = row[value]
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    text = format(v / scale, fmt)
    return text + ("~" if value.startswith("latency") and row.get("noisy") is True else "")


def pivot(df: pd.DataFrame, value: str, scale: float = 1.0, fmt: str = ".3g") -> pd.DataFrame:
    """implementation x resolution (or x named shape) table of one metric; failed cells show their status."""
    by_shape = "shape" in df and df["shape"].fillna("").astype(bool).all()
    columns = "shape" if by_shape else "resolution"
    varying = ("dtype", "mode", "batch") if by_shape else ("dtype", "mode", "batch", "dim", "heads")
    index = ["label"] + [c for c in varying if df[c].nunique() > 1]
    d = df.assign(_cell=df.apply(_cell, axis=1, args=(value, scale, fmt)))
    table = d.pivot_table(index=index, columns=columns, values="_cell", aggfunc="first", sort=False)
    table.columns.name = columns
    return table


def summary_text(df: pd.DataFrame) -> str:
    """The end-of-run summary: latency, peak memory and FLOPs by implementation and resolution."""
    if df.empty:
        return "no rows"
    parts = []
    for title, col, scale, fmt in (("latency, median ms (~ = noisy: IQR > 10% of median)", "latency_ms_median", 1, ".3g"),
                                   ("peak memory of the call, MiB", "peak_mem_bytes", 2**20, ".4g"),
                                   ("FLOPs (analytic, 2 per MAC, forward), GFLOP", "flops_analytic", 1e9, ".4g")):
        parts.append(f"{title}\n{pivot(df, col, scale, fmt).to_string()}")
    counts = df["status"].value_counts().to_dict()
    parts.append("cells: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    flagged = attention_list(df)
    if flagged:
        parts.append("cells to look at:\n" + "\n".join(f"  {line}" for line in flagged))
    return "\n\n".join(parts)


def attention_list(df: pd.DataFrame) -> list[str]:
    """One line per cell that is noisy, ran throttled, or did not finish with status ok (skips folded)."""
    lines = []
    for _, r in df.iterrows():
        where = f"{r['label']} {r['resolution']}px {r['dtype']} {r['mode']}"
        if r["status"] != "ok":
            if not str(r["message"]).startswith("skipped:"):
                lines.append(f"{r['status']}: {where}: {r['message']}")
        else:
            if r.get("noisy") is True:
                lines.append(f"noisy: {where}: IQR {r['latency_ms_iqr']:.3g} ms on a median of "
                             f"{r['latency_ms_median']:.3g} ms")
            if isinstance(r.get("throttled"), str) and r["throttled"]:
                lines.append(f"throttled: {where}: {r['throttled']}")
    return lines
