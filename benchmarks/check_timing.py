"""Does attnbench time like triton's do_bench, and does it repeat itself?

Each *check* below is a small suite run twice through attnbench (two back-to-back runs of the same
cells) and, between the two runs, through a reference on the same module and input:

- ``mha``: ``mha.sdpa`` at three sizes, L2 flushed before each call, CUDA events;
- ``launch_bound``: ``mha.sdpa`` on an 8 x 8 grid, batch 1: so little work that launching the
  kernels takes longer than running them;
- ``cuda_graph``: ``mha.sdpa`` at two sizes timed as CUDA graph replays (``timing.cuda_graph``);
  the reference times replays of its own capture of the same call;
- ``windowed``: ``swin.window`` (Swin's W-MSA) at three sizes.

References (CUDA): ``triton.testing.do_bench`` (its median, its own L2 flush) for attnbench's median;
``torch.utils.benchmark``'s ``blocked_autorange`` (blocks of back-to-back calls, synchronised at the
end of each block) for the steady-state time per call of :func:`attnbench.measure.timing.time_steady`.
The table then shows, per cell:

- attnbench median vs the reference: should agree within 3% (5% for the launch-bound cell, whose
  ~10 us calls are a few CUDA-event resolutions long);
- run 1 vs run 2: should agree within 2% (5% for the launch-bound cell);
- steady state vs ``blocked_autorange``: should agree within 5%;
- ``launch_bound``: steady more than 20% above the flushed median (expected for the launch-bound
  cell on a fast GPU; informational, not a pass/fail; ``-`` on CPU).

Usage (on a machine with a CUDA GPU and triton):

    python benchmarks/check_timing.py --out results/reference/check_timing

Each invocation writes a fresh folder ``OUT/<UTC time>/`` (one sub-folder per check with its two run
folders, ``comparison.md`` and ``comparison.json``), so re-running into the same ``--out`` is fine.

``--device cpu`` makes the same comparison on the CPU against ``blocked_autorange`` (the reference of
both the median and the steady state: no flush on CPU), float32, batch 1, the same thread count,
for ``mha.sdpa`` at three smaller sizes, the launch-bound cell and ``swin.window`` at one size (about
a minute on two cores); a shared or busy CPU may miss the tolerances, which is itself worth knowing.

Exit code 0 when every comparison is within its tolerance, 1 when one is not, 2 when the device is
missing.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import attnbench  # noqa: E402
from attnbench.measure import timing  # noqa: E402
from attnbench.suite import parse_suite  # noqa: E402

GPU_TIMING = {"warmup_s": 0.2, "target_s": 1.0, "min_repeats": 50, "max_repeats": 1000, "l2_flush": True}
CPU_TIMING = {"warmup_s": 0.3, "target_s": 2.0, "min_repeats": 20, "max_repeats": 2000}
GPU_BASE = {"device": "cuda", "dtype": "bfloat16", "mode": "forward", "batch": 8, "dim": 96, "heads": 3, "patch": 4,
            "measure_peaks": False, "timing": GPU_TIMING}
CPU_BASE = {"device": "cpu", "dtype": "float32", "mode": "forward", "batch": 1, "dim": 96, "heads": 3, "patch": 4,
            "measure_peaks": False, "timing": CPU_TIMING}
TOL_RUNS, TOL_REF, TOL_STEADY = 0.02, 0.03, 0.05
TOL_TINY = 0.05  # run to run and against the reference, for the launch-bound cell
STEADY_S = 0.5  # time of attnbench's steady-state blocks per cell

# name -> suite overrides (on the device's base) and tolerances
CHECKS = {
    "cuda": {
        "mha": {"impls": ["mha.sdpa"], "resolution": [224, 448, 896]},
        "launch_bound": {"impls": ["mha.sdpa"], "resolution": [32], "batch": 1, "tol_runs": TOL_TINY,
                         "tol_ref": TOL_TINY},
        "cuda_graph": {"impls": ["mha.sdpa"], "resolution": [224, 448], "timing": {**GPU_TIMING, "cuda_graph": True}},
        "windowed": {"impls": ["swin.window"], "resolution": [224, 448, 896]},
    },
    "cpu": {
        "mha": {"impls": ["mha.sdpa"], "resolution": [112, 160, 224]},
        "launch_bound": {"impls": ["mha.sdpa"], "resolution": [32], "tol_runs": TOL_TINY, "tol_ref": TOL_TINY},
        "windowed": {"impls": ["swin.window"], "resolution": [224]},
    },
}


def check_suite(device: str, name: str) -> dict:
    """The suite (as data) of check ``name`` on ``device``."""
    spec = {k: v for k, v in CHECKS[device][name].items() if not k.startswith("tol_")}
    return {**(GPU_BASE if device == "cuda" else CPU_BASE), "name": f"check_timing_{name}", **spec}


def _module_and_call(suite: dict, impl: str, resolution: int):
    dtype = getattr(torch, suite["dtype"])
    g = resolution // suite["patch"]
    torch.manual_seed(0)
    module = attnbench.create(impl, dim=suite["dim"], heads=suite["heads"]).to(suite["device"], dtype).eval()
    x = torch.randn(suite["batch"], g, g, suite["dim"], device=suite["device"], dtype=dtype)

    def call():
        with torch.inference_mode():
            module(x)

    return call


def _own_graph(call):
    """The reference's own CUDA graph of ``call`` (warm-up on a side stream, then capture); its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    torch.cuda.synchronize()
    return graph.replay


def _autorange_ms(fn, min_run_time_s: float) -> float:
    """``blocked_autorange``'s median per call, ms (on CUDA its timer synchronises at each block's end)."""
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time_s).median * 1e3


def _steady_ms(fn, device: torch.device) -> float:
    """attnbench's steady-state median per call (:func:`timing.time_steady`), ms: blocks of about
    :data:`STEADY_S` in all, sized from a quick per-call estimate."""
    fn()
    est_s = float(np.median(timing.time_calls(fn, device, 5))) / 1e3
    n = timing.steady_calls(est_s, STEADY_S) or 1
    return float(np.median(timing.time_steady(fn, device, n)))


def reference(suite: dict, impl: str, resolution: int) -> dict:
    """The references of one cell, ms: ``median`` (do_bench on CUDA, blocked_autorange on CPU),
    ``steady`` (blocked_autorange) and attnbench's ``attnbench_steady``. With ``timing.cuda_graph`` all
    three time replays of a CUDA graph of the call."""
    device = torch.device(suite["device"])
    call = _module_and_call(suite, impl, resolution)
    if suite["timing"].get("cuda_graph") and device.type == "cuda":
        call = _own_graph(call)
    if device.type == "cuda":
        import triton.testing

        median = triton.testing.do_bench(call, warmup=200, rep=1000, quantiles=[0.5])
        median = float(median[0] if isinstance(median, (list, tuple)) else median)  # a list in some triton versions
        steady = _autorange_ms(call, 1.0)
    else:
        median = steady = _autorange_ms(call, 2.0)
    return {"median": median, "steady": steady, "attnbench_steady": _steady_ms(call, device)}


def run_check(device: str, name: str, out: Path) -> tuple[bool, list[dict]]:
    """Run one check: attnbench twice, the references between; the cells' comparisons and whether all passed."""
    suite = check_suite(device, name)
    tol_runs = CHECKS[device][name].get("tol_runs", TOL_RUNS)
    tol_ref = CHECKS[device][name].get("tol_ref", TOL_REF)
    rows, refs = [], {}
    for i in (1, 2):  # the references are timed between the two runs, so slow drift of the machine shows in both
        res = attnbench.run_suite(parse_suite(suite), out=out / name / f"run{i}", progress=False)
        rows.append({(r["impl"], r["resolution"]): r for r in res.rows})
        if i == 1:
            refs = {key: reference(suite, *key) for key in rows[0]}
    ok, cells = True, []
    for key, ref in refs.items():
        r1, r2 = rows[0][key], rows[1][key]
        if r1.get("status") != "ok" or r2.get("status") != "ok":
            ok = False
            cells.append({"check": name, "impl": key[0], "resolution": key[1], "status": r1.get("status"),
                          "message": r1.get("message") or r2.get("message")})
            continue
        a, b = r1["latency_ms_median"], r2["latency_ms_median"]
        cell = {"check": name, "impl": key[0], "resolution": key[1], "timing_method": r1.get("timing_method"),
                "run1_ms": a, "run2_ms": b, "reference_ms": ref["median"], "steady_ms": ref["attnbench_steady"],
                "steady_reference_ms": ref["steady"], "cell_steady_ms": r1.get("latency_steady_ms_median"),
                # on CPU nothing runs between the timed calls: steady and per-call time are the same thing
                "launch_bound": timing.launch_bound(a, ref["attnbench_steady"]) if device == "cuda" else None,
                "tol_runs": tol_runs, "tol_ref": tol_ref, "tol_steady": TOL_STEADY}
        cell["ok"] = bool(abs(b / a - 1) <= tol_runs and abs(a / ref["median"] - 1) <= tol_ref
                          and abs(ref["attnbench_steady"] / ref["steady"] - 1) <= TOL_STEADY)
        ok &= cell["ok"]
        cells.append(cell)
    return ok, cells


def _yes_no(flag: bool | None) -> str:
    return "-" if flag is None else "yes" if flag else "no"


def table(cells: list[dict], ref_name: str, steady_ref: str) -> list[str]:
    lines = [(f"| check | cell | method | run 1 (ms) | run 2 / run 1 | {ref_name} (ms) | run 1 / {ref_name} "
              f"| steady (ms) | steady / {steady_ref} | launch-bound | ok |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        where = f"{c['impl']} @ {c['resolution']}"
        if "run1_ms" not in c:
            lines.append(f"| {c['check']} | {where} | {c['status']}: {c['message']} | | | | | | | | no |")
            continue
        a = c["run1_ms"]
        lines.append(f"| {c['check']} | {where} | {c['timing_method']} | {a:.4f} | {c['run2_ms'] / a - 1:+.2%} "
                     f"| {c['reference_ms']:.4f} | {a / c['reference_ms'] - 1:+.2%} | {c['steady_ms']:.4f} "
                     f"| {c['steady_ms'] / c['steady_reference_ms'] - 1:+.2%} | {_yes_no(c['launch_bound'])} "
                     f"| {'yes' if c['ok'] else 'NO'} |")
    return lines


def fresh_folder(out: Path) -> Path:
    """``out/<UTC time>``, made now (a suffix when two invocations start in the same second)."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for i in range(1, 100):
        folder = out / (stamp if i == 1 else f"{stamp}-{i}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise SystemExit(f"check_timing: cannot make a fresh folder under {out}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results/check_timing"),
                    help="parent folder: each invocation writes OUT/<UTC time>/")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("check_timing: needs a CUDA GPU (torch sees none); --device cpu compares on the CPU", file=sys.stderr)
        return 2
    out = fresh_folder(args.out)
    print(f"check_timing: writing to {out}")
    ref_name = "do_bench" if args.device == "cuda" else "torch.utils.benchmark"
    ok, cells = True, []
    for name in CHECKS[args.device]:
        passed, found = run_check(args.device, name, out)
        ok &= passed
        cells += found
    lines = table(cells, ref_name, "blocked_autorange")
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    base = GPU_BASE if args.device == "cuda" else CPU_BASE
    head = f"{where}, torch {torch.__version__}, batch {base['batch']} (launch-bound cell: 1), {base['dtype']}"
    print(f"{head}\n")
    print("\n".join(lines))
    verdict = ("within" if ok else "OUTSIDE") + (f" the tolerances (run to run {TOL_RUNS:.0%}, against the reference "
                                                 f"{TOL_REF:.0%}, launch-bound cell {TOL_TINY:.0%} for both; "
                                                 f"steady state against blocked_autorange {TOL_STEADY:.0%})")
    print(f"\n{verdict}")
    (out / "comparison.json").write_text(json.dumps({"where": where, "torch": torch.__version__, "ok": ok,
                                                     "cells": cells}, indent=2))
    (out / "comparison.md").write_text(f"{head}\n\n" + "\n".join(lines) + f"\n\n{verdict}\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
