"""The Markdown report: summary table, how it was measured, and per-layer error tables.

>>> md = markdown_report({"title": "t", "model": "m"}, [])
>>> md.splitlines()[0]
'# t'
"""

from __future__ import annotations

from typing import Any

from lowbit.report.table import NOISY_NOTE, REFERENCE_NOTE, layer_rows, markdown_table, report_facts, summary


def measurement_notes(meta: dict[str, Any]) -> list[str]:
    """How the numbers were measured, one sentence each (shared with the HTML page)."""
    notes = [
        "size: bytes of the tensor file written by `lowbit.save` and read back from disk (the "
        "manifest is not counted: `manifest_bytes` in the JSON); "
        "bits/param = stored tensor bits (codes, scales, zero points, codebooks, float leftovers) "
        "/ parameters; size reduction = float file / quantized file.",
        "metric: on held-out data, float and quantized model on the same batches.",
        "output MSE: quantized vs float model outputs on the evaluation inputs.",
        f"latency: median of at least {meta.get('repeats', '?')} interleaved calls per model on one "
        "batch (more for fast models, until 0.5 s of timed calls), "
        f"{meta.get('threads', '?')} threads, float baseline measured in the same run.",
        REFERENCE_NOTE,
        NOISY_NOTE,
    ]
    return notes


def ort_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per technique timed in ONNX Runtime: which kernels ran, float vs quantized ms."""
    lines = []
    for r in rows:
        ort = r.get("ort")
        if not ort:
            continue
        if "error" in ort:
            lines.append(f"{r['name']}: export failed: {ort['error']}")
        else:
            lines.append(
                f"{r['name']}: {ort['backend']}; ORT float {ort['float_ms']:.2f} ms, "
                f"quantized {ort['quant_ms']:.2f} ms, ONNX file {ort['onnx_bytes']:,} bytes"
            )
    return lines


def markdown_report(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The whole report as Markdown (``rows`` are ``EvalRecord.to_dict()`` dicts)."""
    lines = [f"# {meta.get('title', 'lowbit report')}", ""]
    lines += [f"- **{k}**: {v}" for k, v in report_facts(meta)]
    lines += ["", "## Summary", "", markdown_table(*summary(rows)), "", "## How this was measured", ""]
    lines += [f"- {n}" for n in measurement_notes(meta)]
    for note in meta.get("notes", []):
        lines.append(f"- {note}")
    ort = ort_lines(rows)
    if ort:
        lines += [
            "",
            "## ONNX Runtime",
            "",
            "Kernels per quantized layer and medians of interleaved runs:",
            "",
        ]
        lines += [f"- {line}" for line in ort]
    lines += ["", "## Per-layer error", ""]
    lines.append(
        "SQNR dB: the quantized layer on the float layer's own inputs (its own error); "
        "SQNR in model: inside the quantized model (includes every earlier layer's error)."
    )
    for r in rows:
        headers, table = layer_rows(r)
        if not table:
            continue
        lines += ["", f"### {r['name']}", "", markdown_table(headers, table)]
        lines += [f"\n_{note}_" for note in r.get("notes", [])]
    return "\n".join(lines) + "\n"
