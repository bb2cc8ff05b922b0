"""The results store reads run folders without torch and summarises them."""

import pytest

from attnbench import store
from attnbench.analysis import summary
from conftest import make_row, run_without, write_run


def _row(**kw):
    return make_row(**{"params": {"sr_ratio": 2}, **kw})


def test_load_results_columns_and_params(tmp_path):
    d = write_run(tmp_path, [_row(cell_id="x"),
                             _row(resolution=320, status="oom", latency_ms_median=None, cell_id="y")])
    df = store.load_results(d)
    assert list(df.columns[:5]) == ["impl", "label", "family", "shape", "resolution"]
    assert "latency_ms_samples" not in df and "sr_ratio" in df and (df["sr_ratio"] == 2).all()
    assert "latency_ms_samples" in store.load_results(d, samples=True)
    text = summary.summary_text(df)
    assert "OOM" in text and "1.5" in text and "cells: ok 1, oom 1" in text


def test_summary_by_named_shape(tmp_path):
    rows = [_row(shape="S1", cell_id="1"), _row(shape="S2", dim=192, heads=6, resolution=224, cell_id="2",
                                                  latency_ms_median=0.7, noisy=True)]
    table = summary.table(store.load_results(write_run(tmp_path, rows)), "latency_ms_median")
    assert list(table.columns) == ["S1", "S2"] and table.loc["a.b", "S2"] == "700 µs~"


def test_store_needs_no_torch(tmp_path):
    d = write_run(tmp_path, [make_row()])
    r = run_without("import sys, attnbench; print(len(attnbench.load_results(sys.argv[1])))", d)
    assert r.returncode == 0 and r.stdout.strip() == "1", r.stderr


def test_run_without_blocks_imports():
    """The helper behind the no-torch tests: a blocked import fails, and so does code that only tries one."""
    for code in ("import torch", "import torch.nn", "try:\n    import torch\nexcept ImportError:\n    pass"):
        with pytest.raises(AssertionError, match="asked for"):
            run_without(code)
    with pytest.raises(AssertionError, match="matplotlib, from"):
        run_without("from matplotlib import pyplot", blocked=("torch", "matplotlib"))
    lenient = run_without("import matplotlib", blocked=("matplotlib",), strict=False)
    assert lenient.returncode == 1 and "ModuleNotFoundError" in lenient.stderr
    ok = run_without("import sys; print(sys.argv[1:]); sys.exit(3)", "a", 2)
    assert ok.returncode == 3 and ok.stdout == "['a', '2']\n"
