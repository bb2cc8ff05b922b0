"""Command line: argument parsing, messages and exit codes only.

Exit codes: 0 success (a sweep with failed cells still succeeds: they are rows), 2 bad input
(suite, implementation, device, dtype, run folder), 130 interrupted (rows already written are kept).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

from .errors import AttnbenchError

EXIT_OK, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 2, 130
DESCRIPTION = ("Benchmark the attention of vision transformers: FLOPs, peak memory, latency and throughput of "
               "each design as the image grows, on this GPU or CPU; plots, reports and regression checks. "
               "Start with `attnbench run suites/resolution_sweep.yaml`.")


def _cmd_list(args: argparse.Namespace) -> int:
    from . import registry

    for path in args.plugin or []:
        registry.load_plugin_file(path)
    names = registry.list_impls(args.pattern)
    if not names:
        raise AttnbenchError(f"no implementation matches {args.pattern!r}")
    all_specs = registry.specs()
    rows = []
    for n in names:
        s = all_specs[n]
        params = ", ".join(f"{k}={s.default_text.get(k, repr(v))}" for k, v in s.params.items()) or "-"
        rows.append((n, s.family, params, s.description))
    w0, w1, w2 = (max(len(r[i]) for r in rows + [("name", "family", "parameters")]) for i in range(3))
    print(f"{'name':<{w0}}  {'family':<{w1}}  {'parameters':<{w2}}  description")
    for r in rows:
        print(f"{r[0]:<{w0}}  {r[1]:<{w1}}  {r[2]:<{w2}}  {r[3]}")
    return EXIT_OK


def _progress_lines(total: int):
    """Where the progress bar is off (output to a log or a pipe): one line per finished cell."""
    t0, done = time.perf_counter(), [0]

    def on_row(row: dict) -> None:
        done[0] += 1
        at = row.get("shape") or f"{row.get('resolution')}px"
        latency = row.get("latency_ms_median")
        what = f"{latency:.4g} ms" if row.get("status") == "ok" and latency is not None else row.get("status")
        print(f"attnbench: [{done[0]}/{total}] {row.get('label')} {at} {row.get('dtype')} {row.get('mode')}: {what} "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    return on_row


def _cmd_run(args: argparse.Namespace) -> int:
    from . import store
    from .analysis.summary import summary_text
    from .device import dtype_problem
    from .runner import prepare, run_suite
    from .schema import Status

    suite, dev, cases = prepare(args.suite, args.device, args.only)  # everything validated before running
    print(f"attnbench: suite {suite.name!r}: {len(cases)} cells on {dev}", file=sys.stderr)
    for dtype in dict.fromkeys(c.dtype for c in cases):
        if dtype_problem(dtype, dev):
            print(f"attnbench: warning: {dtype} cells are skipped (status unsupported): {dtype_problem(dtype, dev)}",
                  file=sys.stderr)
    result = None
    try:
        result = run_suite(suite, out=args.out, device=args.device, resume=args.resume, only=args.only,
                           progress=not args.no_progress, results_root=args.results_root,
                           isolation="process" if args.isolate else None,
                           executor=args.executor, ray_address=args.ray_address,
                           on_row=None if args.no_progress or sys.stderr.isatty() else _progress_lines(len(cases)),
                           on_note=lambda text: print(f"attnbench: {text}", file=sys.stderr))
    except KeyboardInterrupt:
        print("\nattnbench: interrupted; finished cells are saved, `--resume` measures the rest", file=sys.stderr)
        return EXIT_INTERRUPTED
    df = store.load_results(result.run_dir)
    print(summary_text(df))
    o = result.overhead
    print(f"\nrun folder: {result.run_dir}  ({result.measured} cells measured, {result.skipped} recorded without "
          f"being tried, {result.reused} reused; {o['wall_s']:.1f} s, of which {o['harness_s']:.1f} s "
          f"({100 * o['harness_fraction']:.1f}%) harness: {o['cells_harness_s']:.1f} s building modules, counting "
          f"FLOPs, telemetry; {o['peaks_s']:.1f} s device peaks; {o['other_s']:.1f} s the rest"
          + (f"; {o['timeout_s']:.1f} s waiting on cells that timed out" if o.get("timeout_s") else "") + ")")
    throttled = df[df.get("throttled", "").fillna("").astype(str) != ""] if "throttled" in df else df.iloc[:0]
    if len(throttled):
        print(f"attnbench: warning: {len(throttled)} cell(s) ran with the GPU throttled "
              f"({', '.join(sorted(set(','.join(throttled['throttled']).split(','))))}); see the throttled column",
              file=sys.stderr)
    if "drift" in df:
        drifted = df[(df["status"] == Status.OK) & df["drift"].fillna(False).astype(bool)]
        if len(drifted):
            print(f"attnbench: warning: {len(drifted)} cell(s) were measured slowed (the device below its best "
                  "speed in this run, or other processes taking CPU cores during the timed calls): their latency "
                  "is not the device's usual; see the drift_reason column", file=sys.stderr)
    if "over_peak" in df:
        over = df[(df["status"] == Status.OK) & df["over_peak"].fillna(False).astype(bool)]
        if len(over):
            print(f"attnbench: warning: {len(over)} cell(s) achieved more TFLOP/s than the device's matmul peak, "
                  "measured again: peak_fraction above 1 (see the over_peak column)", file=sys.stderr)
    failed = df[df["status"] == Status.ERROR]
    if len(failed):
        print(f"attnbench: {len(failed)} cell(s) raised; see {result.run_dir / 'errors.log'}", file=sys.stderr)
    try:  # the rows are safe on disk; a plotting failure only warns
        from .analysis.run import figure_plan, load_run

        if not figure_plan(load_run(result.run_dir)):  # nothing to draw: matplotlib is not even imported
            print("plots: none (a figure needs two points; see the tables above)")
            return EXIT_OK
        from .analysis.plots import plot_run

        plots = plot_run(result.run_dir)
        print(f"plots: {len(plots)} PNG(s) in {result.run_dir / 'plots'} "
              f"(`attnbench report {result.run_dir}` writes the report)")
    except Exception as exc:  # noqa: BLE001
        print(f"attnbench: warning: plotting failed ({type(exc).__name__}: {exc}); the run is complete, "
              f"retry with `attnbench plot {result.run_dir}`", file=sys.stderr)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="attnbench", description=DESCRIPTION)
    p.add_argument("--version", action="version", version=f"attnbench {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="measure every cell of a suite")
    r.add_argument("suite", type=Path, help="suite YAML file")
    r.add_argument("--device", help="override the suite's device: auto, cpu, cuda, cuda:N")
    r.add_argument("--out", type=Path, help="run folder (default results/<suite>/<UTC time>)")
    r.add_argument("--resume", action="store_true", help="finish the run in --out (default: the latest run)")
    r.add_argument("--only", metavar="PATTERN", help="only implementations matching these shell patterns "
                                                     "(comma-separated, e.g. 'mha.*,sra.conv')")
    r.add_argument("--results-root", type=Path, default=Path("results"), help=argparse.SUPPRESS)
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--isolate", action="store_true", help="run each cell in a fresh worker process "
                                                          "(time-out: the suite's budget.cell_timeout_s)")
    r.add_argument("--executor", choices=("inprocess", "gpus", "ray"),
                   help="where cells run (default: the suite's executor, inprocess): gpus = one worker per GPU "
                        "of this host; ray = one Ray task per cell, one whole GPU each")
    r.add_argument("--ray-address", metavar="ADDRESS", help="executor ray: join this Ray cluster "
                                                            "(default: start a local one)")
    r.set_defaults(func=_cmd_run)
    ls = sub.add_parser("list", help="list registered implementations")
    ls.add_argument("pattern", nargs="?", help="shell pattern, e.g. 'sra.*'")
    ls.add_argument("--plugin", action="append", type=Path, help="also load this plugin file")
    ls.set_defaults(func=_cmd_list)
    for module in _command_modules():
        module.register(sub)
    return p


def _command_modules() -> list:
    """The modules that add subcommands (each has ``register(subparsers)``), listed explicitly: a module
    that fails to import is an error, never a silently missing command."""
    from . import cli_history, cli_regress, cli_report, cli_reproduce  # show/plot/report; compare/check/
    # baseline/export; history/publish; reproduce

    return [cli_report, cli_regress, cli_history, cli_reproduce]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return args.func(args)
    except AttnbenchError as exc:
        print(f"attnbench: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("\nattnbench: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def run_cli() -> None:
    """The console entry point (``attnbench``, ``python -m attnbench``): :func:`main`, then the process
    ends at once. Everything it wrote is closed (rows are fsynced as each cell ends) and its output is
    flushed first; what is skipped is Python tearing down torch's modules one by one, about 0.6 s of
    every command. :func:`main` itself returns normally, for callers in the same process."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # a closed pipe (`attnbench show ... | head`): nothing more can be written
            pass
    os._exit(code)


if __name__ == "__main__":
    run_cli()
