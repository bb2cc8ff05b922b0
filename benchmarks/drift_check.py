"""Does a busy start spoil a run? The same suite twice: quiet, then with CPU hogs for its first seconds.

Runs ``suites/drift_check.yaml`` (CPU) once on a quiet machine and once while ``--hogs`` busy-looping
processes run for the first ``--hog-s`` seconds, then compares cell by cell: the latency ratio (median
and mean) of the busy run over the quiet one, the CPU cores other processes took during each cell's
timed calls, the sentinel's device speed, the ``drift`` flag and ``peak_fraction``. Writes
``comparison.md`` and ``comparison.json`` next to the two run folders.

    python benchmarks/drift_check.py --out results/reference/drift_check-cpu [--hogs 2] [--hog-s 10]

What to look for: no ``peak_fraction`` above 1 (the peak is measured again when a cell beats it), and
``drift`` on the cells whose latency moved while the hogs ran, not on the others.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "suites" / "drift_check.yaml"


def _run(out: Path) -> None:
    subprocess.run([sys.executable, "-m", "attnbench", "run", str(SUITE), "--out", str(out), "--no-progress"],
                   cwd=ROOT, check=True, capture_output=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--hogs", type=int, default=2)
    p.add_argument("--hog-s", type=float, default=10.0)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    quiet, busy = args.out / "quiet", args.out / "busy"
    _run(quiet)
    hogs = [subprocess.Popen(["timeout", str(args.hog_s), sys.executable, "-c", "while True: pass"])
            for _ in range(args.hogs)]
    _run(busy)
    for h in hogs:
        h.wait()
    q = {r["cell_id"]: r for r in map(json.loads, (quiet / "rows.jsonl").read_text().splitlines())}
    rows, t = [], 0.0
    for r in map(json.loads, (busy / "rows.jsonl").read_text().splitlines()):
        t += r.get("cell_wall_s", 0.0)
        b = q[r["cell_id"]]
        if r["status"] != "ok" or b["status"] != "ok":
            continue
        rows.append({"cell": f"{r['label']} {r['resolution']}px", "ends_s": round(t, 1),
                     "median_ratio": r["latency_ms_median"] / b["latency_ms_median"],
                     "mean_ratio": statistics.mean(r["latency_ms_samples"]) / statistics.mean(b["latency_ms_samples"]),
                     "others_cores": r.get("cpu_others_cores"), "device_speed": r.get("device_speed"),
                     "drift": r["drift"], "peak_fraction": r["peak_fraction"], "over_peak": r.get("over_peak")})
    env = json.loads((busy / "env.json").read_text())
    result = {"hogs": args.hogs, "hog_s": args.hog_s, "busy_peaks": env["peaks"], "cells": rows}
    (args.out / "comparison.json").write_text(json.dumps(result, indent=2))
    lines = [f"# {args.hogs} CPU hogs for the first {args.hog_s:g} s of the busy run", "",
             f"busy run's matmul peak: {env['peaks']['matmul_tflops']}; refreshed: {env['peaks'].get('refreshed')}",
             "", "| cell | ends at s | median busy/quiet | mean busy/quiet | others' cores | device speed | drift "
                 "| peak fraction |", "|---|---:|---:|---:|---:|---:|---|---:|"]
    for c in rows:
        others = f"{c['others_cores']:.2f}" if c["others_cores"] is not None else "-"
        lines.append(f"| {c['cell']} | {c['ends_s']} | {c['median_ratio']:.2f} | {c['mean_ratio']:.2f} | {others} | "
                     f"{c['device_speed']:.2f} | {'**drift**' if c['drift'] else ''} | {c['peak_fraction']:.3f} |")
    (args.out / "comparison.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
