"""The HTML report: one self-contained page (inline CSS, plots as base64 PNG, no scripts, no fetches).

No JavaScript and no external resource, so it opens offline, in a mail attachment or a CI
artifact viewer, and a browser has nothing to complain about in its console.

>>> page = html_report({"title": "a <b>"}, [])
>>> page.startswith("<!DOCTYPE html>"), "a &lt;b&gt;" in page
(True, True)
"""

from __future__ import annotations

import base64
import re
from html import escape
from typing import Any

from lowbit.report.markdown_doc import measurement_notes, ort_lines
from lowbit.report.plots import layer_error_png, pareto_front, pareto_png
from lowbit.report.table import layer_rows, report_facts, summary

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1400px; padding: 0 1em; color: #1d1d1f; }
.scroll { overflow-x: auto; }
code { background: #f3f3f3; padding: 0 3px; border-radius: 3px; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 13px; }
th, td { border: 1px solid #d0d0d0; padding: 3px 8px; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; }
td:first-child, th:first-child, td.text, th:last-child { text-align: left; }
td.text { white-space: normal; min-width: 14em; }
tr.front td:first-child { font-weight: 600; }
.meta { color: #555; }
.meta dt { font-weight: 600; float: left; clear: left; width: 8em; }
.meta dd { margin-left: 8.5em; }
img { max-width: 100%; height: auto; }
details { margin: 0.4em 0; }
summary { cursor: pointer; font-weight: 600; }
.notes li { margin: 0.2em 0; }
"""


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def _code(text: str) -> str:
    """Markdown-style `code` spans (in the shared notes) as <code> elements."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


def _table(headers: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for i, r in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        cells = "".join(
            f'<td class="text">{escape(c)}</td>' if j == len(r) - 1 else f"<td>{escape(c)}</td>"
            for j, c in enumerate(r)
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return f'<div class="scroll">{table}</div>'


def _ort_section(rows: list[dict[str, Any]]) -> str:
    lines = ort_lines(rows)
    if not lines:
        return ""
    items = "".join(f"<li>{escape(line)}</li>" for line in lines)
    intro = "<p>Kernels per quantized layer, medians of interleaved runs:</p>"
    return f"<h2>ONNX Runtime</h2>{intro}<ul>{items}</ul>"


def html_report(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The whole report as one HTML page (``rows`` are ``EvalRecord.to_dict()`` dicts)."""
    title = str(meta.get("title", "lowbit report"))
    meta_html = "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in report_facts(meta))
    front = set(pareto_front(rows))
    headers, table = summary(rows)
    classes = ["front" if r["name"] in front else "" for r in rows]
    notes = measurement_notes(meta) + list(meta.get("notes", []))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # An empty data: icon keeps browsers from requesting /favicon.ico (a console error offline).
        '<link rel="icon" href="data:,">',
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<dl class="meta">{meta_html}</dl>',
        "<h2>Summary</h2>",
        _table(headers, table, classes),
        "<p>Bold technique names are on the Pareto front (nothing else is both smaller and better).</p>",
        _ort_section(rows),
        "<h2>Accuracy vs size</h2>",
        _img(pareto_png(rows, title=f"{meta.get('model', '')}: metric vs size on disk"), "Pareto chart"),
        "<h2>Per-layer error</h2>",
        "<p>Isolated SQNR: each quantized layer run on the float layer's own inputs, so the bar is "
        "that layer's own error. Short bars point at the layers to keep in higher precision.</p>",
        _img(layer_error_png(rows), "per-layer SQNR bars"),
    ]
    for r in rows:
        lh, lrows = layer_rows(r)
        if lrows:
            parts.append(f"<details><summary>{escape(r['name'])}: per-layer table</summary>")
            parts.append(_table(lh, lrows))
            parts.append("</details>")
    parts.append('<h2>How this was measured</h2><ul class="notes">')
    parts += [f"<li>{_code(escape(n))}</li>" for n in notes]
    parts.append("</ul></body></html>")
    return "\n".join(parts) + "\n"
