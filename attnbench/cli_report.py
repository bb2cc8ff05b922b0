"""Command line of the analysis of run folders: ``attnbench plot``, ``report`` and ``show``.

Imported by :mod:`attnbench.cli`, which calls :func:`register`. No torch: these run wherever a results
folder is copied. A folder that is not a run raises :class:`attnbench.errors.RunDirError` (exit code 2).
"""

from __future__ import annotations

import argparse
from pathlib import Path

EXIT_OK = 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from .analysis.plots import plot_run

    paths = plot_run(args.run_dir)
    for p in paths:
        print(p)
    print(f"{len(paths)} plot(s) in {Path(args.run_dir) / 'plots'}")
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    if args.run_b is not None:
        from .analysis.report_compare import write_compare_report

        path = write_compare_report(args.run_dir, args.run_b, args.out)
        print(f"comparison report: {path} (A: {args.run_dir}, B: {args.run_b}; one file)")
        return EXIT_OK
    from .analysis.report import write_report

    md, html = write_report(args.run_dir)
    print(f"report: {md}\n        {html} (one file, plots and rows embedded)")
    return EXIT_OK


def _cmd_show(args: argparse.Namespace) -> int:
    from .analysis.report import show_text

    print(show_text(args.run_dir, impl=args.impl, resolution=args.resolution, dtype=args.dtype, mode=args.mode))
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``plot``, ``report`` and ``show`` subcommands to the CLI's subparsers."""
    p = sub.add_parser("plot", help="write the plots of a run folder into RUN_DIR/plots/")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder (holds rows.jsonl)")
    p.set_defaults(func=_cmd_plot)
    r = sub.add_parser("report", help="write RUN_DIR/report/report.md (with the PNGs) and report.html (one file); "
                                      "with two run folders, one HTML report comparing them")
    r.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder (holds rows.jsonl); with RUN_B: "
                                                                 "the base (A)")
    r.add_argument("run_b", type=Path, metavar="RUN_B", nargs="?", default=None,
                   help="a second run folder: write one report comparing RUN_DIR (A, base) with it (B, new): "
                        "tables as B / A ratios and the regression verdicts of `attnbench compare`")
    r.add_argument("--out", type=Path, metavar="FILE", help="with RUN_B: the comparison's HTML file (default "
                                                            "RUN_B/report/compare-<RUN_DIR name>.html)")
    r.set_defaults(func=_cmd_report)
    s = sub.add_parser("show", help="print the summary tables of a run folder, with units")
    s.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder (holds rows.jsonl)")
    s.add_argument("--impl", metavar="PATTERN", help="only implementations or labels matching these shell patterns "
                                                     "(comma-separated, e.g. 'mha.*,sra.conv*')")
    s.add_argument("--resolution", metavar="R", help="only this image side in px (or this shape name, e.g. S1)")
    s.add_argument("--dtype", help="only this dtype (float32, float16, bfloat16)")
    s.add_argument("--mode", choices=["forward", "train"], help="only this mode")
    s.set_defaults(func=_cmd_show)
