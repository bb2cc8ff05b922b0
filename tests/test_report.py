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
    for needle in ("## Environment", "Test CPU", "0.500 TFLOP/s", "## Latency (median)",
                   "## Peak memory of one call",
                   "GFLOP", "img/s", "## Growth exponents", "## Speed-ups", "mha.sdpa over mha.math",
                   "## Cells to look at", "**Fastest at the largest size**", "[rows.csv](rows.csv)"):
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
    assert "| label | S1 · 56×56 tok · C96 h3 | S2 · 28×28 tok · C192 h6 |" in text  # the stages' shapes
    assert "**Fastest per stage**" in text
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
    assert "| toy.hang | **2.00 ms** | **4.08 ms** | timeout | timeout | timeout |" in lat  # best of a column: bold
    assert "| toy.crash | 3.00 ms | 6.12 ms | crashed | crashed | crashed |" in lat
    assert "| toy.picky | 4.00 ms | n/a | **11.8 ms** | **16.0 ms** | **20.9 ms** |" in lat
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


# --- numbers, the headline, the page, the raw data and the comparison of two runs --------------------

def test_numbers_formatted_in_one_place():
    from attnbench.analysis import fmt

    assert [fmt.sig(v) for v in (0.7, 1.5, 12.345, 999.7, 1894, 0.01234, 65536.2, 0)] == \
        ["0.700", "1.50", "12.3", "1,000", "1,890", "0.0123", "65,500", "0"]
    assert [fmt.ms(v) for v in (0.0123, 0.7, 24.94, 1894.0, 12345.0)] == \
        ["12.3 µs", "700 µs", "24.9 ms", "1.89 s", "12.3 s"]  # no 1.89e+03
    assert [fmt.nbytes(v) for v in (512 * 1024, 96 * 2 ** 20, 1.2 * 2 ** 30)] == ["512 KiB", "96.0 MiB", "1.20 GiB"]
    assert [fmt.flops(v) for v in (4.1e8, 1.234e9, 1.65e12)] == ["410 MFLOP", "1.23 GFLOP", "1.65 TFLOP"]
    assert fmt.times(0.25) == "0.250x" and fmt.spread(11.93, 12.81) == "11.9-12.8 ms"
    assert fmt.resolution_heading(224, 3136) == "224 px · 3,136 tok"
    assert fmt.shape_heading("S1", 56, 56, 96, 3) == "S1 · 56×56 tok · C96 h3"
    assert fmt.value("flops_analytic", float("nan")) == "-" and fmt.better("latency_ms_median") == "low"


def test_show_headings_and_best_marks(report):
    run_dir, _, _ = report
    out = show_text(run_dir, impl="mha.*")
    assert "224 px" in out and "3,136 tok" in out and "e+0" not in out
    lat = out.split("peak memory")[0]
    assert lat.count("*") >= 4  # mha.sdpa is the faster of the two at every measured size
    assert "best of its column" in out


def test_headline_answers(report):
    from attnbench.analysis import run as runs
    from attnbench.analysis.headline import headline

    run_dir, _, html = report
    h = headline(runs.load_run(run_dir))
    assert h.suite == "synth" and h.device == "CPU Test CPU, 2 threads" and h.total == 81
    assert dict(h.counts)["ok"] == 66 and h.counts[0][0] == "ok"
    answers = {a.title: a for a in h.answers}
    fastest = answers["Fastest at the largest size"].lines[0]
    assert fastest.startswith("at 1024 px (65,536 tokens): ") and "ms" in fastest
    pairs = "\n".join(answers["Speed-ups of the pairs (baseline / candidate latency)"].lines)
    assert "mha.sdpa over mha.math: " in pairs and " to " in pairs
    growth = "\n".join(answers["Latency growth, cost ~ N^k, against theory"].lines)
    assert "mha.sdpa 2.0" in growth and "(theory 2)" in growth
    distrust = answers["Cells to distrust"]
    assert distrust.warn and any("noisy" in x for x in distrust.lines)
    assert any("error" in x and "toy.fail 448px" in x for x in distrust.lines)
    page = html.read_text()
    assert page.index('id="headline"') < page.index("<table")  # the answers come before any table
    for anchor in ("latency", "memory", "exponents", "speedup", "roofline", "cells", "environment", "data"):
        assert f'<section id="{anchor}">' in page and f'href="#{anchor}"' in page
    assert '<meta name="viewport"' in page and '<div class="scroll">' in page
    assert page.index("<details><summary>device, software") > page.index('id="environment"')
    assert 'class="badge s-over_budget"' in page and 'class="best"' in page


def test_rows_one_click_away(report):
    import io

    import pandas as pd

    run_dir, md, html = report
    page = html.read_text()
    link = page.split('href="data:text/csv;base64,', 1)[1].split('"', 1)[0]
    df = pd.read_csv(io.StringIO(base64.b64decode(link).decode()))
    assert len(df) == 81 and {"label", "status", "latency_ms_median", "latency_ms_p10"} <= set(df.columns)
    assert (md.parent / "rows.csv").read_text() == base64.b64decode(link).decode()


def test_report_comparing_two_runs(tmp_path, capsys):
    a = make_sweep_run(tmp_path / "a", seed=0)
    b = make_sweep_run(tmp_path / "b", seed=1)
    assert main(["report", str(a), str(b)]) == 0
    path = b / "report" / "compare-a.html"
    assert str(path) in capsys.readouterr().out
    page = path.read_text()
    parser = _Collect()
    parser.feed(page)
    assert "synth vs synth" in page and 'id="headline"' in page and "cells matched" in page
    for section in ("Latency B / A", "Peak memory B / A", "Throughput B / A", "Verdicts"):
        assert section in page
    assert "224 px · 3,136 tok" in page and "x</td>" in page
    assert parser.imgs and all(i["src"].startswith("data:image/png;base64,") for i in parser.imgs)
    out = tmp_path / "cmp.html"
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0 and out.is_file()
    assert main(["report", str(a), str(tmp_path / "nothing")]) == 2


def test_whole_model_runs_get_a_macs_table(tmp_path):
    """Model cells have no analytic FLOPs: their report shows fvcore's MACs; attention runs do not get the section."""
    from conftest import make_row, write_run

    rows = [make_row(impl="timm", label=f"{m}[timm]", model=m, macs_fvcore=macs, flops_analytic=None, cell_id=m)
            for m, macs in [("swin_tiny_patch4_window7_224", 4.509e9), ("pvt_v2_b0", 5.72e8)]]
    md, _ = write_report(write_run(tmp_path / "models", rows))
    text = md.read_text()
    assert "## MACs of whole models" in text and "4.51 GMAC" in text and "572 MMAC" in text
    md2, _ = write_report(write_run(tmp_path / "attn", [make_row(impl="mha.sdpa", cell_id="a")]))
    assert "MACs of whole models" not in md2.read_text()
