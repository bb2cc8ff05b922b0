"""The HTML report in a real browser: headless Chromium at desktop (1400 px) and phone (420 px) width.

Checks what a reader meets: the page does not scroll sideways (tables scroll in their own box), the
console stays free of errors, the headline is there, every image loaded. The report is loaded in an
iframe of the exact width (a headless window cannot be narrower than 500 px); a probe script injected
at the top of a copy of the report measures it and posts the result to the wrapper page, whose DOM
Chromium dumps.

Skips, saying so, where no Chromium is installed (``apt-get install chromium``; or point
``ATTNBENCH_CHROMIUM`` at a Chrome/Chromium binary).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from attnbench.analysis.report import write_report
from conftest import make_shape_run, make_sweep_run

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _browser() -> str | None:
    env = os.environ.get("ATTNBENCH_CHROMIUM")
    if env:
        return env if Path(env).is_file() else shutil.which(env)
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


BROWSER = _browser()
pytestmark = pytest.mark.skipif(
    BROWSER is None, reason="no headless Chromium to render the report in (looked for "
    + ", ".join(BROWSERS) + " on PATH and $ATTNBENCH_CHROMIUM); install one (Debian: apt-get install chromium) "
    "to run the browser checks")

PROBE = """<script>(function () {
  var errs = [];
  window.addEventListener('error', function (ev) {
    var t = ev.target && ev.target !== window ? ' (' + (ev.target.outerHTML || '').slice(0, 80) + ')' : '';
    errs.push('error: ' + (ev.message || 'resource failed') + t);
  }, true);
  window.addEventListener('unhandledrejection', function (ev) { errs.push('unhandled rejection: ' + ev.reason); });
  var ce = console.error;
  console.error = function () { errs.push('console.error: ' + Array.prototype.join.call(arguments, ' '));
                                return ce.apply(console, arguments); };
  window.addEventListener('load', function () { setTimeout(function () {
    var d = document.documentElement, imgs = Array.prototype.slice.call(document.images);
    var wide = Array.prototype.slice.call(document.querySelectorAll('body *')).filter(function (el) {
      var r = el.getBoundingClientRect(); return r.right > d.clientWidth + 1 && !el.closest('.scroll, figure.zoom');
    }).slice(0, 5).map(function (el) { return el.tagName + '.' + el.className; });
    parent.postMessage(JSON.stringify({
      width: d.clientWidth, scrollWidth: d.scrollWidth, bodyScrollWidth: document.body.scrollWidth, wide: wide,
      images: imgs.length, broken: imgs.filter(function (i) { return !i.complete || !i.naturalWidth; })
                                        .map(function (i) { return i.alt; }),
      headline: (document.getElementById('headline') || {}).textContent || '',
      h1: (document.querySelector('h1') || {}).textContent || '',
      viewport: !!document.querySelector('meta[name=viewport]'), errors: errs}), '*');
  }, 200); });
})();</script>"""

WRAPPER = """<!DOCTYPE html><html><head><meta charset="utf-8"></head><body style="margin:0">
<pre id="out">no message from the report</pre>
<iframe src="{src}" style="width:{width}px;height:900px;border:0;display:block"></iframe>
<script>window.addEventListener('message', function (ev) {{ document.getElementById('out').textContent = ev.data; }});
</script></body></html>"""


def render(report: Path, width: int, tmp: Path) -> dict:
    """Load ``report`` at ``width`` CSS px in headless Chromium; the probe's measurements and the
    browser's own console lines."""
    probe = tmp / f"probe-{width}.html"
    text = report.read_text()
    probe.write_text(text.replace("<head>", "<head>" + PROBE, 1))
    wrapper = tmp / f"wrapper-{width}.html"
    wrapper.write_text(WRAPPER.format(src=probe.name, width=width))
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={tmp / 'profile'}", f"--window-size={width + 100},1000", "--virtual-time-budget=15000",
           "--enable-logging=stderr", "--v=0", "--dump-dom", wrapper.as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="out">(.*?)</pre>', r.stdout, re.S)
    assert m, f"no DOM from {BROWSER} (exit {r.returncode}): {r.stderr[-2000:]}"
    raw = html.unescape(m.group(1))
    assert raw.startswith("{"), f"the probe did not report ({raw!r}); browser log: {r.stderr[-2000:]}"
    out = json.loads(raw)
    out["console"] = [line for line in r.stderr.splitlines() if "CONSOLE" in line and "Uncaught" in line]
    return out


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    return {"sweep": write_report(make_sweep_run(root / "sweep"))[1],
            "stages": write_report(make_shape_run(root / "stages"))[1]}


@pytest.mark.parametrize("width", [1400, 420])
@pytest.mark.parametrize("which", ["sweep", "stages"])
def test_report_renders_in_a_browser(reports, which, width, tmp_path):
    page = reports[which]
    got = render(page, width, tmp_path)
    assert got["width"] == width, got
    assert got["scrollWidth"] <= got["width"] and got["bodyScrollWidth"] <= got["width"], \
        f"the page scrolls sideways at {width} px: {got['scrollWidth']} px wide; widest: {got['wide']}"
    assert not got["errors"] and not got["console"], (got["errors"], got["console"])
    assert got["viewport"]
    assert got["h1"] == {"sweep": "synth", "stages": "stages"}[which]
    assert "cells:" in got["headline"] and ("Fastest" in got["headline"])
    n_png = len(list(page.parent.glob("*.png")))
    assert got["images"] == n_png > 0 and not got["broken"], got["broken"]
