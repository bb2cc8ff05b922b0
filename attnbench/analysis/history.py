"""Benchmark history across commits: record runs, query a cell's series, mark change points. No torch.

Storage (``results/history`` by default), in the manner of asv and pytest-benchmark:

* ``runs/<device-key>/<commit12>-<UTC stamp>.json``: one file per recorded run, never rewritten: the
  commit (hash, time, subject, dirty), the device key, an environment key (a hash of torch and Python
  versions, threads, CPU model or GPU name, device), the suite, and per cell the numbers a history
  needs (median latency with its IQR and count, peak memory and its method, FLOP and parameter counts,
  status).
* ``index.json``: every run's identity and per-cell summary in one file, so a query reads one file. It
  is derived: rewritten atomically on each record and rebuilt from ``runs/`` by :func:`rebuild_index`.

Why JSON files rather than sqlite3: the history is meant to be committed beside the baselines;
text diffs and merges where a binary database does not, each run's file is written once (two jobs
recording at the same time cannot corrupt each other's runs, and a lost index is rebuilt), and at
this scale (hundreds of commits x dozens of cells) the index is a few hundred KiB and loads in
milliseconds.

A series is one cell on one device and environment, one point per commit (a commit recorded several
times: the median of its runs' medians), ordered by commit time. Change points: :func:`change_points`.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import hashlib
import json
import math
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import schema, store
from ..errors import AttnbenchError
from . import noise
from .baseline import device_key, suite_name
from .compare import describe

DEFAULT_ROOT = Path("results") / "history"
INDEX = "index.json"
VERSION = 1
CELL_FIELDS = ("label", "impl", "resolution", "shape", "status", "latency_ms_median", "latency_ms_iqr", "latency_n",
               "peak_mem_bytes", "peak_mem_method", "flops_analytic", "flops_torch", "macs_fvcore", "params_count")
METRICS = ("latency_ms_median", "peak_mem_bytes", "flops_analytic")
CHANGE_FLOOR = noise.DEFAULT_MAX_SLOWDOWN  # a latency shift smaller than this is never a change point
NOISE_SIGMAS = 3.0


class HistoryError(AttnbenchError):
    """A history that cannot be written or read (no run folder, no commit, a damaged file)."""


def env_key(env: dict[str, Any]) -> str:
    """A short hash of what, besides the code, sets the numbers: torch, Python, threads, CPU/GPU, device."""
    gpu = env.get("gpu") if isinstance(env.get("gpu"), dict) else {}
    parts = [(env.get("torch") or {}).get("version"), (env.get("python") or {}).get("version")
             if isinstance(env.get("python"), dict) else env.get("python"),
             (env.get("torch") or {}).get("num_threads"), (env.get("cpu") or {}).get("model"), gpu.get("name"),
             env.get("device")]
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:8]


def _git_info(commit: str, repo: Path | None) -> dict[str, Any]:
    try:
        out = subprocess.run(["git", "show", "-s", "--format=%ct%x00%s", commit], cwd=repo or Path.cwd(),
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {}
    if out.returncode != 0 or "\0" not in out.stdout:
        return {}
    t, subject = out.stdout.strip().split("\0", 1)
    return {"commit_time": int(t), "subject": subject}


def record(run_dir: str | Path, root: str | Path = DEFAULT_ROOT, commit: str | None = None,
           commit_time: float | None = None, subject: str | None = None, repo: str | Path | None = None) -> Path:
    """Record a run folder into the history; returns the run's file. The commit is the run's own
    (``env.json`` git), unless given; its time and subject come from git (``repo``, default the
    working directory), else the time of recording."""
    run_dir = Path(run_dir)
    if not (run_dir / store.ROWS_FILE).is_file():
        raise HistoryError(f"{run_dir} is not a run folder (no {store.ROWS_FILE})")
    env = store.read_env(run_dir)
    if not env:
        raise HistoryError(f"{run_dir} has no {store.ENV_FILE}: a history needs the device and commit")
    git = env.get("git") or {}
    commit = commit or git.get("commit")
    if not commit:
        raise HistoryError(f"{run_dir}: no git commit in {store.ENV_FILE}; give one (--commit)")
    now = _dt.datetime.now(_dt.timezone.utc)
    info = _git_info(commit, Path(repo) if repo else None)
    cells = {}
    for row in store.read_rows(run_dir):
        cell = {k: row.get(k) for k in CELL_FIELDS if row.get(k) is not None}
        cell["label"] = describe(row)
        cells[schema.row_key(row)] = cell
    entry = {"version": VERSION, "commit": commit,
             "commit_time": commit_time if commit_time is not None else info.get("commit_time", now.timestamp()),
             "subject": subject if subject is not None else info.get("subject", ""), "dirty": git.get("dirty"),
             "device_key": device_key(env), "env_key": env_key(env), "suite": suite_name(run_dir, env),
             "torch": (env.get("torch") or {}).get("version"), "recorded_utc": now.isoformat(timespec="seconds"),
             "source": str(run_dir), "cells": cells}
    root = Path(root)
    folder = root / "runs" / entry["device_key"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{commit[:12]}-{now.strftime('%Y%m%dT%H%M%S%f')}.json"
    _write_json(path, entry)
    index = load_index(root) if (root / INDEX).is_file() else {"version": VERSION, "runs": []}
    index["runs"].append(_index_entry(entry, path.relative_to(root)))
    _write_json(root / INDEX, index)
    return path


def _index_entry(entry: dict[str, Any], rel: Path) -> dict[str, Any]:
    out = {k: entry[k] for k in ("commit", "commit_time", "subject", "dirty", "device_key", "env_key", "suite",
                                 "recorded_utc")}
    out["file"] = str(rel)
    out["cells"] = entry["cells"]
    return out


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def rebuild_index(root: str | Path = DEFAULT_ROOT) -> dict[str, Any]:
    """Rewrite ``index.json`` from the run files."""
    root = Path(root)
    runs = []
    for p in sorted((root / "runs").glob("*/*.json")):
        try:
            runs.append(_index_entry(json.loads(p.read_text()), p.relative_to(root)))
        except (ValueError, KeyError) as exc:
            raise HistoryError(f"{p}: not a history run file ({exc})") from None
    index = {"version": VERSION, "runs": runs}
    _write_json(root / INDEX, index)
    return index


def load_index(root: str | Path = DEFAULT_ROOT) -> dict[str, Any]:
    root = Path(root)
    path = root / INDEX
    if not path.is_file():
        if (root / "runs").is_dir():
            return rebuild_index(root)
        raise HistoryError(f"no history at {root} (no {INDEX}); record runs with `attnbench history record RUN_DIR`")
    try:
        index = json.loads(path.read_text())
    except ValueError as exc:
        raise HistoryError(f"{path} is damaged ({exc}); `attnbench history rebuild` rewrites it") from None
    if not isinstance(index, dict) or not isinstance(index.get("runs"), list):
        raise HistoryError(f"{path} is not a history index")
    if index.get("version", 0) > VERSION:
        raise HistoryError(f"{path} was written by a newer attnbench (version {index['version']})")
    return index


# --- series -----------------------------------------------------------------------------------------

@dataclass
class Point:
    commit: str
    commit_time: float
    subject: str
    runs: int
    values: dict[str, float | None]  # metric -> value at this commit (median over its runs)
    spread: float = 0.0  # latency: relative IQR / 2 of the runs' samples (largest), the point's own noise
    status: str = "ok"


@dataclass
class Series:
    key: str  # cell key
    label: str
    device_key: str
    env_key: str
    suite: str
    memory_method: str | None
    points: list[Point] = field(default_factory=list)
    changes: dict[str, list[int]] = field(default_factory=dict)  # metric -> indices of points that start a new level

    @property
    def group(self) -> str:
        return f"{self.suite} on {self.device_key} (env {self.env_key})"


def series(root: str | Path = DEFAULT_ROOT, cell: str | None = None, device: str | None = None,
           suite: str | None = None, env: str | None = None) -> list[Series]:
    """Every cell's series (matching ``cell``, a shell pattern on its label or key), change points marked."""
    groups: dict[tuple[str, str, str, str], dict[str, list[tuple[dict, dict]]]] = {}
    for run in load_index(root)["runs"]:
        if (device and run["device_key"] != device) or (suite and run["suite"] != suite) or \
                (env and run["env_key"] != env):
            continue
        for key, c in run["cells"].items():
            if cell and not (fnmatch.fnmatch(c.get("label", ""), cell) or fnmatch.fnmatch(c.get("label", ""), f"*{cell}*")
                             or key == cell):
                continue
            g = (run["device_key"], run["env_key"], run["suite"], key)
            groups.setdefault(g, {}).setdefault(run["commit"], []).append((run, c))
    out = []
    for (dev, ek, su, key), by_commit in groups.items():
        s = Series(key, "", dev, ek, su, None)
        for commit, items in sorted(by_commit.items(), key=lambda kv: min(r["commit_time"] for r, _ in kv[1])):
            cells = [c for _, c in items]
            s.label = cells[-1].get("label", key)
            s.memory_method = s.memory_method or next((c.get("peak_mem_method") for c in cells
                                                       if c.get("peak_mem_method")), None)
            ok = [c for c in cells if c.get("status", "ok") == "ok"]
            values = {m: _median([c.get(m) for c in ok]) for m in METRICS}
            spread = max((c["latency_ms_iqr"] / c["latency_ms_median"] / 2 for c in ok
                          if c.get("latency_ms_iqr") and c.get("latency_ms_median")), default=0.0)
            run0 = items[0][0]
            s.points.append(Point(commit, min(r["commit_time"] for r, _ in items), run0.get("subject", ""),
                                  len(items), values, spread, "ok" if ok else str(cells[-1].get("status"))))
        mark(s)
        out.append(s)
    if not out:
        raise HistoryError(f"no recorded cell matches {cell!r}" if cell else "the history holds no cells")
    return sorted(out, key=lambda s: (s.group, s.label))


def _median(values: list[Any]) -> float | None:
    v = [float(x) for x in values if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)]
    return float(np.median(v)) if v else None


# --- change points ----------------------------------------------------------------------------------

def change_points(values: list[float | None], band: float, log: bool = True) -> list[int]:
    """Indices where a new level starts, by binary segmentation.

    The split of a stretch is where the CUSUM statistic |mean(left) - mean(right)| x sqrt(nl nr / n)
    (on log values for ``log``) peaks; it is kept when the medians of the two sides differ by more
    than ``band`` (log units, or absolute when not ``log``) and by more than ``NOISE_SIGMAS`` times
    the series' own point-to-point noise (the MAD of successive differences, which one step hardly
    moves); each side is then split again. Points without a value are skipped.
    """
    idx = [i for i, v in enumerate(values) if v is not None and (not log or v > 0)]
    x = np.array([math.log(values[i]) if log else float(values[i]) for i in idx])
    if x.size < 2:
        return []
    diffs = np.abs(np.diff(x))
    sigma = float(np.median(diffs)) * 1.4826 / math.sqrt(2) if diffs.size >= 3 else 0.0
    need = max(band, NOISE_SIGMAS * sigma)
    found: list[int] = []

    def split(lo: int, hi: int) -> None:
        if hi - lo < 2:
            return
        best, best_k = -1.0, None
        for k in range(lo + 1, hi):
            a, b = x[lo:k], x[k:hi]
            stat = abs(a.mean() - b.mean()) * math.sqrt(a.size * b.size / (hi - lo))
            if stat > best:
                best, best_k = stat, k
        k = best_k
        if abs(float(np.median(x[k:hi]) - np.median(x[lo:k]))) > need:
            found.append(k)
            split(lo, k)
            split(k, hi)

    split(0, x.size)
    return sorted(idx[k] for k in found)


def mark(s: Series) -> None:
    """Change points of each metric: latency beyond max(15%, the points' own spread), memory beyond the
    method's resolution, FLOPs at any change (deterministic)."""
    lat = [p.values.get("latency_ms_median") for p in s.points]
    spread = max((p.spread for p in s.points), default=0.0)
    s.changes["latency_ms_median"] = change_points(lat, math.log(1 + max(CHANGE_FLOOR, 2 * spread)))
    mem = [p.values.get("peak_mem_bytes") for p in s.points]
    known = [v for v in mem if v is not None]
    if known:
        res, _ = noise.memory_resolution({"peak_mem_method": s.memory_method, "peak_mem_bytes": min(known)}, {})
        s.changes["peak_mem_bytes"] = change_points(mem, res, log=False)
    flops = [p.values.get("flops_analytic") for p in s.points]
    s.changes["flops_analytic"] = [i for i in range(1, len(flops))
                                   if flops[i] is not None and flops[i - 1] is not None and flops[i] != flops[i - 1]]


# --- text -------------------------------------------------------------------------------------------

def series_text(s: Series) -> str:
    """A table: one row per commit, ``*`` after a value where a change point starts."""
    lines = [f"{s.label}  [{s.group}]", f"  {'commit':<12} {'date':<10} {'runs':>4}  {'latency ms':>12} "
             f"{'peak MiB':>10} {'GFLOP':>9}  subject"]
    for i, p in enumerate(s.points):
        def cell(metric: str, scale: float, fmt: str, width: int) -> str:
            v = p.values.get(metric)
            text = "-" if v is None else format(v / scale, fmt)
            return (text + ("*" if i in s.changes.get(metric, []) else " ")).rjust(width)

        date = _dt.datetime.fromtimestamp(p.commit_time, _dt.timezone.utc).strftime("%Y-%m-%d")
        lines.append(f"  {p.commit[:12]:<12} {date:<10} {p.runs:>4}  {cell('latency_ms_median', 1, '.4g', 12)} "
                     f"{cell('peak_mem_bytes', 2**20, '.4g', 10)} {cell('flops_analytic', 1e9, '.4g', 9)}  "
                     f"{p.subject[:60]}")
    marks = [f"{m.split('_')[0]} at {', '.join(s.points[i].commit[:12] for i in idx)}"
             for m, idx in s.changes.items() if idx]
    lines.append(f"  change points: {'; '.join(marks) if marks else 'none'}")
    return "\n".join(lines)


def schema_safe(text: str) -> str:
    """A file-name-safe form of a cell's description."""
    return "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in text).strip("-")[:80] or "cell"
