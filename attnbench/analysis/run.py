"""A run folder read for analysis, and what is computed from it: series, fitted growth exponents,
speed-ups, roofline points, cells predicted by the budget rule. pandas and numpy only: no torch, no
matplotlib, so ``attnbench show`` and the report's tables load fast anywhere a folder is copied.
:mod:`attnbench.analysis.plots` draws these; :mod:`attnbench.analysis.report` tabulates them.

Arithmetic intensity (roofline) is a stated convention, not a hardware count: FLOPs / (dtype bytes x
(parameters + 2 x batch x tokens x dim)), i.e. weights, input and output each moved once (a lower
bound on traffic, so an upper bound on intensity).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from .. import schema, store
from ..budget import predict_latency_ms
from ..errors import RunDirError
from ..schema import Status
from .fit import Fit, fit_exponent, theoretical_exponent

FAILED = tuple(s.value for s in schema.FAILED)
PREDICTABLE = tuple(s.value for s in schema.FAILED_FOR_SIZE)  # failed for size: latency predicted by the budget rule
DEFAULT_PAIRS: list[tuple[str, str]] = [("swin.shift_cyclic", "swin.shift_pad"), ("local.shift_dwconv", "local.im2col"),
                                        ("mha.sdpa", "mha.math")]
DTYPE_BYTES = schema.DTYPE_BYTES


@dataclass(frozen=True)
class Metric:
    column: str
    axis: str  # axis label with units
    title: str
    scale: float = 1.0
    fit: bool = True  # fit and show the growth exponent
    complete: bool = False  # counted for every cell, failed ones too (FLOPs)


METRICS: dict[str, Metric] = {
    "latency": Metric("latency_ms_median", "latency, median of timed calls (ms)", "latency"),
    "memory": Metric("peak_mem_bytes", "peak memory of one call (MiB)", "peak memory", 2.0 ** 20),
    "flops": Metric("flops_analytic", "FLOPs, analytic, forward, 2 per MAC (GFLOP)", "FLOPs", 1e9, complete=True),
    "throughput": Metric("throughput_img_s", "throughput (images/s)", "throughput", fit=False),
}


@dataclass
class Run:
    """A run folder read for analysis."""

    path: Path
    df: pd.DataFrame
    env: dict[str, Any]
    suite: dict[str, Any]
    styles: dict[str, Any] = field(default_factory=dict)  # label -> colour and marker, set by the plots
    torn: bool = False  # the last line of rows.jsonl was cut mid-write: one cell is missing

    @property
    def by_shape(self) -> bool:
        return bool(len(self.df)) and self.df["shape"].fillna("").astype(str).astype(bool).all()

    @property
    def name(self) -> str:
        return str(self.suite.get("name") or self.path.name)

    def groups(self) -> list[tuple[str, str, pd.DataFrame]]:
        """(dtype, mode, rows) in the order they appear in the run."""
        keys = list(dict.fromkeys(zip(self.df["dtype"].astype(str), self.df["mode"].astype(str))))
        return [(d, m, self.df[(self.df["dtype"].astype(str) == d) & (self.df["mode"].astype(str) == m)])
                for d, m in keys]


_NUMERIC = list(schema.NUMERIC)


def load_run(run_dir: str | Path) -> Run:
    """Read a run folder (rows, env.json, suite.yaml); :class:`RunDirError` if it is not one or has no rows."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RunDirError(f"{path} is not a run folder (no such folder)")
    df = store.load_results(path)
    if df.empty:
        raise RunDirError(f"{path} is a run folder without rows (nothing measured yet)")
    df = df.copy()
    for col in _NUMERIC + ["grid_h", "grid_w"]:
        if col not in df.columns:
            df[col] = math.nan
        df[col] = pd.to_numeric(df[col], errors="coerce")
    df["tokens"] = df["tokens"].fillna(df["grid_h"] * df["grid_w"])  # older rows
    if "params" not in df.columns:
        df["params"] = [{} for _ in range(len(df))]
    df["params"] = [p if isinstance(p, dict) else {} for p in df["params"]]
    df["status"] = df["status"].fillna("").astype(str)
    df["message"] = df["message"].fillna("").astype(str)
    df["shape"] = df["shape"].fillna("").astype(str)
    df["label"] = [lab if isinstance(lab, str) and lab else str(imp) for lab, imp in zip(df["label"], df["impl"])]
    df["noisy"] = [v is True or v == 1 for v in df["noisy"]]
    for col in ("dtype", "mode"):
        df[col] = df[col].fillna("?").astype(str)
    env = store.read_env(path)
    suite: dict[str, Any] = {}
    if (path / "suite.yaml").is_file():
        try:
            loaded = yaml.safe_load((path / "suite.yaml").read_text())
            suite = loaded if isinstance(loaded, dict) else {}
        except yaml.YAMLError:
            suite = {}
    return Run(path=path, df=df, env=env, suite=suite, torn=store.torn_last_line(path))


def _param_key(params: dict[str, Any]) -> tuple:
    out = []
    for k in sorted(params):
        v = params[k]
        numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
        out.append((k, (0, float(v), "") if numeric else (1, 0.0, str(v))))
    return tuple(out)


def label_variants(df: pd.DataFrame) -> dict[str, list[str]]:
    """impl -> its labels, implementations in the run's order (the suite's), each one's parameter
    variants sorted by their values."""
    variants: dict[str, dict[str, tuple]] = {}
    for impl, label, params in zip(df["impl"].astype(str), df["label"], df["params"]):
        variants.setdefault(impl, {})[label] = _param_key(params if isinstance(params, dict) else {})
    return {impl: sorted(v, key=lambda lab: (v[lab], lab)) for impl, v in variants.items()}


def label_order(df: pd.DataFrame) -> list[str]:
    """Every label of the run in display order (the order of the plots' legends and colours)."""
    return [lab for labels in label_variants(df).values() for lab in labels]


def device_name(env: dict[str, Any], df: pd.DataFrame | None = None) -> str:
    gpu = env.get("gpu")
    if isinstance(gpu, dict) and gpu.get("name"):
        return str(gpu["name"])
    cpu = env.get("cpu") or {}
    threads = None
    if df is not None and "cpu_threads" in df and df["cpu_threads"].notna().any():
        threads = int(pd.to_numeric(df["cpu_threads"], errors="coerce").dropna().mode().iloc[0])
    threads = threads or (env.get("torch") or {}).get("num_threads")
    dev = str(env.get("device") or (df["device"].iloc[0] if df is not None and len(df) else "cpu"))
    if dev.startswith("cuda"):
        return dev
    return f"CPU {cpu.get('model') or ''}".strip() + (f", {threads} threads" if threads else "")


def _series_keys(g: pd.DataFrame, by_shape: bool = False) -> list[str]:
    cols = ("batch",) if by_shape else ("batch", "dim", "heads")  # named shapes carry their own dim/heads
    return [c for c in cols if g[c].nunique(dropna=True) > 1]


def series_of(run: Run, g: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """(series name, label, rows sorted by tokens) within one (dtype, mode) group, in colour order."""
    varying = _series_keys(g, run.by_shape)
    order = {lab: i for i, lab in enumerate(label_order(run.df))}
    out = []
    keys = ["label"] + varying
    for key, rows in g.groupby(keys, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        label = key[0]
        name = label + "".join(f" {c[0]}{int(v)}" for c, v in zip(varying, key[1:]) if v == v)
        out.append((name, label, rows.sort_values("tokens")))
    out.sort(key=lambda t: (order.get(t[1], 1e9), t[0]))
    return out


def _value(rows: pd.DataFrame, metric: Metric) -> np.ndarray:
    return rows[metric.column].to_numpy(dtype=float) / metric.scale


def _ok(rows: pd.DataFrame) -> np.ndarray:
    return (rows["status"] == Status.OK).to_numpy()


def fit_series(rows: pd.DataFrame, metric: Metric) -> Fit | None:
    """The growth exponent of one series for a metric: measured cells only, all cells for FLOPs."""
    mask = np.ones(len(rows), bool) if metric.complete else _ok(rows)
    return fit_exponent(rows["tokens"].to_numpy(dtype=float)[mask], _value(rows, metric)[mask])


def predicted(rows: pd.DataFrame, metric: Metric) -> dict[int, float]:
    """index -> predicted value for over_budget/oom cells after a measured one (latency and throughput):
    the last measured latency scaled by the FLOP ratio, the runner's own budget rule."""
    if metric.column not in ("latency_ms_median", "throughput_img_s"):
        return {}
    out = {}
    last = None
    for idx, r in rows.iterrows():
        if r["status"] == Status.OK and r["latency_ms_median"] > 0 and r["flops_analytic"] > 0:
            last = r
        elif r["status"] in PREDICTABLE and last is not None and r["flops_analytic"] > 0:
            lat = predict_latency_ms(last["latency_ms_median"], last["flops_analytic"], r["flops_analytic"])
            out[idx] = lat if metric.column == "latency_ms_median" else r["batch"] / (lat / 1e3)
    return out


def metric_of(key: str, g: pd.DataFrame) -> Metric:
    """The metric to plot; FLOPs in train mode are torch's forward + backward count where the run has it."""
    metric = METRICS[key]
    if key == "flops" and (g["mode"] == "train").all() and "flops_torch_fwd_bwd" in g \
            and (g["flops_torch_fwd_bwd"] > 0).all():
        return Metric("flops_torch_fwd_bwd", "FLOPs, torch count, forward + backward, 2 per MAC (GFLOP)",
                      "FLOPs (forward + backward)", 1e9, complete=True)
    return metric


def exponent_rows(run: Run, g: pd.DataFrame) -> list[dict[str, Any]]:
    """Per series of a (dtype, mode) group: fitted k for latency, memory, FLOPs, and the theory."""
    out = []
    for name, label, rows in series_of(run, g):
        impl = str(rows["impl"].iloc[0])
        out.append({"series": name, "label": label, "impl": impl,
                    "latency": fit_series(rows, METRICS["latency"]), "memory": fit_series(rows, METRICS["memory"]),
                    "flops": fit_series(rows, metric_of("flops", g)), "theory": theoretical_exponent(impl),
                    "ok_points": int(_ok(rows).sum())})
    return out


def pairs_of(run: Run) -> list[tuple[str, str]]:
    """Default pairs, then the suite's ``pairs``: (candidate, baseline) names (labels or impl names)."""
    out = list(DEFAULT_PAIRS)
    for p in run.suite.get("pairs") or []:
        if isinstance(p, (list, tuple)) and len(p) == 2:
            t = (str(p[0]), str(p[1]))
            if t not in out:
                out.append(t)
    return out


def _pick(df: pd.DataFrame, name: str) -> pd.DataFrame:
    exact = df[df["label"] == name]
    return exact if len(exact) else df[df["impl"] == name]


def speedups(run: Run, g: pd.DataFrame | None = None) -> pd.DataFrame:
    """Speed-up = baseline latency / candidate latency, cell by cell, for every pair present in the run.

    Cells match on resolution (or shape), dtype, mode, batch, dim and heads, and on the implementation
    parameters when both implementations take the same ones (``local.im2col(kernel=3)`` pairs with
    ``local.shift_dwconv(kernel=3)``); implementations with different parameter sets pair variant by
    variant. Only cells measured ``ok`` on both sides give a speed-up. Columns: pair, candidate,
    baseline, dtype, mode, batch, dim, heads, resolution, shape, tokens, speedup, latency_candidate_ms,
    latency_baseline_ms.
    """
    df = run.df if g is None else g
    keys = ["dtype", "mode", "batch", "dim", "heads", "resolution", "shape", "tokens"]
    frames = []
    for cand, base in pairs_of(run):
        c_all, b_all = _pick(df, cand), _pick(df, base)
        if c_all.empty or b_all.empty:
            continue
        for cl, c in c_all.groupby("label", sort=False):
            pc = c["params"].iloc[0]
            for bl, b in b_all.groupby("label", sort=False):
                if cl == bl:
                    continue
                pb = b["params"].iloc[0]
                if set(pc) == set(pb) and pc != pb:
                    continue
                ci, bi = str(c["impl"].iloc[0]), str(b["impl"].iloc[0])
                if pc == pb:
                    name = f"{ci} over {bi}" + (" (" + ", ".join(f"{k}={v}" for k, v in sorted(pc.items())) + ")"
                                                if pc else "")
                else:
                    name = f"{cl} over {bl}"
                m = pd.merge(c[c["status"] == Status.OK][keys + ["latency_ms_median"]],
                             b[b["status"] == Status.OK][keys + ["latency_ms_median"]], on=keys,
                             suffixes=("_candidate", "_baseline"))
                if m.empty:
                    continue
                m = m.rename(columns={"latency_ms_median_candidate": "latency_candidate_ms",
                                      "latency_ms_median_baseline": "latency_baseline_ms"})
                m["speedup"] = m["latency_baseline_ms"] / m["latency_candidate_ms"]
                m.insert(0, "baseline", bl)
                m.insert(0, "candidate", cl)
                m.insert(0, "pair", name)
                frames.append(m)
    if not frames:
        return pd.DataFrame(columns=["pair", "candidate", "baseline"] + keys + ["latency_candidate_ms",
                                                                              "latency_baseline_ms", "speedup"])
    out = pd.concat(frames, ignore_index=True)
    return out.drop_duplicates(subset=["pair"] + keys).sort_values(["pair", "tokens"], kind="stable")


def shape_order(run: Run, g: pd.DataFrame) -> list[str]:
    names = [str(s.get("name", "")) for s in run.suite.get("shapes") or [] if isinstance(s, dict)]
    present = list(dict.fromkeys(g["shape"]))
    return [n for n in names if n in present] + [n for n in present if n not in names]


def roofline_points(run: Run, g: pd.DataFrame) -> pd.DataFrame:
    """Measured cells with their arithmetic intensity (FLOP/byte, see module doc) and achieved TFLOP/s."""
    d = g[g["status"] == Status.OK].copy()
    if d.empty:
        return d.assign(flops=[], bytes=[], ai=[], tflops=[])
    flops = d["flops_torch"].copy()
    if "flops_torch_fwd_bwd" in d:
        train = d["mode"] == "train"
        flops[train] = d.loc[train, "flops_torch_fwd_bwd"]
    flops = flops.where(flops > 0, d["flops_analytic"])
    nbytes = d["dtype"].map(DTYPE_BYTES).fillna(4) * (d["params_count"].fillna(0)
                                                       + 2 * d["batch"] * d["tokens"] * d["dim"])
    tflops = d["tflops_achieved"].where(d["tflops_achieved"] > 0, flops / (d["latency_ms_median"] / 1e3) / 1e12)
    d["flops"], d["bytes"], d["ai"], d["tflops"] = flops, nbytes, flops / nbytes, tflops
    return d[np.isfinite(d["ai"]) & np.isfinite(d["tflops"]) & (d["ai"] > 0) & (d["tflops"] > 0)]


def device_peaks(env: dict[str, Any], dtype: str) -> tuple[float | None, float | None]:
    """(matmul TFLOP/s of the dtype, copy GB/s) measured for the run, or None where absent."""
    peaks = env.get("peaks") or {}
    if not isinstance(peaks, dict):
        return None, None
    mm = (peaks.get("matmul_tflops") or {}).get(dtype)
    bw = peaks.get("copy_gb_s")
    mm = float(mm) if isinstance(mm, (int, float)) and mm > 0 else None
    bw = float(bw) if isinstance(bw, (int, float)) and bw > 0 else None
    return mm, bw


def match_impl(df: pd.DataFrame, pattern: str | None) -> pd.Series:
    """Rows whose impl or label matches one of the comma-separated shell patterns."""
    if not pattern:
        return pd.Series(True, index=df.index)
    pats = [p.strip() for p in pattern.split(",") if p.strip()]
    return df["impl"].astype(str).map(lambda s: any(fnmatch.fnmatchcase(s, p) for p in pats)) | \
        df["label"].astype(str).map(lambda s: any(fnmatch.fnmatchcase(s, p) for p in pats))


def figure_plan(run: Run) -> list[tuple[str, str, str, str]]:
    """(file name, kind, dtype, mode) of every figure worth drawing, per (dtype, mode) group: the four
    metrics (curves against tokens, or bars per named shape), the fitted exponents (curves only), the
    speed-ups of the pairs present and the roofline (where the run measured the device's peaks). A
    figure needs two points: a group whose series each have one token count gets no curves, and a
    roofline needs two measured cells."""
    plan = []
    for dtype, mode, g in run.groups():
        suffix = f"{dtype}-{mode}"
        curves = run.by_shape or any(rows["tokens"].nunique() > 1 for _, _, rows in series_of(run, g))
        if curves:
            plan += [(f"{key}-{suffix}.png", key, dtype, mode) for key in METRICS]
            if not run.by_shape:
                plan.append((f"exponents-{suffix}.png", "exponents", dtype, mode))
            if not speedups(run, g).empty:
                plan.append((f"speedup-{suffix}.png", "speedup", dtype, mode))
        if device_peaks(run.env, dtype)[0] is not None and len(roofline_points(run, g)) >= 2:
            plan.append((f"roofline-{suffix}.png", "roofline", dtype, mode))
    return plan
