"""The HTML of a report: one self-contained file (PNGs as data URIs, the rows as a CSV download, no
network), readable at phone width. No torch, no matplotlib.

A page is a headline, a table of contents and sections; a section holds a paragraph, a table and its
figures side by side (stacked on a narrow screen), or folded lists. Tables scroll inside their own box;
a figure opens at full size on a click (and closes on another click or Escape).
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

e = html.escape


@dataclass
class Cell:
    text: str
    kind: str = "num"  # num | txt | status | best | noisy
    title: str = ""  # tooltip: the spread of the timed calls, a message
    status: str = ""


@dataclass
class Table:
    header: list[str]
    rows: list[list[Cell]]
    lead: int = 1  # columns of row names (left-aligned, sticky)
    caption: str = ""


@dataclass
class Section:
    title: str
    text: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[Path, str]] = field(default_factory=list)  # (png, caption)
    folded: list[tuple[str, Table]] = field(default_factory=list)  # (summary, table) inside <details>
    anchor: str = ""
    raw_html: str = ""  # trusted markup after the text (a download link)

    def id(self) -> str:
        return self.anchor or re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-")


def text_table(header: list[str], rows: list[list[str]], lead: int = 1, caption: str = "") -> Table:
    return Table(header, [[Cell(c, "txt" if i < lead else "num") for i, c in enumerate(r)] for r in rows], lead,
                 caption)


CSS = """
*, *::before, *::after { box-sizing: border-box; }
body { font: 15px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 auto; max-width: 1480px;
       padding: 0.8em 1.2em 3em; color: #1d1d1f; overflow-wrap: anywhere; }
h1 { font-size: 1.5em; margin: 0.3em 0 0.1em; } h2 { font-size: 1.2em; margin: 1.8em 0 0.5em;
  border-bottom: 1px solid #ddd; padding-bottom: 0.15em; } h3 { font-size: 1em; margin: 0.9em 0 0.3em; }
.sub { color: #555; margin: 0 0 0.8em; }
.headline { border: 1px solid #d0d7de; border-left: 5px solid #0969da; border-radius: 6px; padding: 0.6em 1em;
            background: #f6f8fa; }
.answers { display: grid; grid-template-columns: repeat(auto-fit, minmax(min(100%, 460px), 1fr)); gap: 0 1.6em; }
.headline ul { margin: 0.2em 0 0.6em; padding-left: 1.2em; } .headline li { margin: 0.1em 0; }
.headline .warn h3 { color: #9a6700; } .headline .warn { border-left: 3px solid #d4a72c; padding-left: 0.6em; }
.counts { display: flex; flex-wrap: wrap; gap: 0.35em; margin: 0.4em 0; }
.badge { display: inline-block; border-radius: 999px; padding: 0 0.55em; font-size: 0.82em; font-weight: 600;
         white-space: nowrap; border: 1px solid transparent; }
.s-ok { background: #dafbe1; color: #116329; } .s-over_budget { background: #fff1c2; color: #7d4e00; }
.s-oom { background: #ffe2d6; color: #953800; } .s-error, .s-crashed, .s-timeout { background: #ffd8d3; color: #a40e26; }
.s-unsupported { background: #eaeef2; color: #424a53; }
nav.toc { margin: 1em 0; font-size: 0.92em; } nav.toc a { margin-right: 0.9em; white-space: nowrap; }
.pair { display: grid; grid-template-columns: minmax(0, 1.15fr) minmax(0, 1fr); gap: 1.2em; align-items: start; }
.pair.single { grid-template-columns: minmax(0, 1fr); }
@media (max-width: 1100px) { .pair { grid-template-columns: minmax(0, 1fr); } }
.scroll { overflow-x: auto; max-width: 100%; border: 1px solid #e5e5e5; border-radius: 4px; }
table { border-collapse: collapse; font-size: 0.84em; width: max-content; min-width: 100%; }
th, td { border-bottom: 1px solid #eee; padding: 0.22em 0.6em; white-space: nowrap; }
th { background: #f4f4f4; font-weight: 600; text-align: right; vertical-align: bottom; }
th.txt, td.txt { text-align: left; } td.num, td.best, td.noisy { text-align: right; font-variant-numeric: tabular-nums; }
td.best { font-weight: 700; background: #e6f4ea; } td.noisy { color: #8a5a00; }
td.status { text-align: center; }
th.txt, td.txt:first-child { position: sticky; left: 0; background: #fff; } th.txt { background: #f4f4f4; }
.caption { font-size: 0.82em; color: #555; margin: 0.3em 0 0.8em; }
figure { margin: 0 0 1em; } figure img { width: 100%; height: auto; border: 1px solid #eee; cursor: zoom-in; }
figcaption { font-size: 0.82em; color: #555; }
figure.zoom { position: fixed; inset: 0; z-index: 10; margin: 0; background: rgba(255,255,255,0.97); overflow: auto;
              padding: 1em; } figure.zoom img { width: auto; max-width: none; cursor: zoom-out; }
details { margin: 0.5em 0; } summary { cursor: pointer; color: #0969da; }
code { font-size: 0.9em; overflow-wrap: anywhere; }
a.button { display: inline-block; border: 1px solid #0969da; border-radius: 6px; padding: 0.1em 0.7em;
           text-decoration: none; }
"""

JS = """
document.querySelectorAll('figure img').forEach(function (img) {
  img.addEventListener('click', function () { img.parentElement.classList.toggle('zoom'); });
});
document.addEventListener('keydown', function (ev) {
  if (ev.key === 'Escape') document.querySelectorAll('figure.zoom').forEach(function (f) { f.classList.remove('zoom'); });
});
"""


def badge(status: str, text: str | None = None) -> str:
    return f'<span class="badge s-{e(status)}">{e(text or status.replace("_", " "))}</span>'


def table_html(t: Table) -> str:
    out = ['<div class="scroll"><table>', "<thead><tr>"
           + "".join(f'<th class="{"txt" if i < t.lead else "num"}">{e(h)}</th>' for i, h in enumerate(t.header))
           + "</tr></thead>", "<tbody>"]
    for r in t.rows:
        cells = []
        for c in r:
            title = f' title="{e(c.title)}"' if c.title else ""
            body = badge(c.status, c.text) if c.kind == "status" else e(c.text)
            cells.append(f'<td class="{c.kind}"{title}>{body}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    if t.caption:
        out.append(f'<p class="caption">{e(t.caption)}</p>')
    return "\n".join(out)


def figure_html(png: Path, caption: str) -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return (f'<figure id="fig-{e(png.stem)}"><img alt="{e(png.stem)}" src="data:image/png;base64,{data}" '
            f'loading="eager" title="click: full size"><figcaption><b>{e(png.name)}</b>: {e(caption)} '
            f'<a href="{e(png.name)}">PNG</a></figcaption></figure>')


def section_html(s: Section) -> str:
    out = [f'<section id="{e(s.id())}"><h2>{e(s.title)}</h2>']
    if s.text:
        out.append(f"<p>{e(s.text)}</p>")
    if s.raw_html:
        out.append(s.raw_html)
    left = "\n".join(table_html(t) for t in s.tables)
    right = "\n".join(figure_html(p, c) for p, c in s.figures)
    if left and right:
        out.append(f'<div class="pair"><div>{left}</div><div>{right}</div></div>')
    elif left or right:
        out.append(left or f'<div class="pair single"><div>{right}</div></div>')
    for summary, t in s.folded:
        out.append(f"<details><summary>{e(summary)}</summary>{table_html(t)}</details>")
    out.append("</section>")
    return "\n".join(out)


def csv_link(csv_text: str, filename: str) -> str:
    data = base64.b64encode(csv_text.encode()).decode("ascii")
    return (f'<a class="button" download="{e(filename)}" href="data:text/csv;base64,{data}">download {e(filename)}'
            f"</a>")


def page(title: str, head_html: str, sections: list[Section], foot_html: str = "") -> str:
    toc = " ".join(f'<a href="#{e(s.id())}">{e(s.title)}</a>' for s in sections)
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title>", f"<style>{CSS}</style></head><body>",
        head_html, f'<nav class="toc" id="contents"><b>Contents:</b> {toc}</nav>',
        *[section_html(s) for s in sections], foot_html,
        f"<script>{JS}</script>", "</body></html>"])
