"""The summary table shared by the terminal, Markdown and HTML: one row per technique.

technique | bits/param | size | size reduction | <metric> before -> after | output MSE | latency |
speed-up | backend, plus ONNX Runtime columns when any row has them.

Sizes are the exact bytes of ``model.safetensors`` on disk (not rounded), so they can be checked
against ``ls -l``. The reference backend's speed-up is shown as ``n/a (ref)``: it simulates the
arithmetic in float and is not a speed claim.

>>> import torch, lowbit
>>> from lowbit.eval.evaluate import evaluate
>>> m = torch.nn.Sequential(torch.nn.Linear(8, 4))
>>> rec = evaluate(m, lowbit.quantize(m, "int8-weight-only", progress=False), [torch.randn(4, 8)],
...                metric=None, repeats=2)
>>> headers, rows = summary([rec])
>>> headers[:3], rows[0][-1]
(['technique', 'bits/param', 'size (bytes)'], 'pytorch-reference (dequantize+float)')
"""

from __future__ import annotations

import math
from typing import Any

from lowbit.eval.evaluate import EvalRecord

METRIC_LABELS = {"accuracy": "accuracy", "cosine": "cosine to float", "perplexity": "perplexity"}
NOISY_NOTE = (
    "(noisy): the timings of that row scattered by more than 25% (interquartile range / median), "
    "usually a busy machine; rerun on an idle one before trusting the speed-up."
)
SIZE_NOTE = (
    "size (bytes): the tensor file as written by lowbit.save and read back (model.safetensors, or "
    "model.safetensors.xz when lzma-coded); the manifest is not counted here (manifest_bytes in the "
    "JSON report; a few hundred bytes to a few KB)."
)
REFERENCE_NOTE = (
    "n/a (ref): the reference backend dequantizes weights and runs the float op; it checks the "
    "arithmetic and is not a speed claim (its measured time is in the latency column and the JSON)."
)


def report_facts(meta: dict[str, Any]) -> list[tuple[str, Any]]:
    """The run facts every report heads with, as ``(label, value)`` pairs; empty values left out."""
    facts = [
        ("model", meta.get("model")),
        ("description", meta.get("description")),
        ("created", meta.get("created")),
        ("machine", meta.get("machine")),
        ("versions", meta.get("versions")),
        ("total time", f"{meta['seconds']:.1f} s" if "seconds" in meta else None),
    ]
    return [(k, v) for k, v in facts if v]


def rows_of(records: list[EvalRecord] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records as plain dicts (reports are rendered from the JSON form, so re-rendering works)."""
    return [r.to_dict() if isinstance(r, EvalRecord) else r for r in records]


def fmt_metric(metric: str | None, value: float | None) -> str:
    """A metric value for humans: accuracy in percent, cosine with 4 decimals.

    >>> fmt_metric("accuracy", 0.975), fmt_metric("cosine", 0.99912), fmt_metric(None, None)
    ('97.50%', '0.9991', '-')
    """
    if value is None or metric is None:
        return "-"
    if metric == "accuracy":
        return f"{value * 100:.2f}%"
    if metric == "cosine":
        return f"{value:.4f}"
    return f"{value:.3f}"


def fmt_float(x: float | None, digits: int = 3) -> str:
    """Compact scientific or fixed notation; ``None`` (lossless) as ``0``.

    >>> fmt_float(0.00270547), fmt_float(None), fmt_float(12.5)
    ('2.71e-03', '0', '12.5')
    """
    if x is None:
        return "0"
    if x == 0 or 0.01 <= abs(x) < 1000:
        return f"{x:.{digits}g}"
    return f"{x:.{digits - 1}e}"


def _speedup(row: dict[str, Any]) -> str:
    lat = row.get("latency")
    if not lat:
        return "-"
    if lat["backend"] == lat["float_backend"]:
        return "1.00x (baseline)" + (" (noisy)" if lat.get("noisy") else "")
    if lat.get("speedup") is None:
        return "n/a (ref)"
    return f"{lat['speedup']:.2f}x" + (" (noisy)" if lat.get("noisy") else "")


def _ort(row: dict[str, Any]) -> tuple[str, str]:
    ort = row.get("ort")
    if not ort:
        return "-", "-"
    if "error" in ort:
        return "export failed", "-"
    lat = row.get("latency") or {}
    if lat and lat.get("backend") == lat.get("float_backend"):
        return f"{ort['float_ms']:.2f} ms", "1.00x (baseline)"
    speed = ort.get("speedup")
    noisy = " (noisy)" if ort.get("noisy") else ""
    return f"{ort['quant_ms']:.2f} ms", "-" if speed is None else f"{speed:.2f}x{noisy}"


def summary(records: list[EvalRecord] | list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Headers and cell strings of the summary table (records or their ``to_dict()`` dicts)."""
    rows = rows_of(records)
    metric = next((r["metric"] for r in rows if r.get("metric")), None)
    label = METRIC_LABELS.get(metric or "", "metric")
    with_ort = any(r.get("ort") for r in rows)
    headers = [
        "technique",
        "bits/param",
        "size (bytes)",
        "size reduction",
        f"{label} before -> after",
        "output MSE",
        "quantize/train",
        "latency",
        "speed-up",
    ]
    if with_ort:
        headers += ["ORT latency", "ORT speed-up"]
    headers.append("backend")
    table = []
    for r in rows:
        size = r["size"]
        lat = r.get("latency")
        if lat is None:
            latency = "-"
        elif lat["backend"] == lat["float_backend"]:
            latency = f"{lat['float_ms']:.2f} ms"
        else:
            # Next to the float time of the same interleaved run: rows' baselines differ on a busy machine.
            latency = f"{lat['quant_ms']:.2f} ms (float {lat['float_ms']:.2f})"
        cells = [
            r["name"],
            f"{size['bits_per_param']:.2f}",
            f"{size['disk_bytes']:,}",
            f"{size['size_reduction']:.2f}x",
            f"{fmt_metric(r['metric'], r['before'])} -> {fmt_metric(r['metric'], r['after'])}",
            fmt_float(r.get("output_mse")),
            # Time to build the row: quantization, calibration, or QAT / pruning fine-tuning.
            f"{(r.get('seconds') or {}).get('quantize', 0.0):.1f} s",
            latency,
            _speedup(r),
        ]
        if with_ort:
            cells += list(_ort(r))
        cells.append(lat["backend"] if lat else "-")
        table.append(cells)
    return headers, table


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    """An aligned plain-text table for the terminal.

    >>> print(text_table(["a", "bb"], [["x", "2"]]))
    a | bb
    --+---
    x |  2
    """
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    numeric = [all(_numeric(r[i]) for r in rows) and bool(rows) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        out = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric, strict=True)]
        return " | ".join(out).rstrip()

    sep = "-+-".join("-" * w for w in widths)
    return "\n".join([line(headers), sep] + [line(r) for r in rows])


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table (``|`` in cells escaped).

    >>> print(markdown_table(["a"], [["x|y"]]))
    | a |
    |---|
    | x\\|y |
    """

    def esc(c: str) -> str:
        return c.replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _numeric(cell: str) -> bool:
    head = cell.split(" ")[0].rstrip("x%").replace(",", "")
    try:
        float(head)
    except ValueError:
        return False
    return not math.isnan(float(head))


def layer_rows(row: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The per-layer error table of one technique."""
    headers = ["layer", "kind", "format", "params", "weight bits/param", "SQNR dB", "cosine", "SQNR in model"]
    out = []
    for layer in row.get("layers", []):
        sqnr = layer["sqnr_db"]
        acc = layer["accumulated_sqnr_db"]
        out.append(
            [
                layer["name"],
                layer["kind"],
                layer["format"],
                f"{layer['parameters']:,}",
                f"{layer['bits_per_param']:.2f}",
                "lossless" if sqnr is None else f"{sqnr:.1f}",
                f"{layer['cosine']:.6f}",
                "lossless" if acc is None else f"{acc:.1f}",
            ]
        )
    return headers, out
