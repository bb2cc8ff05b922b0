"""Report (Markdown + one HTML file) and terminal tables from a stored results folder, without torch."""

import base64
import shutil
from html.parser import HTMLParser

import pytest

from attnbench.analysis.report import show_text, write_report
from attnbench.cli import main
from attnbench.errors import AttnbenchError
from conftest import PNG_MAGIC, ROOT, failed_statuses_run, make_shape_run, make_sweep_run, run_without


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.tags, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run_dir = make_sweep_run(tmp_path_factory.mktemp("rep") / "run")
    md, html = write_report(run_dir)
    return run_dir, md, html


def test_report_files_and_every_plot(report):
    run_dir, md, html = report
    assert md == run_dir / "report" / "report.md" and html == run_dir / "report" / "report.html"
    pngs = sorted((run_dir / "plots").glob("*.png"))
    assert len(pngs) == 7
    parser = _Collect()
    parser.feed(html.read_text())
    parser.close()
    assert {"html", "head", "body", "table", "h1", "h2"} <= set(parser.tags)
    embedded = {}
    for img in parser.imgs:
        src = img["src"]
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1])
        assert data[:8] == PNG_MAGIC
        embedded[img["alt"]] = data
    for p in pngs:  # every plot is in the one HTML file, byte for byte
        assert embedded[p.stem] == p.read_bytes()
    text = md.read_text()
    for p in pngs:  # and in the Markdown, next to a copy of the PNG
        assert f"]({p.name})" in text
        assert (md.parent / p.name).read_bytes() == p.read_bytes()


def test_report_contents(report):
    _, md, html = report
    text = md.read_text()
    page = html.read_text()
    for needle in ("## Environment", "Test CPU", "0.5 TFLOP/s", "## Latency, median ms",
                   "## Peak memory of one call, MiB",
                   "GFLOP", "img/s", "## Growth exponents", "## Speed-ups", "mha.sdpa over mha.math",
                   "## Cells to look at"):
        assert needle in text, needle
    # failed cells are listed, with their messages, in both files
    for doc in (text, page):
        assert "RuntimeError: toy failure on a wide grid" in doc
        assert "OutOfMemoryError" in doc
        assert "toy.fail 448px" in doc
        assert "predicted 9 s per call" in doc
        assert "skipped: resolution 512 was over_budget" in doc
        assert "noisy" in doc
    # failed cells show their status in the summary tables
    lat = text.split("## Latency")[1].split("##")[0]
    assert "| toy.oom | OOM |" in lat and "budget" in lat and "ERR" in lat
    # fitted exponents near the truth, next to the theory
    row = next(line for line in text.splitlines() if line.startswith("| mha.sdpa | float32"))
    k = float(row.split("|")[4].split("±")[0])
    assert abs(k - 2) < 0.15 and row.rstrip(" |").endswith("2")


def test_report_of_named_shapes(tmp_path):
    md, html = write_report(make_shape_run(tmp_path / "stages"))
    text = md.read_text()
    assert "| label | S1 | S2 | S3 | S4 |" in text
    assert "## Growth exponents" not in text  # not a resolution sweep
    assert "swin.shift_cyclic over swin.shift_pad (window=7)" in text
    assert "OOM" in text


def test_show_filters_and_units(report, capsys):
    run_dir, _, _ = report
    out = show_text(run_dir)
    for unit in ("ms", "MiB", "GFLOP", "img/s"):
        assert unit in out
    assert "OOM" in out and "budget" in out and "ERR" in out
    only = show_text(run_dir, impl="mha.*", resolution="448")
    assert "mha.math" in only and "mha.sdpa" in only and "swin" not in only and "toy" not in only
    assert "2 of" in only
    assert "swin.shift_pad" in show_text(run_dir, impl="swin.shift_pad(window=7)", dtype="float32", mode="forward")
    with pytest.raises(AttnbenchError, match="no cell"):
        show_text(run_dir, dtype="float16")
    assert main(["show", str(run_dir), "--impl", "local.*", "--resolution", "224"]) == 0
    printed = capsys.readouterr().out
    assert "local.im2col(kernel=3)" in printed and "mha" not in printed
    assert main(["show", str(run_dir), "--mode", "train"]) == 2
    assert main(["report", str(run_dir / "nothing")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_report_and_show_without_torch(tmp_path):
    ref = tmp_path / "local_attention"
    ref.mkdir()
    for name in ("rows.jsonl", "env.json", "suite.yaml"):
        shutil.copy(ROOT / "results" / "reference" / "local_attention-cpu" / name, ref / name)
    code = f"""
from attnbench.analysis.report import write_report, show_text
md, html = write_report({str(ref)!r})
print(show_text({str(ref)!r}, impl='local.im2col*'))
print(md, html)
"""
    r = run_without(code)
    assert r.returncode == 0, r.stderr
    assert "local.im2col(kernel=9)" in r.stdout
    html = (ref / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(list((ref / "plots").glob("*.png"))) == 7
    assert "roofline-float32-forward.png" in html
    assert "local.shift_dwconv over local.im2col (kernel=3)" in html


# --- statuses of isolated and picky runs: unsupported, timeout, crashed ------------------------------

@pytest.fixture(scope="module")
def statuses_run(tmp_path_factory):
    return failed_statuses_run(tmp_path_factory.mktemp("statuses") / "run")


def test_summary_shows_unsupported_timeout_and_crashed(statuses_run):
    from attnbench import load_results
    from attnbench.analysis.summary import attention_cells, summary_text

    df = load_results(statuses_run)
    text = summary_text(df)
    lat = text.split("peak memory")[0]
    assert "toy.hang" in lat and lat.count("timeout") == 3 and lat.count("crashed") == 3 and lat.count("n/a") == 1
    assert "cells: crashed 3, ok 13, timeout 3, unsupported 1" in text
    assert "timeout: toy.hang 384px (9216 tokens) float32 forward batch 1: the worker did not finish within 3 s" in text
    assert "crashed: toy.crash 448px (12544 tokens) float32 forward batch 1: the worker process died (signal 9)" in text
    assert "unsupported: toy.picky 320px (6400 tokens)" in text
    assert "skipped: 2 cell(s) not tried after a smaller resolution failed" in text
    cells = attention_cells(df)
    kinds = sorted((c["kind"], c["status"]) for c in cells)
    assert kinds == sorted([("failed", "timeout"), ("skipped", "timeout"), ("skipped", "timeout")]
                           + [("failed", "crashed")] * 3 + [("failed", "unsupported")])


def test_report_lists_unsupported_timeout_and_crashed(statuses_run):
    md, html = write_report(statuses_run)
    text, page = md.read_text(), html.read_text()
    lat = text.split("## Latency")[1].split("##")[0]
    assert "| toy.hang | 2 | 4.08 | timeout | timeout | timeout |" in lat
    assert "| toy.crash | 3 | 6.12 | crashed | crashed | crashed |" in lat
    assert "| toy.picky | 4 | n/a | 11.8 | 16 | 20.9 |" in lat
    assert "cells | 20: crashed 3, ok 13, timeout 3, unsupported 1" in text
    assert "5 failed, 2 not tried after a failure at a smaller size" in text
    failed = text.split("## Failed cells")[1].split("##")[0]
    assert "| timeout | toy.hang 384px" in failed and "the worker did not finish within 3 s and was killed" in failed
    assert failed.count("| crashed | toy.crash") == 3 and "the worker process died (signal 9)" in failed
    assert "| unsupported | toy.picky 320px" in failed and "grid 80x80 is not a multiple of 7" in failed
    not_tried = text.split("## Not tried")[1].split("##")[0]
    assert not_tried.count("skipped: resolution 384 was timeout") == 2
    for needle in ("the worker did not finish within 3 s and was killed", "the worker process died (signal 9)",
                   "grid 80x80 is not a multiple of 7", "skipped: resolution 384 was timeout"):
        assert needle in page
    assert page.count("data:image/png;base64,") == len(list((statuses_run / "plots").glob("*.png"))) > 0
