"""`attnbench history` and `publish`: runs recorded per commit, a cell's series queried from the index,
change points where a level really moves (latency, memory beyond the method's resolution, FLOPs), a
self-contained dashboard of every cell, and bad input as exit 2."""

import json

import numpy as np
import pytest

from attnbench.analysis import history
from attnbench.cli import main
from conftest import SYNTH_ENV, run_without, write_run
from conftest import sampled_row as cell

MIB = 2**20
IMPLS = ["mha.sdpa", "sra.conv", "swin.window", "mvit.pool"]


def _commit(i: int) -> str:
    return f"{i:02d}" + "ab" * 19


def record_history(tmp_path, n=7, runs_per_commit=1):
    """``n`` commits: mha.sdpa 1.5x slower from commit 4 on; swin.window counts more FLOPs from commit 3;
    mvit.pool grows by an N x N buffer (12 MiB) from commit 5; sra.conv only noise (+-5% run to run)."""
    root = tmp_path / "history"
    rng = np.random.default_rng(0)
    for i in range(n):
        for j in range(runs_per_commit):
            rows = []
            for k, impl in enumerate(IMPLS):
                ms = (2.0 + k) * float(np.exp(rng.uniform(-0.05, 0.05)))
                ms *= 1.5 if impl == "mha.sdpa" and i >= 4 else 1.0
                flops = 10**9 + (4096 if impl == "swin.window" and i >= 3 else 0)
                mem = (4 + k) * MIB + rng.uniform(-1, 1) * MIB + (12 * MIB if impl == "mvit.pool" and i >= 5 else 0)
                rows.append(cell(impl, 128, ms, seed=100 * i + 10 * j + k, sigma=0.03, flops=flops, mem=mem))
            env = {**SYNTH_ENV, "git": {"commit": _commit(i), "dirty": False}}
            run = write_run(tmp_path / "runs" / f"c{i}-{j}", rows, env=env)
            history.record(run, root=root, commit_time=1_700_000_000 + 3600 * i, subject=f"commit {i}")
    return root


def by_impl(found):
    return {s.label.split()[0]: s for s in found}


def test_record_query_and_change_points(tmp_path):
    root = record_history(tmp_path)
    files = sorted((root / "runs" / "cpu-amd-epyc-1t").glob("*.json"))
    assert len(files) == 7 and json.loads(files[0].read_text())["commit"] == _commit(0)
    index = json.loads((root / "index.json").read_text())
    assert len(index["runs"]) == 7 and {r["env_key"] for r in index["runs"]} == {history.env_key(SYNTH_ENV)}
    found = by_impl(history.series(root))
    assert set(found) == set(IMPLS)
    sdpa = found["mha.sdpa"]
    assert [p.commit for p in sdpa.points] == [_commit(i) for i in range(7)]
    assert sdpa.changes["latency_ms_median"] == [4]
    assert sdpa.changes["peak_mem_bytes"] == [] and sdpa.changes["flops_analytic"] == []
    assert found["swin.window"].changes == {"latency_ms_median": [], "peak_mem_bytes": [], "flops_analytic": [3]}
    assert found["mvit.pool"].changes["peak_mem_bytes"] == [5]  # 12 MiB: beyond the resident set's 6 MiB
    assert found["mvit.pool"].changes["latency_ms_median"] == []
    assert found["sra.conv"].changes == {"latency_ms_median": [], "peak_mem_bytes": [], "flops_analytic": []}
    # a pattern selects cells; the text marks the change
    only = history.series(root, cell="mha.sdpa*")
    assert len(only) == 1
    text = history.series_text(only[0])
    assert "change points: latency at " + _commit(4)[:12] in text and "*" in text.splitlines()[6]


def test_several_runs_of_a_commit_are_one_point_and_the_index_rebuilds(tmp_path):
    root = record_history(tmp_path, n=5, runs_per_commit=2)
    sdpa = history.series(root, cell="mha.sdpa*")[0]
    assert len(sdpa.points) == 5 and all(p.runs == 2 for p in sdpa.points)
    assert sdpa.changes["latency_ms_median"] == [4]
    (root / "index.json").unlink()
    assert len(history.load_index(root)["runs"]) == 10  # rebuilt from the run files
    assert main(["history", "rebuild", "--root", str(root)]) == 0


def test_change_points_method():
    flat = [10.0, 10.4, 9.8, 10.1, 9.9, 10.2]
    assert history.change_points(flat, np.log(1.15)) == []
    step = flat + [13.0, 13.2, 12.9]
    assert history.change_points(step, np.log(1.15)) == [6]
    spike = [10.0, 10.2, 25.0, 9.9, 10.1, 10.0]  # one bad commit in the middle is not a new level
    assert history.change_points(spike, np.log(1.15)) == []
    two = [5.0] * 4 + [8.0] * 4 + [4.0] * 4
    assert history.change_points(two, np.log(1.15)) == [4, 8]
    assert history.change_points([None, 5.0, None, 5.0], 0.1) == []


def test_cli_show_plot_and_publish_every_cell(tmp_path, capsys):
    root = record_history(tmp_path)
    assert main(["history", "show", "mha.sdpa*", "--root", str(root), "--plot", str(tmp_path / "sdpa.png")]) == 0
    out = capsys.readouterr().out
    assert "latency ms" in out and "change points: latency at" in out
    assert (tmp_path / "sdpa.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["history", "show", "--root", str(root), "--plot", str(tmp_path / "all")]) == 0
    assert len(list((tmp_path / "all").glob("*.png"))) == len(IMPLS)
    assert main(["publish", "--root", str(root), "--out", str(tmp_path / "site")]) == 0
    page = (tmp_path / "site" / "index.html").read_text()
    for s in history.series(root):
        assert s.label in page
    assert page.count("data:image/png;base64,") == len(IMPLS) and "&#9650;" in page
    assert "<script" not in page and "http" not in page.replace("http-equiv", "")  # self-contained


def test_bad_input_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["history", "record", str(tmp_path / "empty"), "--root", str(tmp_path / "h")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    no_git = write_run(tmp_path / "nogit", [cell("mha.sdpa", 128, 2.0, seed=1)])
    assert main(["history", "record", str(no_git), "--root", str(tmp_path / "h")]) == 2
    assert "no git commit" in capsys.readouterr().err
    assert main(["history", "record", str(no_git), "--root", str(tmp_path / "h"), "--commit", "abc123"]) == 0
    assert main(["history", "show", "--root", str(tmp_path / "nowhere")]) == 2
    assert "no history at" in capsys.readouterr().err
    assert main(["history", "show", "nomatch*", "--root", str(tmp_path / "h")]) == 2
    assert "no recorded cell matches" in capsys.readouterr().err
    (tmp_path / "h" / "index.json").write_text("{not json")
    assert main(["history", "show", "--root", str(tmp_path / "h")]) == 2
    assert "damaged" in capsys.readouterr().err
    (tmp_path / "h" / "index.json").write_text(json.dumps({"version": 99, "runs": []}))
    assert main(["publish", "--root", str(tmp_path / "h")]) == 2
    assert "newer attnbench" in capsys.readouterr().err


def test_history_needs_no_torch(tmp_path):
    root = record_history(tmp_path, n=3)
    code = ("import sys; from attnbench.cli import main; "
            "sys.exit(main(['history', 'show', 'mha.sdpa*', '--root', sys.argv[1]]))")
    r = run_without(code, root)
    assert r.returncode == 0, r.stderr
    assert "mha.sdpa" in r.stdout


@pytest.mark.parametrize("value", [None, "x"])
def test_env_key_is_stable(value):
    env = {**SYNTH_ENV, "extra": value}
    assert history.env_key(env) == history.env_key(SYNTH_ENV)
    assert history.env_key({**SYNTH_ENV, "torch": {"version": "2.16.0", "num_threads": 1}}) != history.env_key(SYNTH_ENV)
