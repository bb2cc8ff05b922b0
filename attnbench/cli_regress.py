"""Regression commands: ``compare``, ``check``, ``baseline update|list`` and ``export``.

Exit codes: ``compare``, ``baseline`` and ``export`` 0 on success; ``check`` 0 when no regression
exceeds the noise, 1 when one does (each offending cell is printed with the metric, base, new,
ratio, p-value and the band it exceeded; every judged cell is printed with why it passed or failed),
2 on bad input (missing baseline, not a run folder, a malformed threshold). The defaults are meant
to hold on a shared machine: latency over the run's speed factor against each cell's noise band,
memory against the measuring method's resolution, re-measurement of failed cells when ``check``
runs a suite (:mod:`attnbench.analysis.noise`). Thresholds are written ``10%`` or as a fraction
``0.1`` (both mean ten per cent); a bare number above 1 (``10``) is refused as ambiguous.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_OK, EXIT_REGRESSION = 0, 1
DEFAULT_RETRIES = 3  # check SUITE: re-measure a cell that failed on latency/memory/status up to this often
FRACTION_TEXT = "written 10% or 0.1 (same meaning); a bare number above 1 (10) is refused as ambiguous"
FRACTION_HELP = FRACTION_TEXT.replace("%", "%%")


def _thresholds(args: argparse.Namespace, *names: str) -> None:
    """Parse the threshold options in place (``10%`` or ``0.1``); a malformed one is bad input (exit 2)."""
    from .analysis.compare import CompareError
    from .analysis.gate import parse_fraction

    for name in names:
        setattr(args, name, parse_fraction(getattr(args, name), "--" + name.replace("_", "-")))
    try:
        args.alpha = float(args.alpha)
    except ValueError:
        raise CompareError(f"--alpha {args.alpha!r} is not a number") from None
    if not 0 < args.alpha < 1:
        raise CompareError(f"--alpha {args.alpha!r} must be between 0 and 1 (e.g. 0.01)")
    if args.memory_floor is not None and not args.memory_floor >= 0:
        raise CompareError(f"--memory-floor {args.memory_floor!r} must be >= 0 (MiB)")


def _target_run(target: Path | None, args: argparse.Namespace, what: str) -> Path:
    """A run folder as given, or the run folder of a suite file run now (its path printed)."""
    from .analysis.compare import CompareError
    from .store import ROWS_FILE

    if target is None:
        raise CompareError(f"{what}: give a RUN_DIR or a SUITE file")
    if target.is_dir():
        if not (target / ROWS_FILE).is_file():
            raise CompareError(f"{target} is not a run folder (no {ROWS_FILE})")
        return target
    if target.is_file() and target.suffix in (".yaml", ".yml"):
        from .runner import run_suite

        result = run_suite(target, out=args.out, device=args.device, progress=not args.no_progress,
                           results_root=args.results_root)
        print(f"run folder: {result.run_dir} ({result.measured} cells measured)", flush=True)
        return result.run_dir
    raise CompareError(f"{target} is neither a run folder nor a suite file (.yaml)")


def _cmd_compare(args: argparse.Namespace) -> int:
    from .analysis import compare, gate

    _thresholds(args, "min_effect", "memory_growth", "max_slowdown")
    cmp = compare.compare_runs(args.base, args.new, alpha=args.alpha, min_effect=args.min_effect,
                               memory_growth=args.memory_growth, max_slowdown=args.max_slowdown,
                               memory_floor_bytes=args.memory_floor * 2**20 if args.memory_floor is not None else None,
                               normalize=args.normalize)
    print(gate.comparison_text(cmp, verbose=args.verbose))
    return EXIT_OK


def _cmd_check(args: argparse.Namespace) -> int:
    from .analysis import baseline, compare, gate

    _thresholds(args, "min_effect", "max_memory_growth", "max_slowdown")
    if args.target is None and args.baseline == "auto":
        raise compare.CompareError("check: with --baseline auto give a RUN_DIR or a SUITE file")
    if args.baseline != "auto":  # bad input is found before a suite runs, not after
        given = Path(args.baseline)
        if not given.exists():
            raise baseline.BaselineError(f"baseline {given} does not exist")
        if not (given / "rows.jsonl").is_file() and not any(given.glob("*/rows.jsonl")) \
                and not any(given.glob("*/*/rows.jsonl")):
            raise baseline.BaselineError(f"baseline {given} is not a run folder and holds no baseline")
    is_suite = args.target is not None and args.target.is_file()
    if args.retries is None:  # a suite run here: a noisy failure must repeat in re-measurements to count
        args.retries = DEFAULT_RETRIES if is_suite else 0
    if args.retries < 0:
        raise compare.CompareError(f"--retries {args.retries} must be >= 0")
    run_dir = _target_run(args.target, args, "check")
    base = baseline.resolve_baseline(args.baseline, run_dir, args.root)

    def judge(new_dir: Path, speed: float | None = None):
        cmp = compare.compare_runs(base, new_dir, alpha=args.alpha, min_effect=args.min_effect,
                                   memory_growth=args.max_memory_growth, memory_floor_bytes=(
                                       args.memory_floor * 2**20 if args.memory_floor is not None else None),
                                   normalize=args.normalize, max_slowdown=args.max_slowdown,
                                   speed_factor=speed)
        return cmp, gate.check(cmp, max_slowdown=args.max_slowdown, max_memory_growth=args.max_memory_growth,
                                  fail_on_flops=not args.allow_flops_change, fail_on_missing=args.fail_on_missing)

    cmp, failures = judge(run_dir)
    print(gate.comparison_text(cmp, verbose=args.verbose))
    print()
    print(gate.thresholds_text(cmp, args.max_slowdown, args.max_memory_growth))
    print(gate.verdicts_text(cmp, args.max_slowdown, args.max_memory_growth))
    if failures and args.retries and not is_suite:
        print("\nnote: --retries re-measures only when a SUITE is given; judging the run folder as it is")
    unjudged = gate.not_judged(cmp)
    for attempt in range(1, args.retries + 1 if is_suite else 1):
        noisy = [f for f in failures if f.metric.metric in gate.RETRIABLE]
        if not noisy and not unjudged:
            break
        only = ",".join(sorted({str(f.cell.new.get("impl") or f.cell.base.get("impl")) for f in noisy + unjudged}))
        print(f"\n{len(noisy)} latency/memory/status failure(s), {len(unjudged)} cell(s) not judged: re-measuring "
              f"the cells of {only} (retry {attempt} of {args.retries}; judged over the first run's speed factor)",
              flush=True)
        from .runner import run_suite

        retry_dir = run_dir.with_name(f"{run_dir.name}-retry{attempt}")
        while retry_dir.exists():
            retry_dir = retry_dir.with_name(retry_dir.name + "x")
        result = run_suite(args.target, out=retry_dir, device=args.device, only=only,
                           progress=not args.no_progress, results_root=args.results_root)
        print(f"run folder: {result.run_dir} ({result.measured} cells measured)", flush=True)
        again_cmp, again = judge(result.run_dir, cmp.speed_factor if cmp.normalized else None)
        still = {f.cell.key: f for f in gate.not_judged(again_cmp)}
        failures, cleared = gate.confirm(failures, again, unjudged=set(still))
        for f in cleared:
            print(f"not confirmed (passed on retry {attempt}): {f.cell.label}: {f.why}")
        left = []
        for u in unjudged:
            cell = next((c for c in again_cmp.cells if c.key == u.cell.key), None)
            m = cell.metric("latency_ms") if cell is not None else None
            if m is None or m.p_value is None or u.cell.key in still:
                left.append(still.get(u.cell.key, u))
                continue
            fails, why = gate.latency_failure(again_cmp, m, args.max_slowdown)
            print(f"judged on retry {attempt} ({'FAIL' if fails else 'pass'}): {cell.label}: {why}")
            if fails:
                failures.append(gate.Failure(cell, m, why))
        unjudged = left
    for u in unjudged:
        print(f"\nwarning: not judged, the machine was oversubscribed: {u.cell.label}: {u.why}")
    rules = (f"latency beyond each cell's noise band (floor +{100 * args.max_slowdown:g}%) at p < {args.alpha:g}"
             f"{' over the speed factor' if cmp.normalized else ''}, peak memory beyond the method's resolution "
             f"and +{100 * args.max_memory_growth:g}%, FLOPs and parameters "
             f"{'reported' if args.allow_flops_change else 'exact'}, cells going from ok to failed"
             f"{', missing cells' if args.fail_on_missing else ''}"
             f"{f', latency/memory/status failures confirmed by up to {args.retries} re-run(s)' if args.retries and is_suite else ''}")
    if failures:
        print()
        print(gate.failures_text(failures))
        print(f"\ncheck FAILED: {len(failures)} regression(s) beyond the thresholds ({rules}); baseline {base}")
        return EXIT_REGRESSION
    if unjudged and args.require_judged:
        print(f"\ncheck FAILED: {len(unjudged)} cell(s) could not be judged on latency (--require-judged): the "
              f"machine gave their thread(s) no core of their own; baseline {base}")
        return EXIT_REGRESSION
    note = (f"; {len(unjudged)} cell(s) NOT JUDGED on latency (measured without a free CPU core: run the check "
            "on a quieter machine)" if unjudged else "")
    print(f"\ncheck passed: no significant regression beyond the thresholds ({rules}); baseline {base}{note}")
    return EXIT_OK


def _cmd_baseline_update(args: argparse.Namespace) -> int:
    from .analysis import baseline

    from .analysis.compare import CompareError

    if args.repeat < 1:
        raise CompareError(f"--repeat {args.repeat} must be >= 1")
    suites = [t for t in args.target if t.is_file()]
    if suites and (len(args.target) > 1):
        raise CompareError("baseline update: give one SUITE file, or one or more RUN_DIRs")
    if suites:
        runs = []
        for i in range(args.repeat):
            out = args.out if i == 0 or args.out is None else args.out.with_name(f"{args.out.name}-{i + 1}")
            runs.append(_target_run(args.target[0], argparse.Namespace(**{**vars(args), "out": out}),
                                    "baseline update"))
    else:
        runs = [_target_run(t, args, "baseline update") for t in args.target]
    dest = baseline.write_baseline(runs[0], root=args.root, full=args.full, dest=args.dest, more_runs=runs[1:])
    env = json.loads((dest / "env.json").read_text())
    spread = f"; run-to-run spread recorded from {len(runs)} runs" if len(runs) > 1 else ""
    print(f"baseline written: {dest} (device key {baseline.device_key(env)}, "
          f"{'full copy' if args.full else 'compact export'} of {runs[0]}{spread})")
    return EXIT_OK


def _cmd_baseline_list(args: argparse.Namespace) -> int:
    from .analysis import baseline

    items = baseline.list_baselines(args.root)
    if not items:
        print(f"no baselines under {args.root}")
        return EXIT_OK
    for b in items:
        print(f"{b['device_key']:<32} {b['suite']:<24} {b['cells']:>5} cells  {b['written_utc'] or '-':<26} {b['path']}")
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    from .analysis import baseline

    entries = baseline.github_benchmark_entries(args.run, memory=args.memory, prefix=args.prefix)
    text = json.dumps(entries, indent=2, ensure_ascii=False) + "\n"
    if args.output is None or str(args.output) == "-":
        sys.stdout.write(text)
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
        print(f"{len(entries)} entries written to {args.output} (github-action-benchmark, tool: "
              f"customSmallerIsBetter)", file=sys.stderr)
    return EXIT_OK


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Options used when the target is a suite file that is run first."""
    p.add_argument("--out", type=Path, help="run folder when a SUITE is given (default results/<suite>/<UTC time>)")
    p.add_argument("--device", help="when a SUITE is given: override its device (auto, cpu, cuda, cuda:N)")
    p.add_argument("--results-root", type=Path, default=Path("results"), help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true", help="no progress bar while running a SUITE")


def _add_stat_options(p: argparse.ArgumentParser, memory_flag: str, memory_default: float) -> None:
    p.add_argument("--alpha", default="0.01",
                   help="significance level of the two-sided Mann-Whitney U test on latency samples (default 0.01)")
    p.add_argument("--min-effect", default="5%",
                   help=f"smallest latency ratio change called faster/slower, {FRACTION_HELP} (default 5%%)")
    p.add_argument(memory_flag, default=f"{100 * memory_default:g}%",
                   help=f"peak memory ratio change called bigger (check: that fails), {FRACTION_HELP} "
                        f"(default {100 * memory_default:g}%%)")
    p.add_argument("--memory-floor", type=float, metavar="MIB",
                   help="memory differences up to this many MiB are noise (default: the method's resolution, "
                        "max(6 MiB, 25%%) for CPU resident-set peaks, 0.0625 MiB for CUDA allocator peaks)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                   help="judge latency over the median NEW/BASE ratio of all cells (the machine's speed factor, "
                        "needs 4+ cells): a cell is slower only if slower than the machine as a whole (default on; "
                        "--no-normalize judges raw ratios)")
    p.add_argument("--max-slowdown", default="15%",
                   help="floor of each cell's latency noise band: the smallest slowdown (over the speed factor) "
                        "that counts; a noisier cell needs more (its medians' 95%% bounds, and twice the run-to-run "
                        f"spread a baseline written from 2+ runs records), {FRACTION_HELP} (default 15%%)")
    p.add_argument("-v", "--verbose", action="store_true", help="show every metric of every cell")


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("compare", help="compare two runs cell by cell: ratio NEW/BASE and a verdict per metric",
                       description="Match the cells of two run folders and give, per metric, the ratio NEW/BASE "
                                   "and a verdict: latency by a Mann-Whitney U test on the raw samples plus a "
                                   "minimum effect; peak memory by ratio and a floor; FLOPs and parameters must "
                                   "match exactly. Cells present on one side only are listed.")
    c.add_argument("base", type=Path, help="run or baseline folder")
    c.add_argument("new", type=Path, help="run folder")
    _add_stat_options(c, "--memory-growth", 0.05)
    c.set_defaults(func=_cmd_compare)

    k = sub.add_parser("check", help="exit 1 on a significant regression against a baseline",
                       description="Compare a run (or run a SUITE first) with a baseline and exit 1 only on a "
                                   "regression beyond the noise: latency slower, over the machine's speed factor, than the "
                                   "cell's noise band (floor --max-slowdown, widened by the medians' 95%% bounds "
                                   "and a baseline's recorded run-to-run spread) with p < --alpha; peak memory "
                                   "grown beyond the method's resolution and --max-memory-growth; "
                                   "any change of FLOPs or parameters, a cell that was ok and failed. "
                                   f"Thresholds are {FRACTION_TEXT}. Exit codes: 0 pass, 1 regression, 2 bad input.")
    k.add_argument("target", type=Path, nargs="?", metavar="RUN_DIR|SUITE",
                   help="run folder to check, or a suite file to run and check")
    k.add_argument("--baseline", required=True, metavar="PATH|auto",
                   help="baseline or run folder, or 'auto': <root>/<device key>/<suite> for the run's device")
    k.add_argument("--root", type=Path, default=Path("results") / "baselines",
                   help="where 'auto' looks (default results/baselines)")
    _add_stat_options(k, "--max-memory-growth", 0.05)
    k.add_argument("--allow-flops-change", action="store_true",
                   help="report FLOP and parameter changes without failing")
    k.add_argument("--retries", type=int, default=None, metavar="N",
                   help="with a SUITE: when a cell fails on latency, memory or status, measure that implementation's "
                        "cells again, up to N times; such a failure counts only if the same cell and metric fail in "
                        f"every re-measurement (default {DEFAULT_RETRIES} with a SUITE, 0 with a RUN_DIR; FLOP and "
                        "parameter changes need no confirmation)")
    k.add_argument("--require-judged", action="store_true",
                   help="fail when a cell's latency could not be judged (measured, in every re-measurement, while "
                        "other processes left its thread(s) no CPU core of their own; default: a warning)")
    k.add_argument("--fail-on-missing", action="store_true",
                   help="fail when a cell is in one run only (default: listed, not a failure)")
    _add_run_options(k)
    k.set_defaults(func=_cmd_check)

    b = sub.add_parser("baseline", help="write or list regression baselines (results/baselines/<device>/<suite>)")
    bsub = b.add_subparsers(dest="baseline_command", required=True)
    u = bsub.add_parser("update", help="write the baseline of a run (or of a SUITE run now)",
                        description="Write the baseline of a run folder, or run a SUITE and write its baseline, "
                                    "to <root>/<device key>/<suite name>/ (replacing an earlier one). The device "
                                    "key is the GPU's name, or cpu-<model>-<threads>t. By default a compact "
                                    "export (rows with raw samples, FLOPs, memory; env.json; suite.yaml).")
    u.add_argument("target", type=Path, nargs="+", metavar="RUN_DIR|SUITE",
                   help="one or more run folders of the same suite (the first is written; with two or more the "
                        "baseline records each cell's run-to-run spread, which widens its noise band), or a SUITE")
    u.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="with a SUITE: run it N times and record the run-to-run spread (default 1)")
    u.add_argument("--root", type=Path, default=Path("results") / "baselines", help="default results/baselines")
    u.add_argument("--dest", type=Path, help="write exactly here instead of <root>/<device key>/<suite>")
    u.add_argument("--full", action="store_true", help="copy every file of the run instead of the compact export")
    _add_run_options(u)
    u.set_defaults(func=_cmd_baseline_update)
    ls = bsub.add_parser("list", help="list the baselines under --root")
    ls.add_argument("--root", type=Path, default=Path("results") / "baselines")
    ls.set_defaults(func=_cmd_baseline_list)

    e = sub.add_parser("export", help="a run as github-action-benchmark JSON (customSmallerIsBetter)",
                       description="Write one entry {name, unit, value, range, extra} per ok cell: the median "
                                   "latency in ms (range: half the IQR), and with --memory the peak memory in MiB. "
                                   "Use with github-action-benchmark's tool: customSmallerIsBetter.")
    e.add_argument("run", type=Path, help="run or baseline folder")
    e.add_argument("-o", "--output", type=Path, help="output file (default: standard output)")
    e.add_argument("--memory", action="store_true", help="also export peak memory (MiB)")
    e.add_argument("--prefix", default="", help="prefix for every entry's name")
    e.set_defaults(func=_cmd_export)
