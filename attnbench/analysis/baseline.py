"""Regression baselines: run folders kept under ``results/baselines/<device-key>/<suite>/``.

A baseline is itself a run folder, so everything that reads runs reads it. ``write_baseline``
writes either a copy of the run (``full=True``: every file) or, by default, a compact export:
``rows.jsonl`` with only the fields a comparison needs (identity, status, raw latency samples and
their summary, peak memory, FLOPs, parameter count, how each was measured), ``env.json``,
``suite.yaml``, and ``baseline.json`` (where it came from, when, and its device key).

The device key names the machine the numbers belong to: the GPU's name (``nvidia-h100-80gb-hbm3``)
or, on CPU, ``cpu-<model>-<threads>t`` (``cpu-amd-epyc-1t``), lower-case with runs of anything but
letters and digits turned into ``-``. No torch import.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import shutil
from pathlib import Path
from typing import Any

from .. import schema, store
from ..errors import AttnbenchError
from ..schema import Status
from . import noise

DEFAULT_ROOT = Path("results") / "baselines"
META_FILE = "baseline.json"
RUN_FILES = (store.ROWS_FILE, store.ENV_FILE, "suite.yaml", "errors.log", "run.jsonl", META_FILE)
COMPACT_FIELDS = schema.COMPACT  # the columns a compact baseline keeps (declared in attnbench.schema)


class BaselineError(AttnbenchError):
    """A baseline that is missing or cannot be written."""


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "unknown"


def device_key(env: dict[str, Any]) -> str:
    """The filesystem-safe name of the device a run's env.json describes."""
    gpu = env.get("gpu")
    if isinstance(gpu, dict) and gpu.get("name"):
        return slug(gpu["name"])
    cpu = env.get("cpu") or {}
    threads = (env.get("torch") or {}).get("num_threads") or cpu.get("affinity") or cpu.get("logical_cores")
    return f"cpu-{slug(cpu.get('model') or 'unknown')}-{threads or 0}t"


def suite_name(run_dir: str | Path, env: dict[str, Any] | None = None) -> str:
    env = store.read_env(run_dir) if env is None else env
    if env.get("suite_name"):
        return str(env["suite_name"])
    suite_file = Path(run_dir) / "suite.yaml"
    if suite_file.is_file():
        import yaml

        data = yaml.safe_load(suite_file.read_text()) or {}
        if isinstance(data, dict) and data.get("name"):
            return str(data["name"])
    raise BaselineError(f"{run_dir}: cannot tell which suite it ran (no suite_name in env.json, no suite.yaml)")


def baseline_path(root: str | Path, env: dict[str, Any], suite: str) -> Path:
    return Path(root) / device_key(env) / suite


def _require_run(run_dir: Path) -> None:
    if not run_dir.is_dir() or not (run_dir / store.ROWS_FILE).is_file():
        raise BaselineError(f"{run_dir} is not a run folder (no {store.ROWS_FILE})")


def find_baseline(run_dir: str | Path, root: str | Path = DEFAULT_ROOT) -> Path:
    """``--baseline auto``: the baseline for the device and suite of ``run_dir``."""
    run_dir = Path(run_dir)
    env = store.read_env(run_dir)
    name = suite_name(run_dir, env)
    path = baseline_path(root, env, name)
    if (path / store.ROWS_FILE).is_file():
        return path
    have = sorted(str(p.parent.relative_to(root)) for p in Path(root).glob(f"*/{name}/{store.ROWS_FILE}")) \
        if Path(root).is_dir() else []
    hint = f"; baselines of suite {name!r} exist for: {', '.join(have)}" if have else ""
    raise BaselineError(f"no baseline for device {device_key(env)!r} and suite {name!r} at {path}{hint}; "
                        f"write one with `attnbench baseline update RUN_DIR|SUITE`")


def resolve_baseline(spec: str | Path, run_dir: str | Path, root: str | Path = DEFAULT_ROOT) -> Path:
    """``auto`` -> :func:`find_baseline`; a path -> that baseline or run folder (checked)."""
    if str(spec) == "auto":
        return find_baseline(run_dir, root)
    path = Path(spec)
    if not path.exists():
        raise BaselineError(f"baseline {path} does not exist")
    if path.is_dir() and not (path / store.ROWS_FILE).is_file():
        # a device folder or the root: try the run's suite (and device) inside it
        env = store.read_env(run_dir)
        name = suite_name(run_dir, env)
        for cand in (path / name, path / device_key(env) / name):
            if (cand / store.ROWS_FILE).is_file():
                return cand
        raise BaselineError(f"baseline {path} is not a run folder (no {store.ROWS_FILE}) and holds no baseline "
                            f"of suite {name!r}")
    _require_run(path)
    return path


def compact_row(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in COMPACT_FIELDS if k in row}


def write_baseline(run_dir: str | Path, root: str | Path = DEFAULT_ROOT, full: bool = False,
                   dest: str | Path | None = None, more_runs: list[str | Path] = ()) -> Path:
    """Write the baseline of ``run_dir`` (to ``dest``, default ``root/<device-key>/<suite>``); return its path.

    An earlier baseline there is replaced. ``full`` copies the run's files as they are; otherwise
    the compact export (see the module's docstring). ``more_runs``: other runs of the same suite on
    the same device; ``baseline.json`` then records each cell's run-to-run spread (``noise``), which
    widens that cell's noise band in comparisons (:mod:`attnbench.analysis.noise`).
    """
    run_dir = Path(run_dir)
    _require_run(run_dir)
    env = store.read_env(run_dir)
    if not env:
        raise BaselineError(f"{run_dir} has no {store.ENV_FILE}: a baseline must say which device it belongs to")
    name = suite_name(run_dir, env)
    dest = Path(dest) if dest is not None else baseline_path(root, env, name)
    if dest.resolve() == run_dir.resolve():
        raise BaselineError(f"{run_dir} is already the baseline at {dest}")
    rows = store.read_rows(run_dir)
    if not rows:
        raise BaselineError(f"{run_dir} holds no rows")
    others = []
    for other in map(Path, more_runs):
        _require_run(other)
        oenv = store.read_env(other)
        if suite_name(other, oenv) != name or device_key(oenv) != device_key(env):
            raise BaselineError(f"{other} is not a run of suite {name!r} on device {device_key(env)!r}: "
                                "a baseline's runs must be alike")
        others.append(store.read_rows(other))
    if dest.exists():
        if not dest.is_dir() or any(p.name not in RUN_FILES and not p.name.startswith("env.") for p in dest.iterdir()):
            raise BaselineError(f"{dest} exists and holds files that are not a baseline's; not replacing it")
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if full:
        for p in run_dir.iterdir():
            if p.is_file():
                shutil.copy2(p, dest / p.name)
    else:
        with open(dest / store.ROWS_FILE, "w") as f:
            for row in rows:
                f.write(json.dumps(compact_row(row), default=str) + "\n")
        shutil.copy2(run_dir / store.ENV_FILE, dest / store.ENV_FILE)
        if (run_dir / "suite.yaml").is_file():
            shutil.copy2(run_dir / "suite.yaml", dest / "suite.yaml")
    meta = {"source": str(run_dir), "written_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device_key": device_key(env), "suite": name, "compact": not full, "cells": len(rows),
            "ok_cells": sum(r.get("status") == Status.OK for r in rows), "git": env.get("git")}
    if others:
        meta["noise"] = {"runs": 1 + len(others), "sources": [str(run_dir), *map(str, more_runs)],
                         "cells": noise.run_spread([rows, *others])}
    (dest / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return dest


def list_baselines(root: str | Path = DEFAULT_ROOT) -> list[dict[str, Any]]:
    """Every baseline under ``root``: path, device key, suite, cells, when written."""
    root = Path(root)
    out = []
    for rows in sorted(root.glob(f"*/*/{store.ROWS_FILE}")) if root.is_dir() else []:
        d = rows.parent
        meta = json.loads((d / META_FILE).read_text()) if (d / META_FILE).is_file() else {}
        out.append({"path": str(d), "device_key": d.parent.name, "suite": d.name,
                    "cells": meta.get("cells", len(store.read_rows(d))), "written_utc": meta.get("written_utc"),
                    "compact": meta.get("compact")})
    return out


def github_benchmark_entries(run_dir: str | Path, memory: bool = False, prefix: str = "") -> list[dict[str, Any]]:
    """A run as github-action-benchmark's ``customSmallerIsBetter`` input: one entry per ok cell and metric.

    Latency: the median in ms, ``range`` half the inter-quartile range; with ``memory`` also the
    peak memory in MiB. Names are stable across runs of the same suite (the cell's description).
    """
    from .compare import describe

    run_dir = Path(run_dir)
    _require_run(run_dir)
    out = []
    for row in store.read_rows(run_dir):
        if row.get("status") != Status.OK or row.get("latency_ms_median") is None:
            continue
        name = f"{prefix}{describe(row)}"
        n, iqr = row.get("latency_n"), row.get("latency_ms_iqr")
        extra = (f"n={n}; p10={row.get('latency_ms_p10', float('nan')):.4g} ms; "
                 f"p90={row.get('latency_ms_p90', float('nan')):.4g} ms; cell_id={row.get('cell_id')}")
        out.append({"name": f"{name} - latency", "unit": "ms", "value": float(row["latency_ms_median"]),
                    "range": f"± {iqr / 2:.3g}" if isinstance(iqr, (int, float)) else "", "extra": extra})
        mem = row.get("peak_mem_bytes")
        if memory and isinstance(mem, (int, float)) and mem == mem:
            out.append({"name": f"{name} - peak memory", "unit": "MiB", "value": float(mem) / 2**20, "range": "",
                        "extra": f"method={row.get('peak_mem_method')}; cell_id={row.get('cell_id')}"})
    return out
