"""Does `attnbench check` with its default settings cry wolf, and does it still catch real slowdowns?

1. False alarms, as CI meets them: ``--pairs`` times, a baseline run of ``suites/ci_smoke.yaml``
   (``python3 -m attnbench run suites/ci_smoke.yaml --out DIR --no-progress``), then
   ``python3 -m attnbench check suites/ci_smoke.yaml --baseline DIR --out NEW --no-progress`` with no
   other option: the same code, run and judged by check itself (which, given a suite, re-runs it once
   to confirm a latency/memory failure before it counts). In every other pair a CPU-heavy process (a
   Python busy loop started by this script) runs during the check. A failing check is a false alarm.
   The same pairs are also judged as run folders (``check NEW --baseline DIR``: no re-run possible),
   reported separately.
2. Misses: in copies of the pairs' new runs one cell is slowed down (``--tries`` each): a 25%
   slowdown of a cell of at least 1 ms, and a 2x slowdown of a sub-millisecond cell, rotating over the
   cells that qualify. Planted by scaling that cell's raw samples by the factor and keeping only the
   first n / factor of them (at least the suite's ``min_repeats``): what the timing loop records for
   code doing the same work ``factor`` times slower (it stops after the same target time with fewer
   calls). The copies keep the real runs' own noise, load included. Because check re-measures a suite's
   failed cells to confirm them, a planted slowdown is also planted in an independent run (the next
   pair's new run) and judged against the same baseline: caught when one run fails it and the other
   fails it too or cannot judge it; NOT JUDGED when neither run could judge the cell (other processes
   left it no CPU core: check reports such a cell, it does not fail it); else missed.

    python3 benchmarks/false_alarms.py --out /tmp/false_alarms [--pairs 20] [--tries 10] [--reuse]

``--reuse`` judges the pairs already in ``--out`` again without running the suite (the suite-flow
result stored for each pair is kept). Writes ``summary.json`` in ``--out`` and prints the counts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "suites" / "ci_smoke.yaml"
MIN_REPEATS = 20  # suites/ci_smoke.yaml timing.min_repeats


def _run(out: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "attnbench", "run", str(SUITE), "--out", str(out), "--no-progress"],
                   cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - t0


def _busy() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def collect(out: Path, pairs: int) -> None:
    for i in range(pairs):
        d = out / f"pair{i:02d}"
        if (d / "pair.json").is_file():
            continue
        if d.exists():
            shutil.rmtree(d)
        loaded = i % 2 == 1
        t_base = _run(d / "base")
        hog = _busy() if loaded else None
        t0 = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, "-m", "attnbench", "check", str(SUITE), "--baseline", str(d / "base"),
                                "--out", str(d / "new"), "--no-progress"], cwd=ROOT, capture_output=True, text=True)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
        (d / "check.txt").write_text(p.stdout)
        (d / "check.err").write_text(p.stderr)
        crashed = p.returncode not in (0, 1) or (p.returncode == 1 and "check FAILED" not in p.stdout)
        t_new = time.perf_counter() - t0
        (d / "pair.json").write_text(json.dumps({"loaded": loaded, "base_s": t_base, "check_s": t_new,
                                                 "suite_check_rc": p.returncode, "crashed": crashed,
                                                 "retried": (d / "new-retry1").is_dir()}))
        print(f"pair {i}: {'loaded' if loaded else 'quiet '} base run {t_base:.1f} s, check {t_new:.1f} s: "
              f"{'CRASHED' if crashed else 'FAILED' if p.returncode else 'passed'}"
              f"{' (re-measured)' if (d / 'new-retry1').is_dir() else ''}",
              flush=True)


def check(new: Path, base: Path) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-m", "attnbench", "check", str(new), "--baseline", str(base)],
                       cwd=ROOT, capture_output=True, text=True)
    if p.returncode not in (0, 1):
        raise SystemExit(f"check failed to run (exit {p.returncode}):\n{p.stderr}")
    return p.returncode, p.stdout


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "rows.jsonl").read_text().splitlines() if line.strip()]


def plant(src: Path, dest: Path, cell_id: str, factor: float) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest)
    rows = _rows(dest)
    for r in rows:
        if r.get("cell_id") == cell_id:
            s = r["latency_ms_samples"]
            keep = max(MIN_REPEATS, min(len(s), int(round(len(s) / factor))))
            r["latency_ms_samples"] = [factor * x for x in s[:keep]]
            r["latency_n"] = keep
            r["latency_ms_median"] = sorted(r["latency_ms_samples"])[keep // 2]
    (dest / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _median(r: dict) -> float:
    s = sorted(r["latency_ms_samples"])
    return s[len(s) // 2]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--pairs", type=int, default=20)
    p.add_argument("--tries", type=int, default=10)
    p.add_argument("--reuse", action="store_true", help="judge the pairs already in --out; run nothing")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not args.reuse:
        collect(args.out, args.pairs)
    pair_dirs = sorted(d for d in args.out.glob("pair*") if (d / "new" / "rows.jsonl").is_file()
                       and not json.loads((d / "pair.json").read_text()).get("crashed"))[:args.pairs]
    crashed = sorted(d.name for d in args.out.glob("pair*") if (d / "pair.json").is_file()
                     and json.loads((d / "pair.json").read_text()).get("crashed"))
    alarms, dir_alarms = [], []
    for d in pair_dirs:
        info = json.loads((d / "pair.json").read_text())
        kind = "loaded" if info["loaded"] else "quiet"
        if info.get("suite_check_rc"):
            alarms.append(d.name)
            print(f"FALSE ALARM (suite check) {d.name} ({kind}):")
            print("\n".join(line for line in (d / "check.txt").read_text().splitlines() if line.startswith("REGRESSION")))
        rc, text = check(d / "new", d / "base")
        if rc:
            dir_alarms.append(d.name)
            print(f"false alarm (run folder, no re-run) {d.name} ({kind}):")
            print("\n".join(line for line in text.splitlines() if line.startswith("REGRESSION")))
    # per try: caught, missed, or not judged (the cell measured without a free core in both runs); as in
    # check's re-measurement, a failure stands when its confirming run could not be judged
    misses: dict[str, list[str]] = {"25% slower, cell >= 1 ms": [], "2x slower, cell < 1 ms": []}
    unjudged: dict[str, list[str]] = {k: [] for k in misses}
    first_only: dict[str, int] = {k: 0 for k in misses}
    tries: dict[str, int] = {k: 0 for k in misses}
    for kind, factor, pick in (("25% slower, cell >= 1 ms", 1.25, lambda m: m >= 1.0),
                               ("2x slower, cell < 1 ms", 2.0, lambda m: m < 1.0)):
        for t in range(args.tries):
            d = pair_dirs[t % len(pair_dirs)]
            other = pair_dirs[(t + 1) % len(pair_dirs)]
            cells = [r for r in _rows(d / "base") if r.get("status") == "ok" and pick(_median(r))]
            target = cells[t % len(cells)]
            name = f"{target['label']} {target['resolution']}px"
            outcome = []
            for j, src in enumerate((d / "new", other / "new")):
                planted = args.out / "planted" / f"{kind[:3].strip()}-{t}-{j}"
                plant(src, planted, target["cell_id"], factor)
                rc, text = check(planted, d / "base")
                lines = text.splitlines()
                if rc == 1 and any(line.startswith(f"REGRESSION {name}") for line in lines):
                    outcome.append("caught")
                elif any(line.startswith(f"pass {name}") and "NOT JUDGED" in line for line in lines):
                    outcome.append("not judged")
                else:
                    outcome.append("missed")
            tries[kind] += 1
            first_only[kind] += outcome[0] == "caught"
            text = f"{d.name}: {name} (first run {outcome[0]}, confirming run {outcome[1]})"
            if "missed" not in outcome and "caught" in outcome:
                continue
            if outcome == ["not judged", "not judged"]:
                unjudged[kind].append(text)
                print(f"NOT JUDGED ({kind}) {text}")
            else:
                misses[kind].append(text)
                print(f"MISSED ({kind}) {text}")
    loaded_n = sum(json.loads((d / "pair.json").read_text())["loaded"] for d in pair_dirs)
    retried = sum(json.loads((d / "pair.json").read_text()).get("retried", False) for d in pair_dirs)
    summary = {"pairs": len(pair_dirs), "loaded_pairs": loaded_n, "false_alarms_suite_check": len(alarms),
               "false_alarm_pairs": alarms, "suite_checks_that_re_ran": retried, "crashed_pairs_left_out": crashed,
               "not_judged_cells": sum((d / "check.txt").read_text().count("warning: not judged") for d in pair_dirs
                                       if (d / "check.txt").is_file()),
               "false_alarms_run_folder_check": len(dir_alarms), "run_folder_false_alarm_pairs": dir_alarms,
               "planted": {k: {"tries": tries[k], "caught": tries[k] - len(v) - len(unjudged[k]),
                               "caught_first_run": first_only[k], "missed": v, "not_judged": unjudged[k]}
                           for k, v in misses.items()},
               "wall_s": round(time.perf_counter() - t0, 1)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nunchanged pairs, check SUITE with defaults: {len(alarms)} of {len(pair_dirs)} failed "
          f"({loaded_n} with a busy loop running during the check; {retried} re-ran the suite to confirm)")
    print(f"unchanged pairs, check RUN_DIR with defaults (no re-run): {len(dir_alarms)} of {len(pair_dirs)} failed")
    print(f"cells left not judged (no free core in any re-measurement): {summary['not_judged_cells']}; "
          f"pairs left out because the check crashed: {crashed or 'none'}")
    for k in misses:
        print(f"planted {k}: caught {tries[k] - len(misses[k]) - len(unjudged[k])} of {tries[k]}, missed "
              f"{len(misses[k])}, not judged {len(unjudged[k])} (first run alone caught {first_only[k]})")
    print(f"({summary['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
