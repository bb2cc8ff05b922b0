"""The papers' tables beside the measured ones: values, ratios to the paper's reference row, rank order.

No torch: this reads rows (from run folders) and the paper figures (``attnbench/data/papers.yaml``).
A table is a list of :class:`Line` (one method in one column: a stage, a model, an input size) and,
per column, Kendall's tau between the paper's and the measured values (scipy's ``kendalltau``, tau-b):
+1 the same order, -1 reversed. Ratios are taken to the paper's own reference row (Table 5: window
attention without shifting; Table 8: 224 px), in the direction where more is better (speed = 1 /
time), so a ratio of 2 reads "twice as fast as the reference" in both the paper and the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

PAPERS_FILE = Path(__file__).resolve().parents[1] / "data" / "papers.yaml"

# Table 5's methods -> how rows of attnbench's suites are recognised: module rows by implementation
# name, model rows by the attention label; several candidates: the fastest measured one is taken.
SWIN5_IMPLS = {
    "sliding_naive": ("local.im2col",),
    "sliding_kernel": ("local.blocked", "local.flex"),
    "performer": ("performer.favor",),
    "window": ("swin.window",),
    "shift_pad": ("swin.shift_pad",),
    "shift_cyclic": ("swin.shift_cyclic",),
}
SWIN5_MODEL_ATTENTION = {
    "sliding_naive": ("local.im2col(kernel=7)",),
    "sliding_kernel": ("local.blocked(kernel=7)", "local.flex(kernel=7)"),
    "performer": ("performer.favor",),
    "window": ("swin.window",),
    "shift_pad": ("shifted=swin.shift_pad,window=swin.window",),
    "shift_cyclic": ("shifted=swin.shift_cyclic,window=swin.window",),
}


def papers() -> dict[str, Any]:
    return yaml.safe_load(PAPERS_FILE.read_text())


@dataclass
class Line:
    """One method in one column: the paper's value and the measured one, each with its ratio."""

    column: str  # S1, swin_tiny_patch4_window7_224, 256 px ...
    method: str
    label: str
    paper: float
    measured: float  # NaN: not measured (failed, over budget, or not in the run)
    paper_ratio: float = math.nan  # speed relative to the reference row (higher: faster)
    measured_ratio: float = math.nan
    source: str = ""  # the measured row's label, or why there is none


@dataclass
class Table:
    name: str
    title: str
    unit: str
    lines: list[Line]
    tau: dict[str, tuple[float, int]]  # column -> (Kendall's tau, methods compared)
    notes: list[str]


def _ok(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status") == "ok"]


def _fastest(candidates: list[dict[str, Any]]) -> dict[str, Any] | None:
    timed = [r for r in candidates if r.get("latency_ms_median") == r.get("latency_ms_median")]
    return min(timed, key=lambda r: r["latency_ms_median"]) if timed else None


def _ratios(lines: list[Line], reference: str, higher_is_faster: bool) -> None:
    by_col: dict[str, dict[str, Line]] = {}
    for line in lines:
        by_col.setdefault(line.column, {})[line.method] = line
    for col in by_col.values():
        ref = col.get(reference)
        if ref is None:
            continue
        for line in col.values():
            if higher_is_faster:
                line.paper_ratio = line.paper / ref.paper
                line.measured_ratio = line.measured / ref.measured if ref.measured else math.nan
            else:
                line.paper_ratio = ref.paper / line.paper
                line.measured_ratio = ref.measured / line.measured if line.measured else math.nan


def kendall(lines: list[Line]) -> dict[str, tuple[float, int]]:
    """Per column, Kendall's tau-b between paper and measured values over the methods measured there."""
    from scipy.stats import kendalltau

    out: dict[str, tuple[float, int]] = {}
    for column in dict.fromkeys(line.column for line in lines):
        pairs = [(ln.paper, ln.measured) for ln in lines if ln.column == column and ln.measured == ln.measured]
        if len(pairs) >= 2:
            tau = kendalltau([p for p, _ in pairs], [m for _, m in pairs]).statistic
            out[column] = (float(tau), len(pairs))
    return out


def swin_table5(rows: list[dict[str, Any]], paper: dict[str, Any] | None = None) -> list[Table]:
    """Table 5 from the rows of ``swin_table5`` (per-stage attention, ms) and ``swin_table5_models``
    (whole models, images/s): two tables, each method's value and speed relative to window attention."""
    spec = (paper or papers())["swin-table5"]
    ok = _ok(rows)
    stage_lines, model_lines = [], []
    for method, row in spec["rows"].items():
        for i, ms in enumerate(row["stages"]):
            stage = f"S{i + 1}"
            found = _fastest([r for r in ok if not r.get("model") and r.get("shape") == stage
                              and r.get("impl") in SWIN5_IMPLS[method]])
            stage_lines.append(Line(stage, method, row["label"], ms,
                                    found["latency_ms_median"] if found else math.nan,
                                    source=found["label"] if found else "not measured"))
        for model, img_s in zip(spec["models"], row["models"]):
            found = _fastest([r for r in ok if r.get("model") == model
                              and r.get("impl") in SWIN5_MODEL_ATTENTION[method]])
            model_lines.append(Line(model, method, row["label"], img_s,
                                    found["throughput_img_s"] if found else math.nan,
                                    source=found["impl"] if found else "not measured"))
    _ratios(stage_lines, spec["reference_row"], higher_is_faster=False)
    _ratios(model_lines, spec["reference_row"], higher_is_faster=True)
    out = []
    for name, title, unit, lines, of in (
            ("stages", "MSA time per Swin-T stage", "ms", stage_lines, [r for r in ok if not r.get("model")]),
            ("models", "whole-model throughput", "images/s", model_lines, [r for r in ok if r.get("model")])):
        lines = _measured_columns(lines)
        if lines:
            out.append(Table(f"swin-table5-{name}", f"Swin Table 5: {title}", unit, lines, kendall(lines),
                             _batch_notes(of)))
    return out


def _measured_columns(lines: list[Line]) -> list[Line]:
    """The lines of the columns where at least one method was measured."""
    measured = {ln.column for ln in lines if ln.measured == ln.measured}
    return [ln for ln in lines if ln.column in measured]


def swin_table8(rows: list[dict[str, Any]], paper: dict[str, Any] | None = None) -> list[Table]:
    """Table 8 from the rows of ``swin_table8``: throughput against input size, relative to 224 px."""
    spec = (paper or papers())["swin-table8"]
    ok = _ok(rows)
    lines = []
    for size, figures in spec["rows"].items():
        for model, img_s in zip(spec["models"], figures):
            found = [r for r in ok if r.get("model") == model and r.get("resolution") == int(size)]
            lines.append(Line(model, str(size), f"{size} px", img_s,
                              found[0]["throughput_img_s"] if found else math.nan,
                              source=found[0]["label"] if found else "not measured"))
    _ratios(lines, str(spec["reference_row"]), higher_is_faster=True)
    lines = _measured_columns(lines)
    return [Table("swin-table8", "Swin Table 8: throughput against input size", "images/s", lines, kendall(lines),
                  _batch_notes(ok))] if lines else []


def _speed_line(column: str, method: str, label: str, paper_ratio: float, design: dict[str, Any] | None,
                reference: dict[str, Any] | None) -> Line:
    """A line whose paper figure is itself a speed ratio: measured = the design's ms, ratio = ref ms / ms."""
    ms = design["latency_ms_median"] if design else math.nan
    ref_ms = reference["latency_ms_median"] if reference else math.nan
    return Line(column, method, label, paper_ratio, ms, paper_ratio, ref_ms / ms if ms == ms and ms else math.nan,
                source=design["label"] if design else "not measured")


NAT_NAIVE = ("local.neighborhood_naive",)
NAT_FAST = ("local.neighborhood", "local.neighborhood_flex")


def nat_speed(rows: list[dict[str, Any]], paper: dict[str, Any] | None = None) -> list[Table]:
    """NAT's comparison from the rows of ``local_vs_window``: neighbourhood attention's speed relative to
    Swin's shifted windows (``swin.shift_cyclic``) at each token count, the naive form against NATTEN's
    pure-torch figures, the fastest form against the range NATTEN's CUDA kernels claim."""
    spec = (paper or papers())["nat-speed"]
    ok = [r for r in _ok(rows) if not r.get("model")]
    lines = []
    for side in sorted({int(r["grid_h"]) for r in ok if r.get("grid_h") == r.get("grid_w")}):
        at = [r for r in ok if r.get("grid_h") == side and r.get("grid_w") == side]
        swin = _fastest([r for r in at if r.get("impl") == "swin.shift_cyclic"])
        if swin is None:
            continue
        column = f"{side}x{side} tokens"
        lines.append(_speed_line(column, "swin", "Swin shifted window (reference)", 1.0, swin, swin))
        naive = spec["rows"]["unfold_naive"]["by_tokens"].get(side * side)
        if naive is not None:
            lines.append(_speed_line(column, "unfold_naive", spec["rows"]["unfold_naive"]["label"], naive,
                                     _fastest([r for r in at if r.get("impl") in NAT_NAIVE]), swin))
        lo, hi = spec["rows"]["natten_cuda"]["range"]
        lines.append(_speed_line(column, "natten_cuda", f"{spec['rows']['natten_cuda']['label']} ({lo}-{hi}x)",
                                 (lo + hi) / 2, _fastest([r for r in at if r.get("impl") in NAT_FAST]), swin))
    lines = [ln for ln in lines if any(o.column == ln.column and o.method != "swin" and o.measured == o.measured
                                       for o in lines)]
    notes = _batch_notes(ok, "NATTEN's figures: its own GPU benchmarks") + [
        "paper ratios: NATTEN's figures (the CUDA row: the middle of its stated range); measured: the naive "
        "gather form and the fastest of attnbench's exact forms"]
    return [Table("nat-speed", "NAT: neighbourhood attention's speed relative to Swin's shifted windows", "ms",
                  lines, kendall(lines), notes)] if lines else []


def slide_speed(rows: list[dict[str, Any]], paper: dict[str, Any] | None = None) -> list[Table]:
    """Slide-Transformer's speed-up of its shifted depthwise convolutions over Im2Col, from the rows of
    ``local_attention`` (module level, per kernel size, at each resolution's stage-1 shape)."""
    spec = (paper or papers())["slide-speed"]
    ok = [r for r in _ok(rows) if not r.get("model")]
    figure = spec["rows"]["slide_vs_im2col_swin"]
    lines = []
    for res in sorted({int(r["resolution"]) for r in ok}):
        for kernel in sorted({dict(r.get("params") or {}).get("kernel") for r in ok} - {None}):
            at = [r for r in ok if r["resolution"] == res and dict(r.get("params") or {}).get("kernel") == kernel]
            im2col = _fastest([r for r in at if r.get("impl") == "local.im2col"])
            slide = _fastest([r for r in at if r.get("impl") == "local.slide"])
            if im2col is None or slide is None:
                continue
            column = f"k={kernel}, {res} px"
            lines.append(_speed_line(column, "im2col", "Im2Col (reference)", 1.0, im2col, im2col))
            lines.append(_speed_line(column, "slide", figure["label"], figure["speedup"], slide, im2col))
    notes = _batch_notes(ok, "the paper: iPhone 12 and Apple's Metal") + [
        "the paper's figure is a whole model on an iPhone 12; measured: the attention module alone on this device"]
    return [Table("slide-speed", "Slide-Transformer: Slide's speed relative to Im2Col", "ms", lines, {},
                  notes)] if lines else []


MVIT_ATTENTION = {
    "mha": ("mha.sdpa",),
    "window": ("swin.window",),
    "shifted": ("shifted=swin.shift_cyclic,window=swin.window",),
    "hwin": ("global=mha.sdpa,shifted=swin.window,window=swin.window",),
    "pooling": ("mvit.pool(rel_pos_size=14,stride_kv=2)",),
}


def mvitv2_attention(rows: list[dict[str, Any]], paper: dict[str, Any] | None = None) -> list[Table]:
    """MViTv2's attention ablation from the rows of ``mvitv2_attention``: whole-model GMACs per image
    (forward rows, fvcore) and the training step's peak memory (train rows), each as a cost relative
    to full MHA (lower is cheaper; the paper's GFLOPs are MACs)."""
    spec = (paper or papers())["mvitv2-attention"]
    ok = [r for r in _ok(rows) if r.get("model")]
    lines = []
    for method, row in spec["rows"].items():
        fwd = [r for r in ok if r.get("mode") == "forward" and r.get("impl") in MVIT_ATTENTION[method]]
        train = [r for r in ok if r.get("mode") == "train" and r.get("impl") in MVIT_ATTENTION[method]]
        macs = fwd[0]["macs_fvcore"] / fwd[0]["batch"] / 1e9 if fwd and fwd[0].get("macs_fvcore") else math.nan
        mem = train[0]["peak_mem_bytes"] / 2 ** 30 if train and train[0].get("peak_mem_bytes") else math.nan
        lines.append(Line("GMACs per image", method, row["label"], row["gflops"], macs,
                          source=fwd[0]["impl"] if fwd else "not measured"))
        lines.append(Line("training memory, GiB", method, row["label"], row["train_mem_gb"], mem,
                          source=f"{train[0]['impl']} ({train[0].get('peak_mem_method', '')}, batch "
                                 f"{train[0]['batch']})" if train else "not measured"))
    _ratios(lines, spec["reference_row"], higher_is_faster=True)  # value / MHA's: relative cost
    notes = _batch_notes(ok, "the paper: ImageNet training on GPUs") + [
        "ratios here are costs relative to full MHA (lower is cheaper); the paper's memory is a training run's, "
        "ours one training step's peak above what was held before it"]
    return [Table("mvitv2-attention", "MViTv2 attention ablation (ViT-B, 224 px)", "GMACs / GiB", lines,
                  kendall(lines), notes)] if any(ln.measured == ln.measured for ln in lines) else []


def _batch_notes(rows: list[dict[str, Any]], paper: str = "the paper: one V100, batch 64") -> list[str]:
    batches = sorted({int(r["batch"]) for r in rows if r.get("batch") == r.get("batch")})
    devices = sorted({str(r.get("device")) for r in rows})
    if not rows:
        return ["no measured rows"]
    return [f"measured on {', '.join(devices)} at batch {', '.join(map(str, batches))} ({paper})"]


def _num(v: float) -> str:
    if v != v:
        return "-"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def to_markdown(table: Table) -> str:
    """The table as Markdown: per column, paper and measured value with their ratios; tau per column."""
    out = [f"### {table.title}", "", f"Values in {table.unit}; ratio = speed relative to the paper's reference "
           "row (higher is faster).", "",
           "| column | method | paper | paper ratio | measured | measured ratio | measured as |",
           "|---|---|---|---|---|---|---|"]
    for ln in table.lines:
        out.append(f"| {ln.column} | {ln.label} | {_num(ln.paper)} | {_num(ln.paper_ratio)}x | {_num(ln.measured)} "
                   f"| {_num(ln.measured_ratio)}x | {ln.source} |")
    out += ["", "| column | Kendall's tau (paper vs measured order) | methods |", "|---|---|---|"]
    out += [f"| {col} | {tau:+.2f} | {n} |" for col, (tau, n) in table.tau.items()]
    out += [""] + [f"- {n}" for n in table.notes]
    return "\n".join(out) + "\n"


def ratio_grid(table: Table) -> str:
    """A compact Markdown grid: methods down, columns across, each cell 'paper -> measured' ratio."""
    columns = list(dict.fromkeys(ln.column for ln in table.lines))
    methods = list(dict.fromkeys(ln.method for ln in table.lines))
    cell = {(ln.method, ln.column): ln for ln in table.lines}
    labels = {ln.method: ln.label for ln in table.lines}
    out = ["| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for m in methods:
        out.append(f"| {labels[m]} | " + " | ".join(
            f"{_num(cell[m, c].paper_ratio)}x -> {_num(cell[m, c].measured_ratio)}x" if (m, c) in cell else "-"
            for c in columns) + " |")
    tau = " | ".join(f"{table.tau[c][0]:+.2f}" if c in table.tau else "-" for c in columns)
    out.append(f"| Kendall's tau | {tau} |")
    return "\n".join(out) + "\n"


def plot_table(table: Table, path: Path) -> Path:
    """Paper and measured speed ratios side by side, one panel per column (log axis, 2x marks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    columns = list(dict.fromkeys(ln.column for ln in table.lines))
    fig, axes = plt.subplots(1, len(columns), figsize=(max(3.2 * len(columns) + 1.5, 6.5), 4.4), dpi=150, squeeze=False,
                             sharey=True)
    ratios = [r for ln in table.lines for r in (ln.paper_ratio, ln.measured_ratio) if r == r and r > 0]
    lo, hi = (min(ratios), max(ratios)) if ratios else (0.5, 2.0)
    k_lo, k_hi = math.floor(math.log2(lo)), math.ceil(math.log2(hi))
    step = max(1, math.ceil((k_hi - k_lo) / 4))  # at most five labelled ticks a panel
    ticks = [2.0 ** k for k in range(k_hi, k_lo - step, -step)][::-1]
    for ax, column in zip(axes[0], columns):
        lines = [ln for ln in table.lines if ln.column == column]
        y = range(len(lines))
        ax.barh([i + 0.2 for i in y], [ln.paper_ratio for ln in lines], height=0.4, color="#9aa5b1", label="paper")
        ax.barh([i - 0.2 for i in y], [ln.measured_ratio if ln.measured_ratio == ln.measured_ratio else 0
                                       for ln in lines], height=0.4, color="#1f77b4", label="measured")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x" if v >= 1 else f"1/{round(1 / v)}x"))
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_xlim(ticks[0] / 1.15, ticks[-1] * 1.15)
        tau = table.tau.get(column)
        ax.set_title(f"{column}" + (f"\ntau = {tau[0]:+.2f}" if tau else ""), fontsize=9)
        ax.set_yticks(list(y), [ln.label for ln in lines], fontsize=8)
        ax.invert_yaxis()
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{table.title}\nspeed relative to the paper's reference row (higher is faster)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
