"""The results store reads run folders without torch and summarises them."""

import json
import subprocess
import sys

from attnbench import store
from attnbench.analysis import summary
from conftest import ROOT


def _row(**kw):
    base = {"impl": "a.b", "label": "a.b", "family": "a", "resolution": 224, "shape": "", "tokens": 3136,
            "batch": 1, "dim": 96, "heads": 3, "dtype": "float32", "mode": "forward", "device": "cpu",
            "status": "ok", "message": "", "params": {"sr_ratio": 2}, "latency_ms_median": 1.5, "noisy": False,
            "peak_mem_bytes": 2**20, "flops_analytic": 2e9, "cell_id": "x", "latency_ms_samples": [1.4, 1.5, 1.6]}
    return {**base, **kw}


def _write(tmp_path, rows):
    with open(tmp_path / "rows.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return tmp_path


def test_load_results_columns_and_params(tmp_path):
    d = _write(tmp_path, [_row(), _row(resolution=320, status="oom", latency_ms_median=None, cell_id="y")])
    df = store.load_results(d)
    assert list(df.columns[:5]) == ["impl", "label", "family", "shape", "resolution"]
    assert "latency_ms_samples" not in df and "sr_ratio" in df and (df["sr_ratio"] == 2).all()
    assert "latency_ms_samples" in store.load_results(d, samples=True)
    text = summary.summary_text(df)
    assert "OOM" in text and "1.5" in text and "cells: ok 1, oom 1" in text


def test_summary_by_named_shape(tmp_path):
    rows = [_row(shape="S1", cell_id="1"), _row(shape="S2", dim=192, heads=6, resolution=224, cell_id="2",
                                                  latency_ms_median=0.7, noisy=True)]
    table = summary.table(store.load_results(_write(tmp_path, rows)), "latency_ms_median")
    assert list(table.columns) == ["S1", "S2"] and table.loc["a.b", "S2"] == "0.7~"


def test_store_needs_no_torch(tmp_path):
    d = _write(tmp_path, [_row()])
    code = ("import sys, attnbench; df = attnbench.load_results(sys.argv[1]); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(len(df))")
    r = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "1", r.stderr
