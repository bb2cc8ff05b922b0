"""How long does attnbench itself take around one measurement?

Runs ``attnbench run`` on a one-cell suite (``swin.window`` at 224 px, the device's default dtype) in
fresh interpreters, ``--repeats`` times, as a user would from the shell, and records for each: the
process's wall time, the time inside the implementation's calls (the row's ``measure_s``) and their
difference, the harness. Also records where an interpreter's imports go (``python -X importtime``
of the same command, top-level modules). Writes ``harness_time.json`` and ``harness_time.md`` with
the environment record of the last run beside them.

Usage::

    python benchmarks/harness_time.py --out results/reference/harness_time-cpu [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITE = """name: one_cell
description: one cell, for timing the harness around it
device: auto
dim: 96
heads: 3
resolution: [224]
impls: [swin.window]
"""


def _run_once(suite: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "attnbench", "run", str(suite), "--out", str(out), "--no-progress"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"attnbench run failed ({proc.returncode}):\n{proc.stderr}")
    row = json.loads((out / "rows.jsonl").read_text().splitlines()[0])
    return {"wall_s": wall, "measure_s": row["measure_s"], "harness_s": wall - row["measure_s"],
            "status": row["status"]}


def _imports(suite: Path, out: Path) -> list[tuple[str, float]]:
    cmd = [sys.executable, "-X", "importtime", "-m", "attnbench", "run", str(suite), "--out", str(out),
           "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    top = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|")
        if cumulative.strip().isdigit() and name.startswith(" ") and not name.startswith("  "):  # top level
            top.append((name.strip(), int(cumulative) / 1e6))
    return sorted(top, key=lambda t: -t[1])[:8]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        suite = Path(tmp) / "one_cell.yaml"
        suite.write_text(SUITE)
        runs = []
        for i in range(args.repeats):
            out = Path(tmp) / f"run{i}"
            runs.append(_run_once(suite, out))
        imports = _imports(suite, Path(tmp) / "imports")
        shutil.copy2(out / "env.json", args.out / "env.json")
    summary = {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "measure_s", "harness_s")}
    result = {"runs": runs, "median": summary, "top_level_imports_s": imports, "suite": SUITE}
    (args.out / "harness_time.json").write_text(json.dumps(result, indent=2))
    lines = ["# attnbench around one cell", "", "| run | wall s | measure s | harness s |", "|---:|---:|---:|---:|"]
    lines += [f"| {i + 1} | {r['wall_s']:.2f} | {r['measure_s']:.2f} | {r['harness_s']:.2f} |" for i, r in enumerate(runs)]
    lines += [f"| median | {summary['wall_s']:.2f} | {summary['measure_s']:.2f} | {summary['harness_s']:.2f} |", "",
              "Top-level imports of one run (cumulative s): "
              + ", ".join(f"{name} {s:.2f}" for name, s in imports)]
    (args.out / "harness_time.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
