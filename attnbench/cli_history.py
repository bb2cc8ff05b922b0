"""History commands: ``history record|show|rebuild`` and ``publish``.

Exit codes: 0 on success, 2 on bad input (not a run folder, no commit, no history, a damaged index,
no cell matching the pattern).
"""

from __future__ import annotations

import argparse
from pathlib import Path

EXIT_OK = 0
ROOT_HELP = "history folder (default results/history)"


def _cmd_record(args: argparse.Namespace) -> int:
    from .analysis import history

    for run in args.run:
        path = history.record(run, root=args.root, commit=args.commit, commit_time=args.commit_time,
                              subject=args.subject, repo=args.repo)
        print(f"recorded {run} -> {path}")
    return EXIT_OK


def _cmd_show(args: argparse.Namespace) -> int:
    from .analysis import history

    found = history.series(args.root, cell=args.cell, device=args.device, suite=args.suite)
    for s in found:
        print(history.series_text(s))
        print()
    if args.plot is not None:
        from .analysis.history_plot import plot_series

        if len(found) == 1:
            print(f"plot: {plot_series(found[0], args.plot)}")
        else:
            args.plot.mkdir(parents=True, exist_ok=True)
            for i, s in enumerate(found):
                plot_series(s, args.plot / f"{i:03d}-{history.schema_safe(s.label)}.png")
            print(f"plots: {len(found)} PNG(s) in {args.plot}")
    return EXIT_OK


def _cmd_rebuild(args: argparse.Namespace) -> int:
    from .analysis import history

    index = history.rebuild_index(args.root)
    print(f"index rebuilt: {len(index['runs'])} run(s) in {Path(args.root) / history.INDEX}")
    return EXIT_OK


def _cmd_publish(args: argparse.Namespace) -> int:
    from .analysis.history_plot import publish

    path = publish(args.root, args.out)
    print(f"dashboard written: {path}")
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    h = sub.add_parser("history", help="record runs into a history across commits; show a cell's series",
                       description="A benchmark history keyed by git commit, device and environment: one JSON "
                                   "file per recorded run plus an index (results/history). `show` prints a cell's "
                                   "median latency, peak memory and FLOPs per commit and marks change points.")
    hsub = h.add_subparsers(dest="history_command", required=True)
    r = hsub.add_parser("record", help="record run folders into the history")
    r.add_argument("run", type=Path, nargs="+", metavar="RUN_DIR")
    r.add_argument("--root", type=Path, default=Path("results") / "history", help=ROOT_HELP)
    r.add_argument("--commit", help="the commit the run measured (default: the run's env.json git commit)")
    r.add_argument("--commit-time", type=float, help="its time, Unix seconds (default: from git, else now)")
    r.add_argument("--subject", help="its subject line (default: from git)")
    r.add_argument("--repo", type=Path, help="git repository to read commit times from (default: here)")
    r.set_defaults(func=_cmd_record)
    s = hsub.add_parser("show", help="a cell's series over commits: a table, and with --plot a figure")
    s.add_argument("cell", nargs="?", help="shell pattern on the cell's description, e.g. 'mha.sdpa*128px*' "
                                          "(default: every cell)")
    s.add_argument("--root", type=Path, default=Path("results") / "history", help=ROOT_HELP)
    s.add_argument("--device", help="only this device key (e.g. cpu-amd-epyc-1t)")
    s.add_argument("--suite", help="only this suite")
    s.add_argument("--plot", type=Path, metavar="PNG|DIR",
                   help="write the figure here (a folder of figures when several cells match)")
    s.set_defaults(func=_cmd_show)
    b = hsub.add_parser("rebuild", help="rewrite the index from the run files")
    b.add_argument("--root", type=Path, default=Path("results") / "history", help=ROOT_HELP)
    b.set_defaults(func=_cmd_rebuild)

    p = sub.add_parser("publish", help="write a static HTML dashboard of every cell's history",
                       description="Write one self-contained index.html (figures embedded): every recorded cell's "
                                   "median latency, peak memory and FLOPs over commits, change points marked.")
    p.add_argument("--root", type=Path, default=Path("results") / "history", help=ROOT_HELP)
    p.add_argument("--out", type=Path, help="output folder (default <root>/html)")
    p.set_defaults(func=_cmd_publish)
