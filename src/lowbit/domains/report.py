"""The domain tables on paper: ``report.md``, ``report.html`` (one section per domain, tables and
a metric-vs-size chart per model) and ``report.json`` (the ``--json`` rows plus the run's facts).

The page is self-contained like the demo's (inline CSS, plots as base64 PNG, no scripts).

>>> rows = [{"domain": "nlp", "model": "m", "technique": "float", "metric": "accuracy", "value": 90.0,
...          "float_value": 90.0, "higher_is_better": True, "bytes": 4000, "float_bytes": 4000,
...          "bits_per_param": 32.0, "mse": 0.0, "latency": [], "error": None, "notes": []}]
>>> "| m | float | accuracy |" in markdown({"title": "t"}, rows)
True
"""

from __future__ import annotations

import base64
import json
from html import escape
from pathlib import Path
from typing import Any

from lowbit.domains.checks import check_rows
from lowbit.domains.task import DOMAINS

RUNTIMES = ("pytorch", "onnxruntime", "openvino", "cuda")
HEADERS = [
    "model",
    "technique",
    "metric",
    "float -> quantized",
    "delta",
    "bits/param",
    "bytes",
    "x smaller",
    "output MSE",
    *(f"{r} ms (speed-up)" for r in RUNTIMES),
    "PyTorch backend",
    "note",
]


def _num(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e6):
        return f"{x:.2e}"
    return f"{x:.{digits}g}"


def _latency(row: dict[str, Any], runtime: str) -> str:
    for lat in row.get("latency") or []:
        if lat.get("runtime") != runtime:
            continue
        if lat.get("error"):
            return "failed"
        ms = lat.get("latency_ms")
        speed = lat.get("speedup")
        if ms is None and lat.get("note"):
            return "ref, not timed"
        text = f"{ms:.2f}" if ms is not None else "n/a"
        if row["technique"] != "float":
            text += f" ({speed:.2f}x)" if speed is not None else " (ref)"
        return text + (" ~" if lat.get("noisy") else "")
    return ""


def table_rows(rows: list[dict[str, Any]], domain: str) -> list[list[str]]:
    """The cells of one domain's table, in run order."""
    out = []
    for r in rows:
        if r["domain"] != domain:
            continue
        note = r.get("error") or "; ".join(r.get("notes") or [])
        backend = next(
            (lat.get("backend") or "" for lat in r.get("latency") or [] if lat["runtime"] == "pytorch"), ""
        )
        value = "" if r.get("value") is None else f"{_num(r.get('float_value'))} -> {_num(r['value'])}"
        delta = r.get("delta")
        smaller = r["float_bytes"] / r["bytes"] if r.get("bytes") and r.get("float_bytes") else None
        out.append(
            [
                r["model"],
                r["technique"],
                r.get("metric") or "",
                value,
                "" if delta is None else f"{delta:+.4g}",
                "" if r.get("bits_per_param") is None else f"{r['bits_per_param']:.2f}",
                "" if r.get("bytes") is None else f"{r['bytes']:,}",
                "" if smaller is None else f"{smaller:.2f}x",
                "" if r.get("mse") is None else _num(r["mse"], 3),
                *(_latency(r, rt) for rt in RUNTIMES),
                backend,
                note,
            ]
        )
    return out


def pivot(rows: list[dict[str, Any]], domain: str) -> str:
    """One compact Markdown table per domain: a row per technique, a column per (model, metric),
    each cell ``value (bits/param)``; float in the first row.

    >>> rows = [{"domain": "nlp", "model": "m", "technique": "float", "metric": "accuracy",
    ...          "value": 90.0, "bits_per_param": 32.0}]
    >>> pivot(rows, "nlp").splitlines()[2]
    '| float | 90 (32.0) |'
    """
    cols: list[tuple[str, str]] = []
    techs: list[str] = []
    cell: dict[tuple[str, str, str], str] = {}
    for r in rows:
        if r["domain"] != domain or not r.get("metric"):
            continue
        col = (r["model"], r["metric"])
        if col not in cols:
            cols.append(col)
        if r["technique"] not in techs:
            techs.append(r["technique"])
        if r.get("error"):
            text = "failed"
        elif r.get("value") is None:
            text = "n/a"
        else:
            bits = r.get("bits_per_param")
            text = _num(r["value"]) + ("" if bits is None else f" ({bits:.1f})")
        cell[(r["technique"], *col)] = text
    if not cols:
        return ""
    head = ["technique", *(f"{m} {metric}" for m, metric in cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for t in techs:
        lines.append("| " + " | ".join([t, *(cell.get((t, *c), "") for c in cols)]) + " |")
    return "\n".join(lines)


def _used_columns(cells: list[list[str]]) -> list[int]:
    """Drop latency columns no row filled (no GPU, no ONNX Runtime)."""
    return [i for i, h in enumerate(HEADERS) if "ms (" not in h or any(c[i] for c in cells)]


def _md_table(cells: list[list[str]]) -> str:
    keep = _used_columns(cells)
    head = [HEADERS[i] for i in keep]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(c[i].replace("|", "/") for i in keep) + " |" for c in cells]
    return "\n".join(lines)


NOTES = [
    "bytes: the tensor file `lowbit.save` wrote, read back from disk (manifest not counted); bits/param "
    "counts scales, zero points and codebooks.",
    "latency: median ms per held-out batch, the float model timed in the same run on the same backend; "
    "`(ref)` = the PyTorch reference path (dequantize, then the float op), timed but never called "
    "faster; `~` = timings scattered by more than 25%.",
    "delta: quantized minus float in the metric's units (WER and perplexity: lower is better).",
]


def markdown(
    meta: dict[str, Any], rows: list[dict[str, Any]], tasks: list[dict[str, Any]] | None = None
) -> str:
    """``report.md``: facts, checks, then one table per domain."""
    lines = [f"# {meta.get('title', 'lowbit domain tables')}", ""]
    env = meta.get("environment") or {}
    for key in ("machine", "threads", "versions", "created"):
        if key in env:
            lines.append(f"- {key}: {env[key]}")
    if "seconds" in meta:
        lines.append(f"- run: {meta['seconds']:.0f} s{' (--quick)' if meta.get('quick') else ''}")
    lines += ["", "## Checks", ""] + [f"- {c.line()}" for c in check_rows(rows)] + [""]
    for domain in DOMAINS:
        cells = table_rows(rows, domain)
        if not cells:
            continue
        lines += [f"## {domain}", ""]
        for t in tasks or []:
            if t["domain"] == domain:
                lines.append(
                    f"- **{t['model']}**{_size(rows, t)}: {t.get('description') or t.get('error', '')}"
                )
        lines += [
            "",
            "Metric (bits / parameter stored):",
            "",
            pivot(rows, domain),
            "",
            "All measurements:",
            "",
        ]
        lines += [_md_table(cells), ""]
    lines += ["## How to read the tables", ""] + [f"- {n}" for n in NOTES] + [""]
    return "\n".join(lines)


def _size(rows: list[dict[str, Any]], task: dict[str, Any]) -> str:
    """`` (N parameters, B bytes float)`` from the task's float row, or ``""``."""
    for r in rows:
        if r["domain"] == task["domain"] and r["model"] == task["model"] and r["technique"] == "float":
            if r.get("parameters") and r.get("bytes"):
                return f" ({r['parameters']:,} parameters, {r['bytes']:,} bytes as float32)"
    return ""


def chart_png(rows: list[dict[str, Any]], domain: str) -> bytes | None:
    """Primary metric vs bits/param, one panel per model of ``domain`` (None without points)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["domain"] == domain and r.get("value") is not None and r.get("bits_per_param"):
            first = models.setdefault(r["model"], [])
            if not first or first[0]["metric"] == r["metric"]:
                first.append(r)
    if not models:
        return None
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.4), squeeze=False)
    for ax, (model, pts) in zip(axes[0], models.items(), strict=True):
        for r in pts:
            marker = "*" if r["technique"] == "float" else "o"
            ax.scatter(r["bits_per_param"], r["value"], marker=marker, s=60 if marker == "*" else 25)
            ax.annotate(
                r["technique"],
                (r["bits_per_param"], r["value"]),
                fontsize=6,
                rotation=20,
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bits / parameter (stored)")
        ax.set_ylabel(pts[0]["metric"] + ("" if pts[0]["higher_is_better"] else " (lower is better)"))
        ax.set_title(model, fontsize=9)
        ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1500px; padding: 0 1em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 12px; }
th, td { border: 1px solid #d0d0d0; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; }
td:nth-child(-n+3), td:last-child { text-align: left; }
td:last-child { white-space: normal; min-width: 14em; }
li.miss { color: #b00020; font-weight: 600; }
img { max-width: 100%; height: auto; }
"""


def html(meta: dict[str, Any], rows: list[dict[str, Any]], tasks: list[dict[str, Any]] | None = None) -> str:
    """``report.html``: the same content as the Markdown, with a chart per domain."""
    title = escape(meta.get("title", "lowbit domain tables"))
    env = meta.get("environment") or {}
    facts = "".join(f"<li>{escape(str(k))}: {escape(str(v))}</li>" for k, v in env.items())
    checks = "".join(
        f'<li class="{"ok" if c.ok else "miss"}">{escape(c.line())}</li>' for c in check_rows(rows)
    )
    parts = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{title}</title>",
        f"<style>{_CSS}</style></head><body><h1>{title}</h1><ul>{facts}</ul>",
        f"<h2>Checks</h2><ul>{checks}</ul>",
    ]
    for domain in DOMAINS:
        cells = table_rows(rows, domain)
        if not cells:
            continue
        keep = _used_columns(cells)
        parts.append(f"<h2 id='{domain}'>{escape(domain)}</h2><ul>")
        for t in tasks or []:
            if t["domain"] == domain:
                parts.append(
                    f"<li><b>{escape(t['model'])}</b>{escape(_size(rows, t))}: "
                    f"{escape(t.get('description') or t.get('error', ''))}</li>"
                )
        parts.append("</ul>")
        png = chart_png(rows, domain)
        if png is not None:
            data = base64.b64encode(png).decode("ascii")
            parts.append(
                f"<img alt='{escape(domain)}: metric vs bits / parameter' src='data:image/png;base64,{data}'>"
            )
        head = "".join(f"<th>{escape(HEADERS[i])}</th>" for i in keep)
        body = "".join("<tr>" + "".join(f"<td>{escape(c[i])}</td>" for i in keep) + "</tr>" for c in cells)
        parts.append(
            f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"
        )
    parts.append(
        "<h2>How to read the tables</h2><ul>" + "".join(f"<li>{escape(n)}</li>" for n in NOTES) + "</ul>"
    )
    parts.append("</body></html>\n")
    return "".join(parts)


def write(result: Any, directory: str | Path) -> Path:
    """Write report.md, report.html and report.json for a ``SuiteResult`` into ``directory``
    (atomically replaced)."""
    from lowbit.export.atomic import write_directory

    doc = result.to_dict()
    rows, tasks, meta = doc["rows"], doc["tasks"], doc["meta"]
    doc["checks"] = [c.__dict__ for c in check_rows(rows)]
    files = {
        "report.json": (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode(),
        "report.md": markdown(meta, rows, tasks).encode(),
        "report.html": html(meta, rows, tasks).encode(),
    }
    directory = Path(directory)
    write_directory(directory, files, markers=())
    return directory
