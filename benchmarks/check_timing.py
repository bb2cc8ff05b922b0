"""Does attnbench time like triton's do_bench, and does it repeat itself?

Runs ``mha.sdpa`` at three sizes twice through attnbench (two back-to-back runs of the same cells,
L2 flushed before each call, CUDA events) and once through ``triton.testing.do_bench`` (its median,
its own L2 flush) on the same module and input, then prints a table:

- attnbench median vs do_bench median: should agree within 3%;
- run 1 vs run 2: should agree within 2%.

Usage (on a machine with a CUDA GPU and triton):

    python benchmarks/check_timing.py --out results/reference/check_timing

Exit code 0 when every comparison is within its tolerance, 1 when one is not, 2 without a GPU.
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

RESOLUTIONS = [224, 448, 896]
SUITE = {"name": "check_timing", "device": "cuda", "dtype": "bfloat16", "mode": "forward", "batch": 8, "dim": 96,
         "heads": 3, "patch": 4, "resolution": RESOLUTIONS, "impls": ["mha.sdpa"],
         "timing": {"warmup_s": 0.2, "target_s": 1.0, "min_repeats": 50, "max_repeats": 1000, "l2_flush": True}}


def do_bench_median_ms(resolution: int) -> float:
    import triton.testing

    g = resolution // SUITE["patch"]
    torch.manual_seed(0)
    module = attnbench.create("mha.sdpa", dim=SUITE["dim"], heads=SUITE["heads"]).cuda().to(torch.bfloat16).eval()
    x = torch.randn(SUITE["batch"], g, g, SUITE["dim"], device="cuda", dtype=torch.bfloat16)

    def call():
        with torch.inference_mode():
            module(x)

    median = triton.testing.do_bench(call, warmup=200, rep=1000, quantiles=[0.5])
    return float(median[0] if isinstance(median, (list, tuple)) else median)  # a list in some triton versions


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results/check_timing"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("check_timing: needs a CUDA GPU (torch sees none)", file=sys.stderr)
        return 2
    medians = []
    for i in (1, 2):
        res = attnbench.run_suite(parse_suite(SUITE), out=args.out / f"run{i}", progress=False)
        medians.append({r["resolution"]: r["latency_ms_median"] for r in res.rows})
    lines = ["| resolution | attnbench run 1 (ms) | run 2 (ms) | run 2 / run 1 | do_bench (ms) | run 1 / do_bench |",
             "|---|---|---|---|---|---|"]
    ok, table = True, []
    for r in RESOLUTIONS:
        a, b, t = medians[0][r], medians[1][r], do_bench_median_ms(r)
        rep, vs = b / a - 1, a / t - 1
        ok &= abs(rep) <= 0.02 and abs(vs) <= 0.03
        table.append({"resolution": r, "run1_ms": a, "run2_ms": b, "do_bench_ms": t})
        lines.append(f"| {r} | {a:.4f} | {b:.4f} | {rep:+.2%} | {t:.4f} | {vs:+.2%} |")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {SUITE['batch']}, bfloat16\n")
    print("\n".join(lines))
    (args.out / "comparison.json").write_text(json.dumps(table, indent=2))
    (args.out / "comparison.md").write_text("\n".join(lines) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
