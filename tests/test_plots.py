"""Plots from a stored results folder: no torch, failed cells marked, pairs matched, images valid."""

import shutil
from pathlib import Path

import pytest

from attnbench.analysis import plots
from attnbench.cli import main
from attnbench.errors import RunDirError
from conftest import (PNG_MAGIC, RESOLUTIONS, ROOT, SERIES, failed_statuses_run, make_shape_run, make_sweep_run,
                      run_without, suite_file)

@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    run_dir = make_sweep_run(tmp_path_factory.mktemp("synth") / "run")
    run = plots.load_run(run_dir)
    figs = {name: (fig, info) for name, fig, info in plots.build_figures(run)}
    return run_dir, run, figs


def test_figures_of_a_sweep(synth):
    _, _, figs = synth
    assert set(figs) == {f"{k}-float32-forward.png" for k in
                         ("latency", "memory", "flops", "throughput", "exponents", "speedup", "roofline")}
    for name, (fig, _info) in figs.items():
        ax = fig.axes[0]
        assert ax.get_xlabel() and ax.get_ylabel(), name  # units on both axes
        title = ax.get_title()
        assert "Test CPU" in title and "float32" in title and "forward" in title, name


def test_failed_cells_are_marked_not_dropped(synth):
    _, _, figs = synth
    marked = figs["latency-float32-forward.png"][1]["marked"]
    by = {(m["label"], m["tokens"]): m for m in marked}
    # over budget after measured cells: at the FLOP-predicted latency, for every resolution from 512 on
    for res in (512, 640, 1024):
        m = by[("mha.math", (res // 4) ** 2)]
        assert m["status"] == "over_budget" and m["placement"] == "predicted" and m["value"] > 0
    big = by[("mha.math", 256 ** 2)]["value"]
    assert big > by[("mha.math", 128 ** 2)]["value"] * 10  # quadratic growth predicted from FLOPs
    # oom everywhere (nothing to predict from) and an error: on the strip, still there
    assert sum(1 for m in marked if m["label"] == "toy.oom" and m["status"] == "oom") == len(RESOLUTIONS)
    assert by[("toy.fail", 112 ** 2)]["status"] == "error" and by[("toy.fail", 112 ** 2)]["placement"] == "strip"
    # FLOPs are counted for failed cells: the FLOPs curve keeps them
    fmarked = figs["flops-float32-forward.png"][1]["marked"]
    assert {m["placement"] for m in fmarked} == {"counted"}
    assert len(fmarked) == len(marked)
    # the legend names the statuses
    texts = {t.get_text() for t in figs["latency-float32-forward.png"][0].axes[0].get_legend().get_texts()}
    assert {"over budget", "oom", "error"} <= texts


def test_fits_in_the_legend(synth):
    _, run, figs = synth
    series = {s["label"]: s for s in figs["latency-float32-forward.png"][1]["series"]}
    assert series["mha.sdpa"]["fit"].k == pytest.approx(2.0, abs=0.15)
    assert series["swin.shift_cyclic(window=7)"]["fit"].k == pytest.approx(1.0, abs=0.15)
    assert series["mha.sdpa"]["theory"] == 2 and series["toy.oom"]["theory"] is None
    assert series["toy.oom"]["fit"] is None
    texts = [t.get_text() for t in figs["latency-float32-forward.png"][0].axes[0].get_legend().get_texts()]
    sdpa = [t for t in texts if t.startswith("mha.sdpa ")]
    assert sdpa and series["mha.sdpa"]["fit"].text() in sdpa[0] and "theory 2" in sdpa[0]


def test_colours_fixed_per_label(synth):
    _, run, figs = synth
    styles = run.styles
    assert set(styles) == {s[0] for s in SERIES}
    assert len({s.color for s in styles.values()}) == len(styles)  # distinct
    assert plots.label_styles(run.df) == styles  # deterministic
    # variants of one implementation share a hue family but differ
    assert styles["local.im2col(kernel=3)"].color != styles["local.im2col(kernel=5)"].color
    # every plot draws a label in its colour
    for name in ("latency-float32-forward.png", "memory-float32-forward.png", "speedup-float32-forward.png"):
        legend = figs[name][0].axes[0].get_legend()
        for text, handle in zip(legend.get_texts(), legend.legend_handles):
            label = text.get_text().split("   ")[0].split(" over ")[0]
            if label in styles:
                assert handle.get_color() == styles[label].color, (name, label)


def test_speedup_pairs(synth):
    _, run, _ = synth
    sp = plots.speedups(run)
    pairs = set(sp["pair"])
    assert "mha.sdpa over mha.math" in pairs
    assert "swin.shift_cyclic over swin.shift_pad (window=7)" in pairs
    assert "local.shift_dwconv over local.im2col (kernel=3)" in pairs
    assert "swin.shift_cyclic(window=7) over mha.sdpa" in pairs  # the suite's pair
    assert not any("kernel=5" in p for p in pairs)  # no shift_dwconv(kernel=5) in the run: not paired
    m = sp[sp["pair"] == "mha.sdpa over mha.math"]
    assert sorted(m["resolution"]) == [224, 320, 384, 448]  # mha.math over budget from 512: no speed-up there
    r = m.iloc[0]
    assert r["speedup"] == pytest.approx(r["latency_baseline_ms"] / r["latency_candidate_ms"])
    assert 3 < r["speedup"] < 5


def test_roofline_only_with_peaks(synth, tmp_path):
    _, run, figs = synth
    info = figs["roofline-float32-forward.png"][1]
    pts = info["points"]
    assert (pts["status"] == "ok").all() and len(pts) > 0
    row = pts.iloc[0]
    assert row["ai"] == pytest.approx(row["flops"] / (4 * (row["params_count"] + 2 * row["tokens"] * row["dim"])))
    assert info["peak_tflops"] == 0.5 and info["copy_gb_s"] == 20.0
    bare = plots.load_run(make_sweep_run(tmp_path / "nopeaks", peaks=False))
    assert not any(n.startswith("roofline") for n, _f, _i in plots.build_figures(bare))


def test_named_shapes_are_bars_not_lines(tmp_path):
    run = plots.load_run(make_shape_run(tmp_path / "stages"))
    assert run.by_shape
    figs = {n: (f, i) for n, f, i in plots.build_figures(run)}
    assert not any(n.startswith("exponents") for n in figs)
    assert "speedup-float32-forward.png" in figs and "roofline-float32-forward.png" in figs
    fig, info = figs["latency-float32-forward.png"]
    ax = fig.axes[0]
    assert len(ax.patches) == 11  # 3 x 4 stages, one out of memory
    assert [t.get_text().split("\n")[0] for t in ax.get_xticklabels()] == ["S1", "S2", "S3", "S4"]
    assert [m["status"] for m in info["marked"]] == ["oom"]
    assert len(info["series"]) == 3  # one series per label, although dim differs by stage


def test_not_a_run_folder(tmp_path, capsys):
    with pytest.raises(RunDirError):
        plots.plot_run(tmp_path)
    with pytest.raises(RunDirError):
        plots.plot_run(tmp_path / "missing")
    (tmp_path / "rows.jsonl").write_text("")
    with pytest.raises(RunDirError):
        plots.plot_run(tmp_path)
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def _check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5000, path
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 600 and height > 250, path


def test_plot_run_writes_pngs_without_torch(tmp_path):
    synth_dir = make_sweep_run(tmp_path / "synth")
    ref = tmp_path / "swin_shift"
    ref.mkdir()
    for name in ("rows.jsonl", "env.json", "suite.yaml"):
        shutil.copy(ROOT / "results" / "reference" / "swin_shift-cpu" / name, ref / name)
    code = f"""
from attnbench.analysis.plots import plot_run
for d in {[str(synth_dir), str(ref)]!r}:
    for p in plot_run(d):
        print(p)
"""
    r = run_without(code)
    assert r.returncode == 0, r.stderr
    paths = [Path(line) for line in r.stdout.splitlines() if line.endswith(".png")]
    assert len(paths) == 7 + 6  # the reference run measured the device's peaks: it has a roofline
    assert any(p.name.startswith("roofline") and p.parent.parent == ref for p in paths)
    for p in paths:
        _check_png(p)
    # a second call replaces, not accumulates
    assert sorted(p.name for p in (synth_dir / "plots").iterdir()) == sorted(p.name for p in paths
                                                                                if p.parent.parent == synth_dir)


def test_run_plots_at_the_end_and_a_plot_failure_only_warns(tmp_path, monkeypatch, capsys):
    suite = suite_file(tmp_path, ["toy.proj"], resolution=(32, 48, 64), filename="t.yaml")
    assert main(["run", str(suite), "--out", str(tmp_path / "ok"), "--no-progress"]) == 0
    assert "plots: 5 PNG(s)" in capsys.readouterr().out
    assert len(list((tmp_path / "ok" / "plots").glob("*.png"))) == 5

    def broken(run_dir):
        raise ValueError("broken plot")

    monkeypatch.setattr(plots, "plot_run", broken)
    assert main(["run", str(suite), "--out", str(tmp_path / "bad"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: plotting failed (ValueError: broken plot)" in err
    assert len((tmp_path / "bad" / "rows.jsonl").read_text().splitlines()) == 3


def test_unsupported_timeout_and_crashed_cells_are_marked(tmp_path):
    run_dir = failed_statuses_run(tmp_path / "statuses")
    run = plots.load_run(run_dir)
    figs = {name: (fig, info) for name, fig, info in plots.build_figures(run)}
    assert {"latency-float32-forward.png", "memory-float32-forward.png", "flops-float32-forward.png"} <= set(figs)
    marked = figs["latency-float32-forward.png"][1]["marked"]
    # nothing to predict a time-out, a crash or a refusal from: on the strip, each at its token count
    assert sorted((m["label"], m["tokens"], m["status"], m["placement"]) for m in marked) == sorted(
        [("toy.hang", (r // 4) ** 2, "timeout", "strip") for r in (384, 448, 512)]
        + [("toy.crash", (r // 4) ** 2, "crashed", "strip") for r in (384, 448, 512)]
        + [("toy.picky", 80 ** 2, "unsupported", "strip")])
    texts = {t.get_text() for t in figs["latency-float32-forward.png"][0].axes[0].get_legend().get_texts()}
    assert {"timeout", "crashed", "unsupported"} <= texts
    series = {s["label"]: s for s in figs["latency-float32-forward.png"][1]["series"]}
    assert series["toy.picky"]["fit"].k == pytest.approx(1.0, abs=0.05)  # fitted over its ok cells around the gap
    # FLOPs are counted for every cell: the failed ones are drawn where they are, hollow
    fmarked = figs["flops-float32-forward.png"][1]["marked"]
    assert len(fmarked) == 7 and {m["placement"] for m in fmarked} == {"counted"}
    pngs = plots.plot_run(run_dir)
    assert pngs and all(p.read_bytes()[:8] == PNG_MAGIC for p in pngs)


def test_figures_answer_at_a_glance(synth, tmp_path):
    from attnbench.analysis.draw import DPI, WIDTH_IN

    run_dir, run, figs = synth
    # speed-ups: several labelled ticks on the log axis, at readable ratios (0.25x, 0.5x, 1x, 2x, 4x ...)
    fig, _ = figs["speedup-float32-forward.png"]
    fig.canvas.draw()
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels() if t.get_text()]
    assert len(labels) >= 3 and "1x" in labels and all(lab.endswith("x") and "e" not in lab for lab in labels)
    assert plots.speedup_ticks(0.2, 5) == [0.25, 0.5, 1, 2, 4]
    # failed cells without a value sit in a band above the axes, not inside the data area
    fig, info = figs["memory-float32-forward.png"]
    assert any(m["placement"] == "strip" for m in info["marked"])
    main_ax = fig.axes[0]
    band = main_ax.child_axes[0]
    fig.canvas.draw()
    assert band.get_window_extent().y0 >= main_ax.get_window_extent().y1
    assert all(ln.get_xydata()[:, 1].min() >= 0 for ln in band.lines) and band.lines
    # the roofline says which FLOP count it uses: the analytic one of the FLOPs table, in forward mode
    fig, info = figs["roofline-float32-forward.png"]
    assert info["flops"] == "flops_analytic"
    assert any("FLOPs: analytic" in t.get_text() for t in fig.axes[0].texts)
    pts = info["points"]
    assert (pts["flops"] == pts["flops_analytic"]).all()
    assert not [t for t in fig.axes[0].texts if "bandwidth" in t.get_text()]  # ceilings named in the legend
    # legible legends, one width, 2x resolution
    for name, (fig, _i) in figs.items():
        legend = fig.axes[0].get_legend()
        assert legend is None or min(t.get_fontsize() for t in legend.get_texts()) >= 9, name
    widths = set()
    for p in plots.plot_run(run_dir):
        data = p.read_bytes()
        widths.add(int.from_bytes(data[16:20], "big"))
    assert widths == {int(WIDTH_IN * DPI)} and DPI >= 200
