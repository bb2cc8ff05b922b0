"""Report (Markdown + one HTML file) and terminal tables from a stored results folder, without torch."""

import base64
import shutil
from html.parser import HTMLParser

import pytest

from attnbench.analysis.report import show_text, write_report
from attnbench.cli import main
from attnbench.errors import AttnbenchError
from conftest import PNG_MAGIC, ROOT, make_shape_run, make_sweep_run, run_without


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
