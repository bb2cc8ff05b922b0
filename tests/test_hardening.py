"""What a new user broke in one afternoon (issue 12), each with a test that fails without its fix.
The bad inputs that must give exit 2 are in test_bad_input.py."""


import pytest

import attnbench
from attnbench import store
from attnbench.cli import main
from attnbench.runner import run_suite
from conftest import make_suite, suite_file


def test_a_torn_last_line_is_reported_by_show_and_resume(tmp_path, capsys):
    path = suite_file(tmp_path, ["toy.proj"], resolution=(32, 48))
    assert main(["run", str(path), "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    rows_path = tmp_path / "r" / "rows.jsonl"
    lines = rows_path.read_text().splitlines(keepends=True)
    rows_path.write_text(lines[0] + lines[1][:40])  # killed while writing the second cell
    capsys.readouterr()
    assert store.torn_last_line(tmp_path / "r")
    assert main(["show", str(tmp_path / "r")]) == 0
    shown = capsys.readouterr().out
    assert "1 of 1 cells" in shown and "cut mid-write" in shown and "--resume" in shown
    assert main(["run", str(path), "--out", str(tmp_path / "r"), "--resume", "--no-progress"]) == 0
    assert "cut mid-write" in capsys.readouterr().err
    assert not store.torn_last_line(tmp_path / "r") and len(store.read_rows(tmp_path / "r")) == 2


def test_an_output_of_the_wrong_shape_is_an_error_cell(tmp_path):
    row = run_suite(make_suite(["toy.flat"]), out=tmp_path / "r", progress=False).rows[0]
    assert row["status"] == "error"
    assert "(1, 64, 16)" in row["message"] and "(B, H', W', C) = (1, 8, 8, 16)" in row["message"]


def test_pooled_outputs_meet_their_declared_size(tmp_path):
    row = run_suite(make_suite([{"mvit.pool": {"stride_q": 2}}], resolution=(32,)), out=tmp_path / "r",
                    progress=False).rows[0]
    assert row["status"] == "ok"


def test_skipped_cells_are_not_counted_as_measured(tmp_path):
    res = run_suite(make_suite(["toy.oom"], resolution=(32, 48, 64, 80)), out=tmp_path / "r", progress=False)
    assert [r["status"] for r in res.rows] == ["ok", "oom", "oom", "oom"]  # 64 and 80 px: not tried
    assert res.measured == 2 and res.skipped == 2
    assert res.overhead["cells_measured"] == 2 and res.overhead["cells_skipped"] == 2


def test_progress_lines_when_not_on_a_terminal(tmp_path, capsys):
    path = suite_file(tmp_path, ["toy.proj"], resolution=(32, 48))
    assert main(["run", str(path), "--out", str(tmp_path / "r")]) == 0  # pytest's stderr is not a terminal
    err = capsys.readouterr().err
    assert "[1/2] toy.proj 32px float32 forward:" in err and "[2/2] toy.proj 48px" in err
    assert main(["run", str(path), "--out", str(tmp_path / "quiet"), "--no-progress"]) == 0
    assert "[1/2]" not in capsys.readouterr().err


def test_help_describes_the_tool_and_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "vision transformers" in text and "argument parsing" not in text
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"attnbench {attnbench.__version__}"


def test_list_shows_effective_defaults(capsys):
    assert main(["list", "swin.shift*"]) == 0
    out = capsys.readouterr().out
    assert "shift=window // 2" in out and "shift=-1" not in out


def test_a_resumed_run_accepts_added_cells(tmp_path):
    first = make_suite(["toy.proj"], resolution=(32,))
    run_suite(first, out=tmp_path / "r", progress=False)
    more = make_suite(["toy.proj", "mha.sdpa"], resolution=(32, 48))
    res = run_suite(more, out=tmp_path / "r", resume=True, progress=False)
    assert res.reused == 1 and res.measured == 3


def test_a_first_cell_too_large_for_memory_is_over_budget_before_it_runs(tmp_path, monkeypatch):
    from attnbench.measure import memory

    calls = []
    monkeypatch.setattr(memory, "available_memory_bytes", lambda device: 64 * 2**20)  # a 64 MiB machine
    real = memory.peak_memory_bytes
    monkeypatch.setattr(memory, "peak_memory_bytes", lambda fn, device: calls.append(1) or real(fn, device))
    # mha.math at 64 x 64 tokens: 4096^2 float32 attention matrices per head, about 200 MB a call
    rows = run_suite(make_suite(["mha.math", "mha.sdpa"], resolution=(256,), dim=48, heads=3), out=tmp_path / "r",
                     progress=False).rows
    math_row, sdpa_row = rows
    assert math_row["status"] == "over_budget" and "traced on the meta device" in math_row["message"]
    assert math_row["peak_mem_predicted_bytes"] > 3 * 4096 ** 2 * 4 and "measure_s" not in math_row
    assert sdpa_row["status"] == "ok" and sdpa_row["peak_mem_predicted_bytes"] < 64 * 2**20 * 0.6
    assert len(calls) == 1  # only the fused cell ran
