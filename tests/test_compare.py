"""`attnbench compare` on synthetic runs with planted changes: one real slowdown, one noise-only
difference, one FLOPs change, one cell on one side only, memory growth, a status change."""

import pytest

from attnbench.analysis import compare as cmp_mod
from attnbench.analysis.compare import compare_runs
from attnbench.analysis.gate import parse_fraction
from attnbench.cli import main
from conftest import planted_pair, run_without, write_run
from conftest import sampled_row as cell


def by_impl(cmp):
    return {c.base["impl"]: c for c in cmp.cells}


def test_planted_verdicts(tmp_path):
    base, new = planted_pair(tmp_path)
    cmp = compare_runs(base, new)
    cells = by_impl(cmp)
    slow = cells["mha.sdpa"].metric("latency_ms")
    assert slow.verdict == "slower" and slow.p_value < 1e-6 and slow.ratio == pytest.approx(1.3, rel=0.05)
    noise = cells["sra.conv"].metric("latency_ms")
    assert noise.verdict == "no significant change" and noise.ratio == pytest.approx(1.0, abs=0.05)
    flops = cells["swin.window"].metric("flops_analytic")
    assert flops.verdict == "changed" and flops.new - flops.base == 4096
    assert cells["swin.window"].metric("params_count").verdict == "equal"
    assert cells["swin.window"].metric("latency_ms").verdict == "no significant change"
    assert [label.split()[0] for _, label in cmp.only_base] == ["mvit.pool", "local.im2col"]
    assert [label.split()[0] for _, label in cmp.only_new] == ["local.slide"]
    assert cells["mha.math"].metric("peak_mem_bytes").verdict == "bigger"
    assert cells["swin.shift_pad"].metric("peak_mem_bytes").verdict == "no significant change"  # +300 KiB: floor
    status = cells["sra.linear"].metric("status")
    assert (status.base, status.new, status.verdict) == ("ok", "oom", "worse")
    assert cells["sra.linear"].metric("latency_ms") is None  # no samples on one side: no latency verdict


def test_faster_and_thresholds(tmp_path):
    base = write_run(tmp_path / "b", [cell("mha.sdpa", 224, 10.0, seed=1),
                                      cell("sra.conv", 224, 2.0, seed=2, n=400, sigma=0.02)])
    new = write_run(tmp_path / "n", [cell("mha.sdpa", 224, 7.0, seed=3),
                                     cell("sra.conv", 224, 2.06, seed=4, n=400, sigma=0.02)])
    cells = by_impl(compare_runs(base, new))
    assert cells["mha.sdpa"].metric("latency_ms").verdict == "faster"
    small = cells["sra.conv"].metric("latency_ms")  # a 3% shift: highly significant, below the 5% effect
    assert small.p_value < 1e-10 and small.verdict == "no significant change"
    cells = by_impl(compare_runs(base, new, min_effect=0.01))
    assert cells["sra.conv"].metric("latency_ms").verdict == "slower"


def test_few_samples_cannot_be_significant(tmp_path):
    base = write_run(tmp_path / "b", [cell("mha.sdpa", 224, 10.0, seed=1, n=3)])
    new = write_run(tmp_path / "n", [cell("mha.sdpa", 224, 20.0, seed=2, n=3)])
    m = compare_runs(base, new).cells[0].metric("latency_ms")
    assert m.ratio == pytest.approx(2.0, rel=0.1) and m.p_value >= 0.1 and m.verdict == "no significant change"
    assert "cannot reach" in m.note


def test_normalize_divides_out_a_uniformly_slower_machine(tmp_path):
    impls = ["mha.sdpa", "sra.conv", "swin.window", "mvit.pool", "local.im2col"]
    base = write_run(tmp_path / "b", [cell(i, 224, 5.0 + k, seed=k) for k, i in enumerate(impls)])
    # the whole machine 40% slower; mvit.pool 2.2x slower on top of it
    new = write_run(tmp_path / "n", [cell(i, 224, (5.0 + k) * 1.4 * (2.2 if i == "mvit.pool" else 1), seed=10 + k)
                                     for k, i in enumerate(impls)])
    plain = by_impl(compare_runs(base, new, normalize=False))
    assert all(c.metric("latency_ms").verdict == "slower" for c in plain.values())
    cmp = compare_runs(base, new)  # normalized by default
    assert cmp.speed_factor == pytest.approx(1.4, rel=0.05)
    norm = by_impl(cmp)
    assert norm["mvit.pool"].metric("latency_ms").verdict == "slower"
    assert norm["mvit.pool"].metric("latency_ms").ratio_normalized == pytest.approx(2.2, rel=0.05)
    assert {c.metric("latency_ms").verdict for i, c in norm.items() if i != "mvit.pool"} == {"no significant change"}


def test_cells_without_cell_id_match_on_their_fields(tmp_path):
    b, n = cell("mha.sdpa", 224, 10.0, seed=1), cell("mha.sdpa", 224, 10.0, seed=2)
    del b["cell_id"], n["cell_id"]
    other = cell("mha.sdpa", 224, 10.0, seed=3, params={"qkv_bias": False})
    del other["cell_id"]
    cmp = compare_runs(write_run(tmp_path / "b", [b]), write_run(tmp_path / "n", [n, other]))
    assert len(cmp.cells) == 1 and len(cmp.only_new) == 1


def test_identical_runs(tmp_path):
    rows = [cell("mha.sdpa", 224, 10.0, seed=1), cell("sra.conv", 224, 0, seed=2, status="over_budget")]
    cmp = compare_runs(write_run(tmp_path / "b", rows), write_run(tmp_path / "n", rows))
    assert cmp.significant() == [] and cmp.cells[0].metric("latency_ms").p_value == 1.0


@pytest.mark.parametrize("text,value", [("10%", 0.10), ("0.1", 0.10), ("50%", 0.5), ("150%", 1.5), ("0", 0.0),
                                        (" 5 % ".replace(" % ", "%"), 0.05)])
def test_parse_fraction(text, value):
    assert parse_fraction(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["10", "1.5", "ten", "-5%", "nan%", ""])
def test_parse_fraction_refuses(text):
    with pytest.raises(cmp_mod.CompareError):
        parse_fraction(text)


def test_compare_cli(tmp_path, capsys):
    base, new = planted_pair(tmp_path)
    assert main(["compare", str(base), str(new)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    i = next(k for k, line in enumerate(lines) if "mha.sdpa 224px" in line)
    assert lines[i].startswith("*") and "x1.29" in lines[i + 1] and lines[i + 1].endswith("slower")
    assert "flops_analytic 1,000,000,000 -> 1,000,004,096  changed" in out
    assert "only in base (2):" in out and "only in new (1):" in out and "local.slide 224px" in out
    assert "status    ok -> oom  worse" in out
    assert main(["compare", str(base), str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["compare", str(base), str(new), "--min-effect", "5"]) == 2
    assert "ambiguous" in capsys.readouterr().err


def test_compare_needs_no_torch(tmp_path):
    base, new = planted_pair(tmp_path)
    code = "import sys; from attnbench.cli import main; sys.exit(main(['compare', sys.argv[1], sys.argv[2]]))"
    r = run_without(code, base, new)
    assert r.returncode == 0, r.stderr
    assert "slower" in r.stdout


def test_statuses_of_isolated_and_picky_cells(tmp_path, capsys):
    """ok -> timeout, crashed or unsupported is worse (a regression); back to ok is better; one failure for
    another is a change; the same failure is equal. A failed side has no latency to compare."""
    pairs = {"a.ok_timeout": ("ok", "timeout"), "a.ok_crashed": ("ok", "crashed"),
             "a.ok_unsupported": ("ok", "unsupported"), "a.timeout_ok": ("timeout", "ok"),
             "a.timeout_crashed": ("timeout", "crashed"), "a.unsupported_same": ("unsupported", "unsupported")}
    base = write_run(tmp_path / "b", [cell(i, 224, 5.0, seed=k, status=sb) for k, (i, (sb, _)) in
                                      enumerate(pairs.items())])
    new = write_run(tmp_path / "n", [cell(i, 224, 5.0, seed=10 + k, status=sn) for k, (i, (_, sn)) in
                                     enumerate(pairs.items())])
    cells = by_impl(compare_runs(base, new))
    verdicts = {i: cells[i].metric("status").verdict for i in pairs}
    assert verdicts == {"a.ok_timeout": "worse", "a.ok_crashed": "worse", "a.ok_unsupported": "worse",
                        "a.timeout_ok": "better", "a.timeout_crashed": "changed", "a.unsupported_same": "equal"}
    assert all(cells[i].metric("latency_ms") is None for i in pairs)
    assert main(["compare", str(base), str(new)]) == 0  # compare reports; check judges
    out = capsys.readouterr().out
    for sb, sn, verdict in (("ok", "timeout", "worse"), ("ok", "crashed", "worse"), ("timeout", "ok", "better"),
                            ("timeout", "crashed", "changed")):
        assert f"status    {sb} -> {sn}  {verdict}" in out


def test_cells_of_two_gpu_models_are_never_compared_or_grouped(tmp_path):
    """Rows of one cluster from two GPU models keep their device key: compare matches no cell across
    them, and the loaded table groups them apart."""
    from attnbench import store
    from attnbench.analysis.compare import compare_runs
    from conftest import make_row, write_run

    a = write_run(tmp_path / "a", [make_row(impl="mha.sdpa", device="cuda", worker_gpu_name="NVIDIA H100",
                                            cell_id="x")])
    b = write_run(tmp_path / "b", [make_row(impl="mha.sdpa", device="cuda", worker_gpu_name="NVIDIA A100",
                                            cell_id="x")])
    result = compare_runs(a, b)
    assert not result.cells  # nothing matched: one GPU model on each side
    assert list(store.load_results(a)["device"]) == ["cuda [NVIDIA H100]"]
