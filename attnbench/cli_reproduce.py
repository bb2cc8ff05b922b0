"""``attnbench reproduce NAME``: a paper's table, measured here (see :mod:`attnbench.reproduce`)."""

from __future__ import annotations

import argparse
from pathlib import Path

EXIT_OK = 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from .analysis.reproduce import ratio_grid, to_markdown
    from .reproduce import reproduce, target, write_tables

    target(args.name)  # an unknown name fails before anything runs
    tables = reproduce(args.name, device=args.device or "auto", results_root=args.results_root,
                       progress=not args.no_progress)
    if not tables:
        print(f"{args.name}: no cell was measured; nothing to compare (see the run folders above)")
        return EXIT_OK
    for t in tables:
        print(to_markdown(t))
        print(ratio_grid(t))
    md = write_tables(tables, _folder(args))
    print(f"tables and plots: {md.parent}")
    return EXIT_OK


def _folder(args: argparse.Namespace) -> Path:
    from .device import resolve_device

    return Path(args.results_root) / "reproduce" / f"{args.name}-{resolve_device(args.device or 'auto').type}"


def register(sub: argparse._SubParsersAction) -> None:
    from .reproduce import TARGETS

    r = sub.add_parser("reproduce", help="measure a paper's table here and print it beside the paper's: "
                                         + ", ".join(sorted(TARGETS)))
    r.add_argument("name", choices=sorted(TARGETS), metavar="NAME", help=", ".join(sorted(TARGETS)))
    r.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    r.add_argument("--results-root", type=Path, default=Path("results"),
                   help="runs go to RESULTS_ROOT/reproduce/NAME-DEVICE/ (default results)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(func=_cmd_reproduce)
