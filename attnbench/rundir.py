"""The run folder a suite writes: choosing it, resuming it, and its session records. No torch.

Files: ``rows.jsonl`` (see :mod:`attnbench.store`), ``env.json`` (``env.N.json`` for the N-th
resumed session), ``suite.yaml`` (the suite as run), ``errors.log`` and ``run.jsonl`` (one line of
time accounting per session).

Resuming appends to the rows of an earlier session; like pyperf, which refuses to merge runs with
different metadata, it refuses when the earlier session ran on another device, torch or attnbench.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from . import store
from .errors import RunDirError

RUN_LOG = "run.jsonl"
SUITE_FILE = "suite.yaml"
ERRORS_LOG = "errors.log"


def _latest_run(root: Path) -> Path:
    runs = sorted(p for p in root.glob("*") if (p / store.ROWS_FILE).is_file())
    if not runs:
        raise RunDirError(f"--resume: no earlier run of this suite under {root}")
    return runs[-1]


def choose(root: Path, out: str | Path | None, resume: bool) -> Path:
    """The run folder: ``out``, or with ``resume`` the latest run under ``root``, or a new UTC-stamped one."""
    if out is not None:
        run_dir = Path(out)
    elif resume:
        run_dir = _latest_run(root)
    else:
        run_dir = root / _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is a file, not a run folder: choose another --out")
    rows_path = run_dir / store.ROWS_FILE
    if rows_path.exists() and not resume:
        raise RunDirError(f"{run_dir} already holds a run; pass --resume to finish it or choose another --out")
    if resume and not rows_path.exists() and out is None:
        raise RunDirError(f"--resume: {run_dir} holds no run")
    return run_dir


def _device_of(env: dict[str, Any]) -> str:
    gpu = env.get("gpu")
    if isinstance(gpu, dict) and gpu.get("name"):
        return f"{env.get('device')} ({gpu['name']})"
    return f"{env.get('device')} ({(env.get('cpu') or {}).get('model')})"


IDENTITY_OF_ENV = {
    "device": _device_of,
    "torch": lambda e: (e.get("torch") or {}).get("version"),
    "attnbench": lambda e: (e.get("packages") or {}).get("attnbench"),
}


def env_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What makes two sessions' numbers incomparable: device, torch version, attnbench version."""
    out = []
    for what, get in IDENTITY_OF_ENV.items():
        a, b = get(old), get(new)
        if a != b:
            out.append(f"{what} {a} (earlier session) vs {b} (now)")
    return out


CELL_KEYS = ("impls", "resolution", "shapes", "batch", "dtype", "mode", "dim", "heads", "plugins", "pairs",
             "description", "executor")  # a resumed suite may add or drop cells and run them elsewhere (executor);
# every other setting must be the same


def suite_differences(old_raw: dict[str, Any], new_raw: dict[str, Any]) -> list[str]:
    """The settings in which two suites differ, other than which cells they list (:data:`CELL_KEYS`)."""
    from .suite import SuiteModel  # pydantic only: defaults filled in, nothing loaded

    try:
        old = SuiteModel.model_validate(old_raw).model_dump()
    except Exception:  # an unreadable record: compare what was written
        old = dict(old_raw)
    new = SuiteModel.model_validate(new_raw).model_dump()
    return [f"{k}: {old.get(k)!r} (earlier session) vs {new.get(k)!r} (now)"
            for k in sorted(set(old) | set(new)) if k not in CELL_KEYS and old.get(k) != new.get(k)]


def worker_entry(env: dict[str, Any], executor: str) -> dict[str, Any]:
    """One worker's line in ``env.json``'s ``workers``: where it ran (host, GPU and its UUID, driver,
    clocks, torch) and the references its rows were measured against (peaks, sentinel). A worker's
    ``worker`` key is the value of its rows' ``worker`` column."""
    gpu, nvml = env.get("gpu") or {}, env.get("nvml") or {}
    host = env.get("hostname")
    key = env.get("worker") or (f"{host}/{gpu['uuid']}" if gpu.get("uuid") else f"{host}/cpu/{executor}")
    return {"worker": key, "executor": executor, "hostname": host, "pid": env.get("pid"),
            "device": env.get("device"), "cuda_visible_devices": env.get("cuda_visible_devices"),
            "gpu": env.get("gpu"), "cpu": env.get("cpu"),
            "nvml": {k: nvml.get(k) for k in ("available", "name", "driver", "sm_clock_max_mhz", "mem_clock_max_mhz",
                                              "power_limit_w", "persistence_mode", "reason") if k in nvml},
            "torch": (env.get("torch") or {}).get("version"), "cuda": (env.get("torch") or {}).get("cuda"),
            "python": env.get("python"), "attnbench": (env.get("packages") or {}).get("attnbench"),
            "peaks": env.get("peaks"), "sentinel_tflops_start": env.get("sentinel_tflops_start"),
            "sentinel_tflops_best": env.get("sentinel_tflops_best")}


@dataclass
class RunFolder:
    """An open run folder: the rows already in it (resume) and this session's number."""

    path: Path
    session: int
    done: dict[str, dict[str, Any]] = field(default_factory=dict)  # cell_id -> row of an earlier session

    @classmethod
    def open(cls, run_dir: Path, env: dict[str, Any], suite_raw: dict[str, Any] | None = None,
             on_note: Callable[[str], None] | None = None) -> "RunFolder":
        """Create or reopen ``run_dir``. A folder with rows must have been made with the same suite (cells
        may be added) in the same environment; a last line cut mid-write is dropped, with a note."""
        if (run_dir / store.ROWS_FILE).exists():
            old = store.read_env(run_dir)
            diff = env_differences(old, env) if old else []
            if diff:
                raise RunDirError(f"--resume: {run_dir} was measured in another environment ({'; '.join(diff)}); "
                                  "its rows cannot be mixed with new ones: choose another --out")
            stored = run_dir / SUITE_FILE
            if suite_raw is not None and stored.is_file():
                old_suite = yaml.safe_load(stored.read_text()) or {}
                diff = suite_differences(old_suite, suite_raw)
                if diff:
                    raise RunDirError(f"--resume: {run_dir} holds a run of another suite or other settings "
                                      f"({'; '.join(diff)}): choose another --out")
            if on_note is not None and store.torn_last_line(run_dir):
                on_note(f"the last line of {run_dir / store.ROWS_FILE} was cut mid-write (a killed run): that "
                        "cell is dropped and measured again")
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"cannot create the run folder {run_dir}: {exc.strerror or exc}") from None
        store.repair_rows(run_dir)
        done = {store.row_key(r): r for r in store.read_rows(run_dir)} if (run_dir / store.ROWS_FILE).exists() else {}
        session = len(list(run_dir.glob("env*.json")))
        return cls(run_dir, session, done)

    @property
    def errors_log(self) -> Path:
        return self.path / ERRORS_LOG

    def write_env(self, env: dict[str, Any]) -> None:
        name = store.ENV_FILE if self.session == 0 else f"env.{self.session}.json"
        (self.path / name).write_text(json.dumps(env, indent=2, default=str))

    def write_suite(self, raw: dict[str, Any]) -> None:
        if self.session == 0:
            (self.path / SUITE_FILE).write_text(yaml.safe_dump(raw, sort_keys=False))

    def append(self, row: dict[str, Any]) -> None:
        row["session"] = self.session
        store.append_row(self.path, row)

    def log_session(self, record: dict[str, Any]) -> None:
        with open(self.path / RUN_LOG, "a") as f:
            f.write(json.dumps(record) + "\n")
