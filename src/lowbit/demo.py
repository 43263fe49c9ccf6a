"""``lowbit demo``: the technique matrix on the built-in digits CNN, measured, in under two minutes.

Trains (first run, seconds) or loads ``digits-cnn``, quantizes it with every technique in
``TECHNIQUES``, evaluates each against the float model on held-out digits, prints the table and
writes ``lowbit-report/`` (JSON, Markdown, HTML with plots).

Other modules add rows without touching this file: a module listed in ``ROW_PROVIDERS`` that
exposes ``demo_techniques() -> list[lowbit.eval.compare.Technique]`` (for example QAT runs in
``lowbit.qat``) gets its rows appended when it is importable.

>>> [t.name for t in TECHNIQUES][:3]
['float', 'fp16', 'int8-weight-only']
>>> records = run_demo(out=None, techniques=TECHNIQUES[:2], repeats=2, stream=None)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import sys
import time
import warnings
from pathlib import Path
from typing import TextIO

from lowbit.eval.compare import FLOAT, Technique, compare, recipe_technique
from lowbit.eval.evaluate import EvalRecord
from lowbit.report import summary, text_table, write_report
from lowbit.report.table import NOISY_NOTE, REFERENCE_NOTE, SIZE_NOTE

MODEL = "digits-cnn"
# The write-up's matrix, named by preset so each row can be reproduced with `lowbit quantize --recipe`.
PRESETS = [
    "fp16",
    "int8-weight-only",
    "int8-dynamic",
    "int8-static",
    "int4-weight-only",
    "nf4",
    "kmeans-4bit",
    "log2-4bit",
    "ternary",
    "binary",
]
TECHNIQUES: list[Technique] = [FLOAT] + [recipe_technique(p) for p in PRESETS]
# Modules that may contribute rows through ``demo_techniques()`` once they exist.
ROW_PROVIDERS = ("lowbit.qat", "lowbit.pruning")
# int8 static must stay this close to float on digits-cnn (accuracy points); checked and printed.
INT8_STATIC_BUDGET = 0.5
# Below this float latency per batch, integer kernels' fixed costs per layer (quantizing each
# input, layout changes, a call per layer) outweigh the cheaper int8 arithmetic: on the machine
# of bench/cnn_speed.py a 3x3 conv at 56x56x64 ran ~3x faster in int8, one at 8x8 slower.
SMALL_MODEL_MS = 2.0


def extra_techniques() -> list[Technique]:
    """Rows contributed by optional modules (see the module docstring); missing modules add none."""
    rows: list[Technique] = []
    for name in ROW_PROVIDERS:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        provider = getattr(module, "demo_techniques", None)
        if callable(provider):
            rows.extend(provider())
    return rows


def _say(stream: TextIO | None, text: str) -> None:
    if stream is not None:
        print(text, file=stream, flush=True)


def run_demo(
    out: str | Path | None = "lowbit-report",
    techniques: list[Technique] | None = None,
    repeats: int = 10,
    retrain: bool = False,
    ort: bool | None = None,
    stream: TextIO | None = sys.stdout,
) -> list[EvalRecord]:
    """Run the demo; returns the records. ``out=None`` skips the report, ``stream=None`` is silent.

    ``ort``: also time ONNX Runtime exports (default: when the ONNX extras are installed).
    """
    from lowbit.eval.ort import available
    from lowbit.zoo import get

    if ort is None:
        ort = available()
    started = time.perf_counter()
    zm = get(MODEL, retrain=retrain)
    techniques = list(techniques if techniques is not None else TECHNIQUES + extra_techniques())
    _say(stream, f"lowbit demo: {zm.description}")
    _say(
        stream,
        f"evaluating {len(techniques)} techniques on {sum(len(y) for _, y in zm.eval_data)} held-out digits",
    )

    def on_row(rec: EvalRecord) -> None:
        _say(
            stream,
            f"  {rec.name:<18} done in {rec.seconds.get('quantize', 0) + rec.seconds['evaluate']:.1f} s",
        )

    with warnings.catch_warnings():
        # Layers kept in float are listed in the table's bits/param; no need to repeat per row.
        warnings.simplefilter("ignore", UserWarning)
        records = compare(zm, techniques, repeats=repeats, layer_batches=2, ort=ort, on_row=on_row)
    seconds = time.perf_counter() - started
    _say(stream, "")
    _say(stream, text_table(*summary(records)))
    _say(stream, "")
    _say(stream, SIZE_NOTE)
    _say(stream, REFERENCE_NOTE)
    if any(_noisy(r) for r in records):
        _say(stream, NOISY_NOTE)
    checks = check_records(records)
    for line in checks:
        _say(stream, line)
    if out is not None:
        meta = {
            "title": f"lowbit demo: {MODEL}",
            "model": MODEL,
            "description": zm.description,
            "seconds": seconds,
            "repeats": repeats,
            "notes": checks,
        }
        path = write_report(records, out, meta)
        _say(stream, f"report: {path}/report.html (also report.md, report.json); total {seconds:.1f} s")
    return records


def _noisy(rec: EvalRecord) -> bool:
    return bool((rec.latency and rec.latency.noisy) or (rec.ort or {}).get("noisy"))


def check_records(records: list[EvalRecord]) -> list[str]:
    """The demo's promises, checked on the measured records (one line each)."""
    lines = []
    static = next((r for r in records if r.recipe == "int8-static"), None)
    if static is not None and static.drop is not None:
        ok = static.drop <= INT8_STATIC_BUDGET
        lines.append(
            f"check: int8 static loses {static.drop:.2f} accuracy points "
            f"({'within' if ok else 'OVER'} the {INT8_STATIC_BUDGET} point budget)"
        )
    small = speed_note(records)
    if small:
        lines.append(small)
    bad = [r.name for r in records if r.reload_identical is False]
    lines.append(
        "check: every artifact reloads to bit-identical outputs"
        if not bad
        else f"check: FAILED reload for {', '.join(bad)}"
    )
    return lines


# ONNX kernels that do integer arithmetic (the others store low-bit weights but compute in float).
INTEGER_ORT_KERNELS = ("QDQ", "QLinearConv", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
                       "DynamicQuantizeMatMul")  # fmt: skip


def _timings(records: list[EvalRecord]) -> dict[str, tuple[float, list[tuple[float, str]]]]:
    """Per runtime: the median float ms, and (speed-up, row) of every row run on integer kernels."""
    out: dict[str, tuple[float, list[tuple[float, str]]]] = {}
    lat = [r for r in records if getattr(r, "latency", None) is not None]
    if lat:
        fast = [(r.latency.speedup, r.name) for r in lat if r.latency.speedup is not None]
        out["PyTorch"] = (sorted(r.latency.float_ms for r in lat)[len(lat) // 2], fast)
    ort = [r.ort for r in records if getattr(r, "ort", None) and "error" not in r.ort]
    if ort:
        fast = [
            (o["speedup"], r.name)
            for r, o in ((r, r.ort) for r in records if getattr(r, "ort", None) and "error" not in r.ort)
            if o.get("speedup") is not None and set(o.get("kernels", {})) & set(INTEGER_ORT_KERNELS)
        ]
        out["ONNX Runtime"] = (sorted(o["float_ms"] for o in ort)[len(ort) // 2], fast)
    return out


def speed_note(records: list[EvalRecord]) -> str | None:
    """A note when the model is too small for integer kernels to win (``None`` otherwise): in a
    runtime where float takes under ``SMALL_MODEL_MS`` per batch and no row on integer kernels
    ran faster than float.

    >>> from types import SimpleNamespace as NS
    >>> lat = NS(float_ms=0.4, quant_ms=0.6, speedup=0.67)
    >>> speed_note([NS(name="int8-static", latency=lat, ort=None)])[:66]
    'note: model too small for a speed-up (PyTorch: float 0.40 ms per b'
    """
    slow = []
    for runtime, (float_ms, fast) in _timings(records).items():
        if not fast or float_ms >= SMALL_MODEL_MS:
            continue
        best, name = max(fast)
        if best <= 1.0:
            slow.append((runtime, float_ms, best, name))
    if not slow:
        return None
    figures = "; ".join(
        f"{rt}: float {ms:.2f} ms per batch, best integer row {n} {b:.2f}x" for rt, ms, b, n in slow
    )
    return (
        f"note: model too small for a speed-up ({figures}). Below ~{SMALL_MODEL_MS:g} ms the "
        "per-layer cost of quantizing inputs and calling integer kernels outweighs the cheaper int8 "
        "math (a ResNet-18 at 224x224 does get faster: bench/cnn_speed.py)."
    )
