"""Build a benchmark history of this repository's recent commits: ``suites/ci_smoke.yaml`` at each.

For each of the last ``--commits`` commits of ``--rev`` (default HEAD), oldest first: ``git worktree add
--detach`` it into a temporary folder, run that commit's own ``suites/ci_smoke.yaml`` there with
``PYTHONPATH`` pointing at the worktree (so the commit's attnbench is the one measured, and its
env.json records that commit), record the run with ``attnbench history record`` (commit time and
subject from git), and remove the worktree. Then ``attnbench publish`` writes the dashboard.

    python3 benchmarks/build_history.py --root /tmp/history [--commits 5] [--runs 1] [--keep-runs DIR]

Slow: one suite run per commit and run (about 15 s each on a quiet 2-core machine). A commit whose run
fails is reported and skipped. Nothing of the main working tree is touched; the worktrees are removed
(``git worktree prune`` at the end).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, required=True, help="history folder to record into")
    p.add_argument("--commits", type=int, default=5)
    p.add_argument("--rev", default="HEAD")
    p.add_argument("--runs", type=int, default=1, help="runs per commit (default 1)")
    p.add_argument("--suite", default="suites/ci_smoke.yaml", help="suite path inside each commit")
    p.add_argument("--keep-runs", type=Path, help="keep the run folders here (default: a temporary folder)")
    p.add_argument("--html", type=Path, help="dashboard folder (default <root>/html)")
    args = p.parse_args()
    commits = git("rev-list", f"--max-count={args.commits}", args.rev).split()[::-1]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="attnbench-history-") as tmp:
        runs_dir = args.keep_runs or Path(tmp) / "runs"
        for commit in commits:
            wt = Path(tmp) / f"wt-{commit[:12]}"
            git("worktree", "add", "--detach", str(wt), commit)
            try:
                env = {**os.environ, "PYTHONPATH": str(wt)}
                for i in range(args.runs):
                    out = runs_dir / f"{commit[:12]}-{i}"
                    t = time.perf_counter()
                    r = subprocess.run([sys.executable, "-m", "attnbench", "run", str(wt / args.suite), "--out",
                                        str(out), "--no-progress"], cwd=wt, env=env, capture_output=True, text=True)
                    if r.returncode != 0:
                        print(f"{commit[:12]}: run failed (exit {r.returncode}), skipped:\n{r.stderr[-800:]}")
                        break
                    # recorded by this checkout's attnbench (the history format is the recorder's)
                    subprocess.run([sys.executable, "-m", "attnbench", "history", "record", str(out), "--root",
                                    str(args.root), "--commit", commit, "--repo", str(ROOT)], cwd=ROOT, check=True,
                                   capture_output=True, text=True)
                    print(f"{commit[:12]} run {i + 1}: {time.perf_counter() - t:.1f} s, recorded "
                          f"({git('show', '-s', '--format=%s', commit)[:70]})", flush=True)
            finally:
                git("worktree", "remove", "--force", str(wt))
        git("worktree", "prune")
    cmd = [sys.executable, "-m", "attnbench", "publish", "--root", str(args.root)]
    if args.html:
        cmd += ["--out", str(args.html)]
    print(subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip())
    print(f"{len(commits)} commit(s) in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
