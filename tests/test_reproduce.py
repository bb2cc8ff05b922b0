"""`attnbench reproduce`: the paper's tables beside measured rows (ratios, rank order), the CPU cut of
its suites, and its errors."""

import math

import pytest

from attnbench.analysis import reproduce as R
from attnbench.reproduce import TARGETS, ReproduceError, suite_data, target
from conftest import make_row

PAPER = R.papers()


def _stage_rows(ms_by_impl):
    """Rows of the swin_table5 suite: impl -> [S1..S4 latency in ms]."""
    rows = []
    for impl, values in ms_by_impl.items():
        for i, ms in enumerate(values):
            rows.append(make_row(impl=impl, label=f"{impl}(w=7)", shape=f"S{i + 1}", latency_ms_median=ms,
                                 latency_ms_samples=[ms]))
    return rows


def test_table5_ratios_are_speeds_relative_to_window_attention():
    rows = _stage_rows({"swin.window": [2.0, 1.0, 1.0, 1.0], "swin.shift_cyclic": [4.0, 1.0, 1.0, 1.0],
                        "local.blocked": [8.0, 1.0, 1.0, 1.0], "local.flex": [5.0, 1.0, 1.0, 1.0]})
    (stages,) = R.swin_table5(rows, PAPER)
    s1 = {ln.method: ln for ln in stages.lines if ln.column == "S1"}
    assert s1["window"].measured_ratio == 1.0 and s1["window"].paper_ratio == 1.0
    assert s1["shift_cyclic"].measured_ratio == 0.5  # twice the window's time: half its speed
    assert s1["shift_cyclic"].paper_ratio == pytest.approx(2.8 / 3.0)
    assert s1["sliding_kernel"].measured == 5.0 and s1["sliding_kernel"].source == "local.flex(w=7)"  # the fastest
    assert math.isnan(s1["performer"].measured) and s1["performer"].source == "not measured"


def test_kendall_tau_reads_the_rank_order():
    same = _stage_rows({"swin.window": [2.8] * 4, "swin.shift_pad": [3.3] * 4, "swin.shift_cyclic": [3.0] * 4,
                        "local.im2col": [122.5] * 4})
    reversed_ = _stage_rows({"swin.window": [9.0] * 4, "swin.shift_pad": [1.0] * 4, "swin.shift_cyclic": [5.0] * 4,
                             "local.im2col": [0.5] * 4})
    assert R.swin_table5(same, PAPER)[0].tau["S1"] == (pytest.approx(1.0), 4)
    assert R.swin_table5(reversed_, PAPER)[0].tau["S1"] == (pytest.approx(-1.0), 4)


def test_table5_model_rows_match_by_attention_label():
    rows = [make_row(impl=impl, label=f"swin_tiny[{impl}]", model="swin_tiny_patch4_window7_224",
                     throughput_img_s=img_s)
            for impl, img_s in [("swin.window", 10.0), ("shifted=swin.shift_pad,window=swin.window", 8.0),
                                ("local.im2col(kernel=7)", 2.0)]]
    tables = R.swin_table5(rows, PAPER)
    assert [t.name for t in tables] == ["swin-table5-models"]  # no stage rows: no stage table
    tiny = {ln.method: ln for ln in tables[0].lines if ln.column == "swin_tiny_patch4_window7_224"}
    assert tiny["shift_pad"].measured_ratio == 0.8 and tiny["sliding_naive"].measured_ratio == 0.2
    assert tiny["shift_pad"].paper_ratio == pytest.approx(670 / 770)
    md = R.to_markdown(tables[0])
    assert "| swin_tiny_patch4_window7_224 | shifted window (padding) | 670 | 0.87x | 8 | 0.8x |" in md
    assert "0.87x -> 0.8x" in R.ratio_grid(tables[0])


def test_table8_relative_to_224_px():
    rows = [make_row(impl="timm", model="swin_tiny_patch4_window7_224", resolution=res, throughput_img_s=v)
            for res, v in [(224, 4.0), (256, 3.0), (384, 1.0)]]
    (table,) = R.swin_table8(rows, PAPER)
    by = {ln.method: ln for ln in table.lines}
    assert by["256"].measured_ratio == 0.75 and by["384"].measured_ratio == 0.25
    assert math.isnan(by["320"].measured) and table.tau["swin_tiny_patch4_window7_224"] == (pytest.approx(1.0), 3)
    assert {ln.column for ln in table.lines} == {"swin_tiny_patch4_window7_224"}  # models not measured are left out


def test_plot_is_written(tmp_path):
    (table,) = R.swin_table8([make_row(impl="timm", model="swin_tiny_patch4_window7_224", resolution=r,
                                       throughput_img_s=v) for r, v in [(224, 4.0), (256, 3.0)]], PAPER)
    path = R.plot_table(table, tmp_path / "t.png")
    assert path.stat().st_size > 10_000


def test_cpu_cut_of_the_suites():
    t = TARGETS["swin-table5"]
    gpu = suite_data(t, "swin_table5_models.yaml", "cuda")
    cpu = suite_data(t, "swin_table5_models.yaml", "cpu")
    assert gpu["batch"] == 64 and len(gpu["models"]) == 21
    assert cpu["batch"] == 1 and {m["model"] for m in cpu["models"]} == {"swin_tiny_patch4_window7_224"}
    assert len(cpu["models"]) == 7


def test_unknown_table_is_a_typed_error():
    with pytest.raises(ReproduceError, match="swin-table5"):
        target("swin-table9")


def _ms_rows(entries):
    return [make_row(impl=impl, label=impl, resolution=res, latency_ms_median=ms, latency_ms_samples=[ms],
                     params=params or {})
            for impl, res, ms, params in entries]


def test_nat_speed_relative_to_swin_shifted_windows():
    rows = _ms_rows([("swin.shift_cyclic", 224, 2.0, None), ("local.neighborhood_naive", 224, 10.0, None),
                     ("local.neighborhood", 224, 4.0, None), ("local.neighborhood_flex", 224, 1.6, None),
                     ("swin.shift_cyclic", 320, 3.0, None), ("local.neighborhood", 320, 6.0, None)])
    (table,) = R.nat_speed(rows, PAPER)
    by = {(ln.column, ln.method): ln for ln in table.lines}
    assert by["56x56 tokens", "unfold_naive"].paper_ratio == 0.13
    assert by["56x56 tokens", "unfold_naive"].measured_ratio == 0.2
    assert by["56x56 tokens", "natten_cuda"].measured_ratio == 1.25  # the fastest form: flex
    assert by["56x56 tokens", "natten_cuda"].source == "local.neighborhood_flex"
    assert ("80x80 tokens", "unfold_naive") not in by  # NATTEN gives no naive figure there
    assert by["80x80 tokens", "natten_cuda"].measured_ratio == 0.5


def test_slide_speed_per_kernel():
    rows = _ms_rows([("local.im2col", 224, 6.0, {"kernel": 3}), ("local.slide", 224, 2.0, {"kernel": 3}),
                     ("local.im2col", 224, 9.0, {"kernel": 5})])
    (table,) = R.slide_speed(rows, PAPER)
    assert [(ln.column, ln.method, ln.measured_ratio) for ln in table.lines] == [
        ("k=3, 224 px", "im2col", 1.0), ("k=3, 224 px", "slide", 3.0)]
    assert table.lines[1].paper_ratio == 3.9


def test_mvitv2_attention_costs_relative_to_mha():
    rows = []
    for impl, macs, mem in [("mha.sdpa", 17.6e9, 4 * 2**30), ("swin.window", 17.0e9, 3 * 2**30)]:
        rows.append(make_row(impl=impl, model="vit_base_patch16_224", macs_fvcore=2 * macs, batch=2))
        rows.append(make_row(impl=impl, model="vit_base_patch16_224", mode="train", peak_mem_bytes=mem, batch=2))
    (table,) = R.mvitv2_attention(rows, PAPER)
    by = {(ln.column, ln.method): ln for ln in table.lines}
    assert by["GMACs per image", "window"].measured == pytest.approx(17.0)
    assert by["GMACs per image", "window"].measured_ratio == pytest.approx(17.0 / 17.6)
    assert by["training memory, GiB", "window"].measured_ratio == 0.75
    assert by["training memory, GiB", "window"].paper_ratio == pytest.approx(9.7 / 12.4)
    assert math.isnan(by["GMACs per image", "hwin"].measured)
