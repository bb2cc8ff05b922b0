"""Exact local attention vs Swin's shifted windows on this CPU: interleaved forward timing.

    python3 benchmarks/local_speed.py [--grid 56] [--batch 1 8] [--reps 30] [--only swin.window local.blocked]
                                      [--out DIR]   # DIR/local_speed.json (every sample), table.txt, env.json

Forward, float32, no grad, dim 96, 3 heads (Swin-T stage 1 at 224 px: 56 x 56 tokens). Every
implementation is first called once (the flex forms compile there; that call's seconds are printed
as the compile time), then warmed up, then the implementations are called in turn, one call each per
round, ``--reps`` rounds (a fresh random order per round), so drift in the machine's speed falls on
all of them alike; the table gives each one's median and its ratio to ``swin.shift_cyclic``'s median.
The compiled flex forms are checked to have compiled (their ``flex_compile_s`` is filled): nothing
else is timed in their place.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

import attnbench

FORMS = [  # (label, name, params)
    ("swin.window", "swin.window", {}),
    ("swin.shift_cyclic", "swin.shift_cyclic", {}),
    ("local.im2col k=7", "local.im2col", {"kernel": 7}),
    ("local.blocked k=7", "local.blocked", {"kernel": 7}),
    ("local.blocked k=7 tile 4", "local.blocked", {"kernel": 7, "tile": 4}),
    ("local.neighborhood k=7", "local.neighborhood", {"kernel": 7}),
    ("swin.window_flex", "swin.window_flex", {}),
    ("swin.shift_flex", "swin.shift_flex", {}),
    ("local.flex k=7", "local.flex", {"kernel": 7}),
    ("local.flex k=7 tile 8", "local.flex", {"kernel": 7, "tile": 8}),
    ("local.neighborhood_flex k=7", "local.neighborhood_flex", {"kernel": 7}),
]
BASE = "swin.shift_cyclic"


def measure(batch: int, grid: int, reps: int, warmup: int, only: list[str] | None, seed: int = 0) -> list[dict]:
    torch.manual_seed(seed)
    x = torch.randn(batch, grid, grid, 96)
    forms = [f for f in FORMS if only is None or f[1] in only or f[1] == BASE]
    modules, rows = {}, {}
    with torch.no_grad():
        for label, name, params in forms:
            m = attnbench.create(name, dim=96, heads=3, **params).eval()
            t0 = time.perf_counter()
            m(x)
            first = time.perf_counter() - t0
            compile_s = sum(getattr(m, "flex_compile_s", {}).values()) if hasattr(m, "flex_compile_s") else None
            if hasattr(m, "flex_compile_s") and not m.flex_compile_s:
                raise RuntimeError(f"{label}: the compiled flex path did not run")
            modules[label] = m
            rows[label] = {"label": label, "name": name, "first_call_s": first, "compile_s": compile_s, "ms": [],
                           "gflops": m.flops_analytic(batch, grid, grid) / 1e9,
                           "useful_gflops": getattr(m, "flops_useful", m.flops_analytic)(batch, grid, grid) / 1e9}
        for _ in range(warmup):
            for m in modules.values():
                m(x)
        rng = random.Random(seed)
        order = list(modules)
        for _ in range(reps):
            rng.shuffle(order)
            for label in order:
                t0 = time.perf_counter()
                modules[label](x)
                rows[label]["ms"].append(1e3 * (time.perf_counter() - t0))
    base = statistics.median(rows[next(lbl for lbl, n, _ in forms if n == BASE)]["ms"])
    out = []
    for label, *_ in forms:
        r = rows[label]
        med = statistics.median(r["ms"])
        q = statistics.quantiles(r["ms"], n=4)
        out.append({**r, "median_ms": med, "iqr_ms": q[2] - q[0], "ratio": med / base})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=int, default=56)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--only", nargs="+", default=None, help="implementation names (swin.shift_cyclic is always in)")
    ap.add_argument("--out", type=Path, default=None, help="a new folder for the samples, the table and env.json")
    args = ap.parse_args(argv)
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, grid {args.grid}x{args.grid}, dim 96, "
             f"heads 3, forward float32 no grad, {args.reps} interleaved rounds after {args.warmup} warm-up"]
    results = {}
    for batch in args.batch:
        rows = results[batch] = measure(batch, args.grid, args.reps, args.warmup, args.only)
        lines += [f"\nbatch {batch}",
                  f"{'implementation':30s} {'median ms':>10s} {'IQR ms':>8s} {'/ cyclic':>9s} {'GFLOPs':>8s} "
                  f"{'useful':>8s} {'first call s':>12s} {'compile s':>9s}"]
        for r in rows:
            comp = f"{r['compile_s']:9.1f}" if r["compile_s"] is not None else f"{'-':>9s}"
            lines.append(f"{r['label']:30s} {r['median_ms']:10.2f} {r['iqr_ms']:8.2f} {r['ratio']:9.2f} "
                         f"{r['gflops']:8.2f} {r['useful_gflops']:8.2f} {r['first_call_s']:12.2f} {comp}")
    print("\n".join(lines))
    if args.out is not None:
        from attnbench.measure.env import collect_env

        args.out.mkdir(parents=True, exist_ok=False)
        (args.out / "table.txt").write_text("\n".join(lines) + "\n")
        (args.out / "local_speed.json").write_text(json.dumps({"argv": vars(args) | {"out": str(args.out)},
                                                               "batches": results}, indent=1))
        (args.out / "env.json").write_text(json.dumps(collect_env(torch.device("cpu")), indent=1, default=str))
        print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
