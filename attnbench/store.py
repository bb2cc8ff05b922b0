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

from . import schema
from .errors import RunDirError

ROWS_FILE = "rows.jsonl"
ENV_FILE = "env.json"
SCHEMA_VERSION = schema.SCHEMA_VERSION
BASE_COLUMNS = schema.names()  # every load_results frame has these, in this order, then the rest
row_key = schema.row_key


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


def torn_last_line(run_dir: str | Path) -> bool:
    """Whether the last line of the rows was cut mid-write (a run killed while appending): that cell is
    not in :func:`read_rows`, and ``--resume`` measures it again."""
    path = Path(run_dir) / ROWS_FILE
    if not path.is_file():
        return False
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    try:
        json.loads(data[data.rfind(b"\n") + 1:])
        return False
    except json.JSONDecodeError:
        return True


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
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # the cell in flight when the run was killed
            raise RunDirError(f"{path}: line {i + 1} is not valid JSON") from None
        if not isinstance(row, dict):
            raise RunDirError(f"{path}: line {i + 1} is not a row (a JSON object)")
        try:
            schema.check_version(row, f"{path}: line {i + 1}")
        except schema.SchemaError as exc:
            raise RunDirError(str(exc)) from None
        rows.append(row)
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
    if "worker_gpu_name" in df.columns:  # rows from many GPU models: one device key per model
        df["device"] = [schema.device_key(r) for r in df.to_dict("records")]
    base = [c for c in BASE_COLUMNS if samples or c != "latency_ms_samples"]
    for col in base:
        if col not in df.columns:
            df[col] = "" if col in ("status", "message", "impl", "label") else math.nan
    extra = [c for c in df.columns if c not in base]
    return df[base + extra]
