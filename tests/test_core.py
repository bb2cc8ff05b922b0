"""The measurement core's structure: one job description for both paths, one row schema, the analysed
run apart from its figures, the declared implementation contract, the explicit CLI."""

import json
import sys

import numpy as np
import pytest

import attnbench
from attnbench import budget, cell, registry, schema, store
from attnbench.cli import main
from attnbench.errors import RegistryError, RunDirError
from attnbench.job import CellSettings, Job
from attnbench.measurement import Latency
from attnbench.runner import prepare, run_suite
from conftest import ROOT, make_row, make_suite, run_without, write_run


# --- schema -------------------------------------------------------------------------------------------

def test_status_values_are_the_strings_rows_hold():
    assert [s.value for s in schema.Status] == ["ok", "oom", "over_budget", "unsupported", "error", "timeout",
                                                "crashed"]
    assert schema.Status.OK == "ok" and json.dumps(schema.Status.OOM) == '"oom"'
    assert schema.status_word("over_budget") == "budget" and schema.status_word("weird") == "weird"


def test_one_cell_identity_for_cases_and_rows(tmp_path):
    suite, _dev, cases = prepare(make_suite(["toy.proj"], resolution=(32, 48)))
    rows = run_suite(suite, out=tmp_path / "r", progress=False).rows
    for case, row in zip(cases, rows):
        assert row["cell_id"] == case.cell_id == schema.cell_id(row) == schema.cell_id({**row, "params": {}})
        without = {k: v for k, v in row.items() if k != "cell_id"}
        assert schema.row_key(without) == case.cell_id  # rows without a cell_id are keyed the same way
    other = dict(rows[0], batch=2)
    assert schema.cell_id(other) != rows[0]["cell_id"]


def test_every_written_column_is_declared(tmp_path):
    rows = run_suite(make_suite(["toy.proj", "toy.picky"]), out=tmp_path / "r", progress=False).rows
    undeclared = {k for r in rows for k in r if k not in schema.BY_NAME and not k.startswith(("gpu_before_",
                                                                                                "gpu_after_"))}
    assert undeclared == set()
    assert set(schema.group(schema.LATENCY)) >= set(Latency((1.0, 2.0)).columns())


def test_rows_from_a_newer_schema_are_refused_and_older_ones_load(tmp_path):
    old = make_row()
    old.pop("schema_version", None)
    write_run(tmp_path / "old", [old])
    assert len(store.read_rows(tmp_path / "old")) == 1
    write_run(tmp_path / "new", [make_row(schema_version=schema.SCHEMA_VERSION + 1)])
    with pytest.raises(RunDirError, match="newer than this attnbench"):
        store.read_rows(tmp_path / "new")
    assert main(["show", str(tmp_path / "new")]) == 2


def test_committed_results_load(capsys):
    folders = [p.parent for p in (ROOT / "results").rglob("rows.jsonl")]
    assert len(folders) >= 5
    for folder in folders:
        df = attnbench.load_results(folder)
        assert len(df) and set(df["status"]) <= {s.value for s in schema.Status}


# --- latency measurement -----------------------------------------------------------------------------

def test_latency_statistics_from_the_samples():
    rng = np.random.default_rng(0)
    samples = tuple(float(v) for v in rng.lognormal(0, 0.3, size=37))
    lat = Latency(samples, "perf_counter", False)
    cols = lat.columns()
    p10, p25, p50, p75, p90 = np.percentile(samples, [10, 25, 50, 75, 90])
    assert cols["latency_ms_median"] == pytest.approx(p50) and cols["latency_ms_iqr"] == pytest.approx(p75 - p25)
    assert cols["latency_ms_p10"] == pytest.approx(p10) and cols["latency_ms_p90"] == pytest.approx(p90)
    assert cols["latency_n"] == 37 and cols["noisy"] == ((p75 - p25) / p50 > 0.10)
    back = Latency.from_row({**cols, "latency_ms_samples": list(samples) + [None, float("nan")]})
    assert back == lat and back.median == lat.median
    assert Latency.from_row({"latency_ms_median": 3.0}) is None
    with pytest.raises(ValueError):
        Latency(())


# --- the budget rule, shared ----------------------------------------------------------------------------

def test_plots_predict_failed_cells_with_the_runners_rule():
    from attnbench.analysis.run import METRICS, predicted
    import pandas as pd

    rows = pd.DataFrame([
        {"status": "ok", "latency_ms_median": 10.0, "flops_analytic": 1e9, "batch": 1},
        {"status": "over_budget", "latency_ms_median": float("nan"), "flops_analytic": 3e9, "batch": 1},
    ])
    assert predicted(rows, METRICS["latency"]) == {1: budget.predict_latency_ms(10.0, 1e9, 3e9)} == {1: 30.0}
    prior = budget.Prior(224, 3136, 1e9, 10.0, 2**20)
    assert budget.time_problem(prior, 3e9, 6, 0.1) is not None and budget.time_problem(prior, 3e9, 6, 1.0) is None
    assert budget.memory_problem(prior, 3136 * 4, 15 * 2**20) is not None  # 16x tokens^2 scaling


# --- one job description for both paths ------------------------------------------------------------------

def test_a_worker_applies_the_jobs_process_wide_settings(monkeypatch):
    seen = []
    monkeypatch.setattr(cell, "apply_globals", lambda threads, tf32, device: seen.append((threads, tf32, device.type)))
    monkeypatch.setattr(cell, "measure_cell", lambda job: {"status": "ok"})
    _suite, _dev, cases = prepare(make_suite(["toy.proj"]))
    settings = CellSettings(threads=1, tf32=True)
    assert cell.run_job(Job(case=cases[0], settings=settings)) == {"status": "ok"}
    assert seen == [(1, True, "cpu")]


def test_the_isolated_worker_measures_the_same_job(tmp_path):
    s = make_suite(["toy.proj"], isolation="process", threads=1)
    row = run_suite(s, out=tmp_path / "r", progress=False).rows[0]
    assert row["status"] == "ok" and row["isolation"] == "process" and row["cpu_threads"] == 1


# --- resume --------------------------------------------------------------------------------------------

def test_resume_refuses_a_folder_from_another_environment(tmp_path, capsys):
    s = make_suite(["toy.proj"], resolution=(32, 48))
    res = run_suite(s, out=tmp_path / "r", only="toy.proj", progress=False)
    env_path = res.run_dir / "env.json"
    env = json.loads(env_path.read_text())
    env["torch"]["version"] = "0.0.1"
    env_path.write_text(json.dumps(env))
    with pytest.raises(RunDirError, match="torch 0.0.1 \\(earlier session\\)"):
        run_suite(s, out=tmp_path / "r", resume=True, progress=False)
    lines_before = (res.run_dir / "rows.jsonl").read_text()
    suite_path = tmp_path / "s.json"
    suite_path.write_text(json.dumps(s.raw))
    assert main(["run", str(suite_path), "--out", str(tmp_path / "r"), "--resume", "--no-progress"]) == 2
    assert "another environment" in capsys.readouterr().err
    assert (res.run_dir / "rows.jsonl").read_text() == lines_before  # nothing appended


# --- analysis without matplotlib ---------------------------------------------------------------------

def test_show_and_report_tables_do_not_import_matplotlib():
    run_dir = str(ROOT / "results" / "reference" / "resolution_sweep-cpu")
    code = ("import sys\n"
            "from attnbench.analysis import report, run\n"
            "from attnbench.cli import main\n"
            "assert main(['show', sys.argv[1]]) == 0\n"
            "r = run.load_run(sys.argv[1])\n"
            "report.exponent_table(r); report.speedup_table(r); run.speedups(r); run.roofline_points(r, r.df)\n")
    out = run_without(code, run_dir, blocked=("torch", "matplotlib"))
    assert out.returncode == 0, out.stderr
    assert "latency, median ms" in out.stdout


# --- the implementation contract ------------------------------------------------------------------------

def test_optional_methods_are_resolved_at_registration():
    assert registry.OPTIONAL_METHODS == ("flops_analytic", "supports", "supports_device", "reparameterize",
                                         "output_size")
    assert attnbench.get_spec("swin.window_flex").has("supports_device")
    assert not attnbench.get_spec("swin.window").has("supports_device")
    assert attnbench.get_spec("local.slide").has("reparameterize")
    assert not attnbench.get_spec("local.shift_dwconv").has("reparameterize")
    assert attnbench.get_spec("mvit.pool").has("output_size")
    assert all(s.has("flops_analytic") for s in attnbench.specs().values() if s.source == "builtin")
    with pytest.raises(KeyError, match="not an optional method"):
        attnbench.get_spec("mha.sdpa").has("backward")
    with pytest.raises(RegistryError, match="no forward"):
        @attnbench.register("bad.noforward")
        class NoForward:
            def __init__(self, dim, heads):
                pass


# --- the CLI's commands --------------------------------------------------------------------------------

def test_a_command_module_that_fails_to_import_is_an_error(monkeypatch):
    from attnbench import cli

    monkeypatch.setitem(sys.modules, "attnbench.cli_regress", None)  # import fails
    monkeypatch.delattr(sys.modules["attnbench"], "cli_regress", raising=False)
    with pytest.raises(ImportError):
        cli.build_parser()


def test_a_declared_column_flows_to_store_baselines_compare_and_report(tmp_path):
    from attnbench.analysis import baseline, compare, gate, summary

    s = make_suite(["toy.proj"], resolution=(32, 48))
    a = run_suite(s, out=tmp_path / "a", progress=False)
    b = run_suite(s, out=tmp_path / "b", progress=False)
    row = a.rows[0]
    assert row["latency_cv"] == pytest.approx(np.std(row["latency_ms_samples"]) / np.mean(row["latency_ms_samples"]))
    assert "latency_cv" in attnbench.load_results(a.run_dir).columns
    assert "latency_cv" in baseline.compact_row(row)
    cmp = compare.compare_runs(a.run_dir, b.run_dir)
    shown = cmp.cells[0].metric("latency_cv")
    assert shown is not None and shown.verdict == compare.SHOWN and not shown.significant
    assert "latency_cv" in gate.comparison_text(cmp, verbose=True)
    assert "coefficient of variation" in summary.summary_text(attnbench.load_results(a.run_dir))


def test_a_run_of_one_point_per_series_draws_no_figure(tmp_path, capsys):
    from attnbench.analysis import run as runs
    from conftest import suite_file

    path = suite_file(tmp_path, ["toy.proj"], resolution=(32,), measure_peaks=True)
    assert main(["run", str(path), "--out", str(tmp_path / "one"), "--no-progress"]) == 0
    assert "plots: none" in capsys.readouterr().out
    assert runs.figure_plan(runs.load_run(tmp_path / "one")) == []  # one cell: no curve, one roofline point
    path = suite_file(tmp_path, ["toy.proj", "mha.sdpa"], resolution=(32,), filename="pair.yaml", measure_peaks=True)
    assert main(["run", str(path), "--out", str(tmp_path / "pair"), "--no-progress"]) == 0
    assert [p[1] for p in runs.figure_plan(runs.load_run(tmp_path / "pair"))] == ["roofline"]  # two designs
    path = suite_file(tmp_path, ["toy.proj"], resolution=(32, 48), filename="two.yaml", measure_peaks=True)
    assert main(["run", str(path), "--out", str(tmp_path / "two"), "--no-progress"]) == 0
    kinds = [kind for _name, kind, _d, _m in runs.figure_plan(runs.load_run(tmp_path / "two"))]
    assert kinds == ["latency", "memory", "flops", "throughput", "exponents", "roofline"]
    assert sorted(p.name for p in (tmp_path / "two" / "plots").glob("*.png")) == sorted(
        n for n, *_ in runs.figure_plan(runs.load_run(tmp_path / "two")))
