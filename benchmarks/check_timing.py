"""Does attnbench time like triton's do_bench, and does it repeat itself?

Runs ``mha.sdpa`` at three sizes twice through attnbench (two back-to-back runs of the same cells,
L2 flushed before each call, CUDA events) and once through ``triton.testing.do_bench`` (its median,
its own L2 flush) on the same module and input, then prints a table:

- attnbench median vs do_bench median: should agree within 3%;
- run 1 vs run 2: should agree within 2%.

Usage (on a machine with a CUDA GPU and triton):

    python benchmarks/check_timing.py --out results/reference/check_timing

``--device cpu`` makes the same comparison on the CPU against ``torch.utils.benchmark``'s
``blocked_autorange`` (median of its blocks) at three smaller sizes, float32, batch 1, with the same
thread count; a shared or busy CPU may miss the tolerances, which is itself worth knowing.

Exit code 0 when every comparison is within its tolerance, 1 when one is not, 2 when the device is
missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import attnbench  # noqa: E402
from attnbench.suite import parse_suite  # noqa: E402

SUITES = {
    "cuda": {"name": "check_timing", "device": "cuda", "dtype": "bfloat16", "mode": "forward", "batch": 8,
             "dim": 96, "heads": 3, "patch": 4, "resolution": [224, 448, 896], "impls": ["mha.sdpa"],
             "timing": {"warmup_s": 0.2, "target_s": 1.0, "min_repeats": 50, "max_repeats": 1000, "l2_flush": True}},
    "cpu": {"name": "check_timing_cpu", "device": "cpu", "dtype": "float32", "mode": "forward", "batch": 1,
            "dim": 96, "heads": 3, "patch": 4, "resolution": [112, 160, 224], "impls": ["mha.sdpa"],
            "measure_peaks": False,
            "timing": {"warmup_s": 0.3, "target_s": 2.0, "min_repeats": 20, "max_repeats": 2000}},
}


def _module_and_call(suite: dict, resolution: int):
    dtype = getattr(torch, suite["dtype"])
    g = resolution // suite["patch"]
    torch.manual_seed(0)
    module = attnbench.create("mha.sdpa", dim=suite["dim"], heads=suite["heads"]).to(suite["device"], dtype).eval()
    x = torch.randn(suite["batch"], g, g, suite["dim"], device=suite["device"], dtype=dtype)

    def call():
        with torch.inference_mode():
            module(x)

    return call


def reference_median_ms(suite: dict, resolution: int) -> float:
    """do_bench's median (CUDA) or torch.utils.benchmark's blocked_autorange median (CPU), in ms."""
    call = _module_and_call(suite, resolution)
    if suite["device"] == "cuda":
        import triton.testing

        median = triton.testing.do_bench(call, warmup=200, rep=1000, quantiles=[0.5])
        return float(median[0] if isinstance(median, (list, tuple)) else median)  # a list in some triton versions
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="call()", globals={"call": call}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=2.0).median * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results/check_timing"))
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("check_timing: needs a CUDA GPU (torch sees none); --device cpu compares on the CPU", file=sys.stderr)
        return 2
    suite = SUITES[args.device]
    ref_name = "do_bench" if args.device == "cuda" else "torch.utils.benchmark"
    medians, reference = [], {}
    for i in (1, 2):  # the reference is timed between the two runs, so slow drift of the machine shows in both
        res = attnbench.run_suite(parse_suite(suite), out=args.out / f"run{i}", progress=False)
        medians.append({r["resolution"]: r["latency_ms_median"] for r in res.rows})
        if i == 1:
            reference = {r: reference_median_ms(suite, r) for r in suite["resolution"]}
    lines = [f"| resolution | attnbench run 1 (ms) | run 2 (ms) | run 2 / run 1 | {ref_name} (ms) | run 1 / {ref_name} |",
             "|---|---|---|---|---|---|"]
    ok, table = True, []
    for r in suite["resolution"]:
        a, b, t = medians[0][r], medians[1][r], reference[r]
        rep, vs = b / a - 1, a / t - 1
        ok &= abs(rep) <= 0.02 and abs(vs) <= 0.03
        table.append({"resolution": r, "run1_ms": a, "run2_ms": b, "reference": ref_name, "reference_ms": t})
        lines.append(f"| {r} | {a:.4f} | {b:.4f} | {rep:+.2%} | {t:.4f} | {vs:+.2%} |")
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{where}, torch {torch.__version__}, batch {suite['batch']}, {suite['dtype']}\n")
    print("\n".join(lines))
    verdict = ("within" if ok else "OUTSIDE") + " the tolerances (run to run 2%, against the reference 3%)"
    print(f"\n{verdict}")
    (args.out / "comparison.json").write_text(json.dumps({"where": where, "torch": torch.__version__, "ok": ok,
                                                          "cells": table}, indent=2))
    (args.out / "comparison.md").write_text(f"{where}, torch {torch.__version__}\n\n" + "\n".join(lines)
                                            + f"\n\n{verdict}\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
