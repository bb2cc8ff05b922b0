import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rand():
    """A seeded generator for test inputs (never zeros)."""
    return torch.Generator().manual_seed(1234)


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (biases and norm weights too) random values, so agreement tests cannot pass by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


# --- suites ---------------------------------------------------------------------------------------

TOY_PLUGIN = ROOT / "tests" / "plugins" / "toy.py"
FAST_TIMING = {"warmup_s": 0.0, "target_s": 0.01, "min_repeats": 3, "max_repeats": 5, "min_sample_s": 0.0}  # a few calls a cell


def suite_dict(impls, resolution=(32,), **overrides) -> dict:
    """A small CPU suite as data: dim 16, 2 heads, the toy plugin, fast timing, no device peaks;
    ``overrides`` replace or add top-level keys (``timing={**FAST_TIMING, ...}``, ``measure_peaks=True``)."""
    return {"name": "t", "device": "cpu", "dim": 16, "heads": 2, "resolution": list(resolution),
            "plugins": [str(TOY_PLUGIN)], "impls": list(impls), "timing": dict(FAST_TIMING), "measure_peaks": False,
            **overrides}


def make_suite(impls, resolution=(32,), **overrides):
    """:func:`suite_dict` validated into a Suite."""
    from attnbench.suite import parse_suite

    return parse_suite(suite_dict(impls, resolution, **overrides))


def suite_file(folder, impls, resolution=(32,), *, filename="suite.yaml", **overrides) -> Path:
    """:func:`suite_dict` written as a YAML suite file in ``folder``; its path."""
    path = Path(folder) / filename
    path.write_text(yaml.safe_dump(suite_dict(impls, resolution, **overrides), sort_keys=False))
    return path


# --- synthetic rows and run folders ---------------------------------------------------------------

# the environment record of the synthetic runs; compare/check key baselines by it: "cpu-amd-epyc-1t"
SYNTH_ENV = {"device": "cpu", "gpu": None, "cpu": {"model": "AMD EPYC", "logical_cores": 2}, "suite_name": "synth",
             "torch": {"version": "2.15.0", "num_threads": 1}, "memory_method": "rss_hwm_delta"}


def make_row(**fields) -> dict:
    """One result row like the runner's; by default an ok forward float32 cell of ``a.b`` at 224 px
    (patch 4, dim 96, 3 heads, batch 1, on cpu) with latency samples [1.4, 1.5, 1.6] ms. ``fields``
    replace or add any column. Unless given: ``label`` is the impl, ``family`` its prefix; ``tokens``,
    ``grid_h`` and ``grid_w`` follow from resolution // patch; ``flops_torch`` equals ``flops_analytic``.
    An ok cell given ``latency_ms_samples`` gets their median, IQR and count; one given neither samples
    nor a median gets the default samples. A failed cell gets no latency or memory unless given.
    There is no ``cell_id`` unless given: readers then hash the identity fields."""
    impl = fields.get("impl", "a.b")
    res, patch, dim = fields.get("resolution", 224), fields.get("patch", 4), fields.get("dim", 96)
    g = res // patch
    row = {"impl": impl, "label": impl, "family": impl.split(".")[0], "params": {}, "resolution": res,
           "patch": patch, "shape": "", "tokens": g * g, "grid_h": g, "grid_w": g, "batch": 1, "dim": dim, "heads": 3,
           "dtype": "float32", "mode": "forward", "device": "cpu", "status": "ok", "message": "",
           "params_count": 4 * dim * dim, "flops_analytic": 2 * 10**9, **fields}
    row.setdefault("flops_torch", row["flops_analytic"])
    if row["status"] == "ok":
        if "latency_ms_samples" not in row and "latency_ms_median" not in row:
            row["latency_ms_samples"] = [1.4, 1.5, 1.6]
        samples = row.get("latency_ms_samples")
        if samples:
            row.setdefault("latency_ms_median", float(np.median(samples)))
            row.setdefault("latency_n", len(samples))
            row.setdefault("latency_ms_iqr", float(np.subtract(*np.percentile(samples, [75, 25]))))
        row.setdefault("noisy", False)
        row.setdefault("peak_mem_bytes", 2**20)
    return row


def sampled_row(impl, resolution, median_ms, *, seed, n=60, sigma=0.05, flops=10**9, params_count=1000,
                mem=50 * 2**20, status="ok", params=None) -> dict:
    """A row with ``n`` lognormal latency samples around ``median_ms`` (seeded) and a cell_id of
    impl-resolution, for compare and check; a failed ``status`` has no samples and a planted message."""
    fields = {}
    if status == "ok":
        rng = np.random.default_rng(seed)
        fields = {"latency_ms_samples": (median_ms * rng.lognormal(0.0, sigma, n)).tolist(),
                  "peak_mem_bytes": float(mem), "peak_mem_method": "rss_hwm_delta"}
    return make_row(cell_id=f"{impl}-{resolution}", impl=impl, params=params or {}, resolution=resolution,
                    status=status, message="" if status == "ok" else f"{status}: planted", flops_analytic=flops,
                    macs_fvcore=flops // 2, params_count=params_count, **fields)


def write_rows(folder, rows) -> Path:
    """Replace ``folder``'s rows.jsonl with ``rows``."""
    (Path(folder) / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Path(folder)


def write_run(folder, rows, env=None, suite=None) -> Path:
    """A run folder: rows.jsonl, env.json (default :data:`SYNTH_ENV`) and suite.yaml (a dict is dumped,
    a string written as it is; default ``name: synth``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_rows(folder, rows)
    (folder / "env.json").write_text(json.dumps(SYNTH_ENV if env is None else env))
    if suite is None:
        suite = {"name": "synth"}
    (folder / "suite.yaml").write_text(suite if isinstance(suite, str) else yaml.safe_dump(suite))
    return folder


def planted_pair(tmp_path):
    """BASE and NEW: slow (+30%, real), noise (same distribution, new seed), flops (changed count),
    gone (base only), added (new only), mem (peak +40 MiB), oom (ok -> oom), tiny (memory +300 KiB)."""
    base = [sampled_row("mha.sdpa", 224, 10.0, seed=1), sampled_row("sra.conv", 224, 2.0, seed=2),
            sampled_row("swin.window", 224, 3.0, seed=3), sampled_row("mvit.pool", 224, 5.0, seed=4),
            sampled_row("local.im2col", 224, 50.0, seed=5), sampled_row("mha.math", 224, 30.0, seed=6),
            sampled_row("sra.linear", 224, 1.5, seed=7), sampled_row("swin.shift_pad", 224, 4.0, seed=8, mem=1 * 2**20)]
    new = [sampled_row("mha.sdpa", 224, 13.0, seed=11), sampled_row("sra.conv", 224, 2.0, seed=12),
           sampled_row("swin.window", 224, 3.0, seed=13, flops=10**9 + 4096),
           sampled_row("local.slide", 224, 60.0, seed=15), sampled_row("mha.math", 224, 30.0, seed=16, mem=90 * 2**20),
           sampled_row("sra.linear", 224, 0, seed=17, status="oom"),
           sampled_row("swin.shift_pad", 224, 4.0, seed=18, mem=1 * 2**20 + 300 * 1024)]
    return write_run(tmp_path / "base", base), write_run(tmp_path / "new", new)


# a synthetic resolution sweep for plots and reports:
# label, impl, family, params, k (latency ~ N^k), latency at 224 px (ms), first failing resolution and its status
RESOLUTIONS = [224, 320, 384, 448, 512, 640, 768, 896, 1024]
SERIES = [
    ("mha.sdpa", "mha.sdpa", "mha", {}, 2.0, 30.0, None, None),
    ("mha.math", "mha.math", "mha", {}, 2.0, 120.0, 512, "over_budget"),
    ("swin.shift_pad(window=7)", "swin.shift_pad", "swin", {"window": 7}, 1.0, 4.0, None, None),
    ("swin.shift_cyclic(window=7)", "swin.shift_cyclic", "swin", {"window": 7}, 1.0, 3.0, None, None),
    ("local.im2col(kernel=3)", "local.im2col", "local", {"kernel": 3}, 1.0, 20.0, None, None),
    ("local.shift_dwconv(kernel=3)", "local.shift_dwconv", "local", {"kernel": 3}, 1.0, 30.0, None, None),
    ("local.im2col(kernel=5)", "local.im2col", "local", {"kernel": 5}, 1.0, 40.0, None, None),
    ("toy.oom", "toy.oom", "toy", {}, 1.0, 1.0, 224, "oom"),
    ("toy.fail", "toy.fail", "toy", {}, 1.0, 1.0, 448, "error"),
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sweep_row(label, impl, family, params, res, *, patch=4, dim=96, heads=3, status="ok", latency=None, k=1.0,
              noisy=False, **fields) -> dict:
    """A row whose FLOPs (2e4 N^k) and memory (1e4 N^k) grow with the token count N; an ok one has
    ``latency`` ms with its spread, percentiles and throughputs, a failed one NaN latency and memory."""
    n = (res // patch) ** 2
    batch = fields.get("batch", 1)
    flops = 2e4 * n ** k
    if status == "ok":
        measured = {"latency_ms_median": latency, "latency_ms_iqr": latency * (0.2 if noisy else 0.02),
                    "latency_ms_p10": latency * 0.97, "latency_ms_p90": latency * 1.05, "noisy": noisy,
                    "peak_mem_bytes": 1e4 * n ** k, "throughput_img_s": batch / (latency / 1e3),
                    "throughput_tok_s": batch * n / (latency / 1e3)}
    else:
        measured = {"latency_ms_median": math.nan, "peak_mem_bytes": math.nan}
    return make_row(impl=impl, label=label, family=family, params=params, resolution=res, patch=patch, dim=dim,
                    heads=heads, status=status, flops_analytic=int(flops), cpu_threads=2, **measured, **fields)


def make_sweep_run(root: Path, *, peaks: bool = True, seed: int = 0, pairs=None) -> Path:
    """A synthetic run folder of :data:`SERIES` over :data:`RESOLUTIONS`: known exponents, 3% noise, an
    over-budget series, an OOM one, an error cell; the device's peaks in env.json unless ``peaks=False``."""
    rng = np.random.default_rng(seed)
    rows = []
    for label, impl, family, params, k, lat0, fail_at, fail_status in SERIES:
        failed = False
        for res in RESOLUTIONS:
            n = (res // 4) ** 2
            lat = lat0 * (n / 3136) ** k * math.exp(rng.normal(0, 0.03))
            if fail_at is not None and res >= fail_at and (fail_status != "error" or res == fail_at):
                msg = {"over_budget": "predicted 9 s per call exceeds the cell budget of 20 s",
                       "oom": "OutOfMemoryError: CUDA out of memory (toy)",
                       "error": "RuntimeError: toy failure on a wide grid"}[fail_status]
                if failed and fail_status == "over_budget":
                    msg = f"skipped: resolution {fail_at} was over_budget"
                rows.append(sweep_row(label, impl, family, params, res, k=k, status=fail_status, message=msg))
                failed = True
            else:
                rows.append(sweep_row(label, impl, family, params, res, k=k, latency=lat, noisy=(res == 320)))
    env = {"device": "cpu", "gpu": None, "cpu": {"model": "Test CPU", "logical_cores": 2},
           "torch": {"version": "2.15.0", "num_threads": 2}}
    if peaks:
        env["peaks"] = {"matmul_tflops": {"float32": 0.5}, "copy_gb_s": 20.0}
    suite = {"name": "synth", "resolution": RESOLUTIONS, "patch": 4,
             "pairs": pairs if pairs is not None else [["swin.shift_cyclic(window=7)", "mha.sdpa"]]}
    return write_run(root, rows, env=env, suite=suite)


def make_shape_run(root: Path) -> Path:
    """A synthetic run of three Swin variants over four named stages (batch 64); shift_pad is out of memory at S4."""
    stages = [("S1", 4, 96, 3), ("S2", 8, 192, 6), ("S3", 16, 384, 12), ("S4", 32, 768, 24)]
    rows = []
    for label, impl, lat in (("swin.window(window=7)", "swin.window", 100.0),
                             ("swin.shift_pad(window=7)", "swin.shift_pad", 300.0),
                             ("swin.shift_cyclic(window=7)", "swin.shift_cyclic", 150.0)):
        for i, (name, patch, dim, heads) in enumerate(stages):
            status = "oom" if (impl == "swin.shift_pad" and name == "S4") else "ok"
            rows.append(sweep_row(label, impl, "swin", {"window": 7}, 224, patch=patch, dim=dim, heads=heads, batch=64,
                                  shape=name, latency=lat / (i + 1), status=status,
                                  message="OutOfMemoryError" if status != "ok" else ""))
    env = {"device": "cpu", "gpu": None, "cpu": {"model": "Test CPU"},
           "peaks": {"matmul_tflops": {"float32": 0.5}, "copy_gb_s": 20.0}}
    suite = {"name": "stages", "shapes": [{"name": n, "resolution": 224, "patch": p, "dim": d, "heads": h}
                                          for n, p, d, h in stages]}
    return write_run(root, rows, env=env, suite=suite)


# --- code that must run without some packages -----------------------------------------------------

_WITHOUT = r'''
import linecache, sys, traceback
blocked, strict, code = tuple(filter(None, sys.argv[1].split(","))), sys.argv[2] == "1", sys.argv[3]
sys.argv = ["-c", *sys.argv[4:]]
linecache.cache["<run_without>"] = (len(code), None, code.splitlines(True), "<run_without>")  # for tracebacks


def is_blocked(name):
    return any(name == b or name.startswith(b + ".") for b in blocked)


already = [m for m in sys.modules if is_blocked(m)]
if already:
    sys.exit(f"run_without: {already} imported before the test code started")
asked = []


class Blocker:
    def find_spec(self, name, path=None, target=None):
        if is_blocked(name):
            stack = [f for f in traceback.format_stack()[:-1] if "<frozen " not in f]
            asked.append(name + ", from\n" + "".join(stack))
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by run_without)", name=name)
        return None


sys.meta_path.insert(0, Blocker())
rc = 0
try:
    exec(compile(code, "<run_without>", "exec"), {"__name__": "__main__"})
except SystemExit as exc:
    rc = exc.code
except BaseException:
    traceback.print_exc()
    rc = 1
loaded = [m for m in sys.modules if is_blocked(m) and sys.modules[m] is not None]
if strict and (asked or loaded):
    sys.stdout.flush()
    print(f"run_without: blocked module(s) imported {loaded} or asked for:", *asked, sep="\n", file=sys.stderr)
    rc = WITHOUT_FAILED
sys.exit(rc)
'''
WITHOUT_FAILED = 86  # the exit code of a strict run_without whose code asked for a blocked module


def run_without(code: str, *args, blocked=("torch",), strict=True, timeout=120) -> subprocess.CompletedProcess:
    """Run ``code`` (with ``sys.argv[1:] == args``) in a fresh interpreter, from the repository root,
    where every module in ``blocked`` and its submodules cannot be imported (ModuleNotFoundError).
    ``strict`` (the default) also fails the run when the code merely asks for one, even if it copes
    with the error, or when one ends up in ``sys.modules``: the code does not touch them at all.
    Returns the finished process (text output); check its ``returncode``."""
    proc = subprocess.run([sys.executable, "-c", _WITHOUT.replace("WITHOUT_FAILED", str(WITHOUT_FAILED)),
                           ",".join(blocked), "1" if strict else "0", code, *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          timeout=timeout)
    assert proc.returncode != WITHOUT_FAILED, proc.stderr
    return proc


# --- scripted time and process-wide settings (tests of the budget rule, warm-up, compile, check) ----

class ScriptedClock:
    """A virtual ``time`` for :mod:`attnbench.cell` and :mod:`attnbench.measure.timing`: it stands still
    except while a measured call runs, which advances it by ``cost(module, x)`` seconds (asked at each
    call; ``x`` is the cell's input). The machine's speed never enters: budgets, warm-up counts, sample
    counts and latencies become exact. ``calls`` lists (batch, grid_h, grid_w) of every measured call."""

    def __init__(self, cost=None):
        self.ns = 0
        self.cost = cost or (lambda module, x: 0.0)
        self.calls: list[tuple[int, int, int]] = []

    def advance(self, seconds: float) -> None:
        self.ns += round(seconds * 1e9)

    def perf_counter(self) -> float:
        return self.ns / 1e9

    def perf_counter_ns(self) -> int:
        return self.ns

    def __getattr__(self, name):  # sleep, time, monotonic...: the real ones
        import time

        return getattr(time, name)


@pytest.fixture
def scripted_calls(monkeypatch):
    """Every cell measured in this process runs on a :class:`ScriptedClock` (returned; set its ``cost``):
    the cell's measured call (``attnbench.cell.make_call``) really runs, then "takes" ``cost(module, x)``
    seconds. The sentinel and the device peaks read constants (timed on this clock they would divide by zero)."""
    from attnbench import build, cell
    from attnbench.measure import peaks, timing

    clock = ScriptedClock()
    monkeypatch.setattr(cell, "time", clock)
    monkeypatch.setattr(timing, "time", clock)
    monkeypatch.setattr(peaks, "sentinel_tflops", lambda device, repeats=5: 1.0)
    monkeypatch.setattr(peaks, "matmul_tflops", lambda device, dtype, repeats=None: 1.0)
    monkeypatch.setattr(peaks, "measure_peaks", lambda device, dtypes, repeats=10: {
        "device": str(device), "matmul_tflops": {d: 1.0 for d in dtypes}, "copy_gb_s": 1.0})
    real_make_call = cell.make_call

    def make_call(module, x, mode):
        call = real_make_call(module, x, mode)

        def scripted():
            call()
            clock.calls.append(tuple(x.shape[:3]))
            clock.advance(clock.cost(module, x))

        return scripted

    monkeypatch.setattr(cell, "make_call", make_call)
    monkeypatch.setattr(build, "make_call", make_call)  # the largest-batch search's calls
    return clock


@pytest.fixture
def keep_torch_globals():
    """Restore torch's CPU threads and TF32 flags after a test whose run sets them (``threads``, ``tf32``)."""
    saved = (torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.set_num_threads(saved[0])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1], saved[2]


def failed_statuses_run(root: Path) -> Path:
    """A synthetic run (224..512 px) with the statuses only an isolated or picky run produces:
    toy.hang times out at 384 (larger cells then skipped), toy.crash crashes from 384 on (each tried),
    toy.picky is unsupported at 320; mha.sdpa is ok throughout."""
    res = [224, 320, 384, 448, 512]
    rows = []
    for label, k, lat0 in (("mha.sdpa", 2.0, 10.0), ("toy.hang", 1.0, 2.0), ("toy.crash", 1.0, 3.0),
                           ("toy.picky", 1.0, 4.0)):
        for r in res:
            lat = lat0 * ((r / 224) ** 2) ** k
            status, message = "ok", ""
            if label == "toy.hang" and r == 384:
                status, message = "timeout", "the worker did not finish within 3 s and was killed"
            elif label == "toy.hang" and r > 384:
                status, message = "timeout", "skipped: resolution 384 was timeout"
            elif label == "toy.crash" and r >= 384:
                status, message = "crashed", "the worker process died (signal 9)"
            elif label == "toy.picky" and r == 320:
                status, message = "unsupported", "grid 80x80 is not a multiple of 7"
            rows.append(sweep_row(label, label, label.split(".")[0], {}, r, k=k, status=status, message=message,
                                  latency=lat if status == "ok" else None))
    env = {"device": "cpu", "gpu": None, "cpu": {"model": "Test CPU", "logical_cores": 2},
           "torch": {"version": "2.15.0", "num_threads": 2}}
    return write_run(root, rows, env=env, suite={"name": "statuses", "resolution": res, "patch": 4})
