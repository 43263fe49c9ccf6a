"""The outside model suite: every model of ``outside_models`` x preset x verb, as a user runs them.

A cell is one (model, preset). Its verbs, in order, each as the public API offers it:

1. ``quantize``: ``lowbit.quantize(model, preset, calibration=batches)`` with the batches as the
   user has them (``BatchEncoding`` / dicts for Hugging Face models, tensors otherwise); the ``qat``
   column instead runs ``lowbit.qat.prepare`` -> ``calibrate`` -> a few Adam steps of MSE to the
   float model's outputs on the calibration batches -> ``lowbit.qat.convert``;
2. ``forward`` on held-out batches: fidelity = mean per-row cosine of the main output (logits /
   last hidden state) vs float, and top-1 agreement for classifiers;
3. ``save`` / ``load`` into a fresh copy of the float architecture: outputs bit-identical;
4. ``export_onnx`` (example: a calibration batch) run by ONNX Runtime on a held-out batch: same
   output count and shapes as PyTorch, main output cosine vs PyTorch and max abs diff / scale;
5. ``evaluate`` (``metric="cosine"``, input batches, as its docstring says): the record's cosine
   agrees with 2. and its save/load check passes.

A verb raising one of lowbit's error types (``lowbit.errors``) is a *documented refusal*; any other
exception is a crash (a bug). ``python bench/model_suite.py`` runs the full matrix on the "full"
configs and writes ``docs/models.md`` and ``bench/results/model_suite.json``; ``--size small``
runs the test configs (a minute or two).

Usage::

    python bench/model_suite.py                       # full configs, every preset
    python bench/model_suite.py --size small --models bert tagger --presets int8-dynamic
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # outside_models, when run as a script

from outside_models import BUILDERS, CLASSES, INITS, Built, build  # noqa: E402

import lowbit  # noqa: E402
from lowbit.errors import ArtifactError, DataError, ModelError, RecipeError  # noqa: E402
from lowbit.eval.metrics import cosine_per_row, output_tensor  # noqa: E402
from lowbit.export.onnx_inputs import flat_outputs  # noqa: E402
from lowbit.zoo.base import call_model  # noqa: E402

PRESETS = ("int8-dynamic", "int8-static", "int4-weight-only", "int4-gptq", "int4-awq", "fp8", "nf4", "qat")
LOWBIT_ERRORS = (ArtifactError, DataError, ModelError, RecipeError)
VERBS = ("quantize", "forward", "save/load", "export_onnx", "evaluate")
QAT_STEPS = 4
# Adam at 1e-4 moved the random-init MobileNetV2 from cosine 0.998 to 0.82 in 4 steps on two tiny
# batches (1e-5: 0.990): a few steps at a small rate keep fidelity, they cannot add much here.
QAT_LR = 1e-5
ORT_COSINE = 0.999  # ORT vs PyTorch on the same quantized model: the same arithmetic, other kernels
ORT_REL_DIFF = 2e-2  # ... or max abs difference under 2% of the output scale (int8 rounding ties)
# Fidelity floors (quantized vs float, mean per-row cosine of the main output), per preset family:
# 8-bit formats keep random-init models near-exact (> 0.99 measured, floor with margin); 4-bit
# weights lose more on tiny random models whose layers are all "outliers" (measured >= 0.93).
FLOOR = {"int8-dynamic": 0.98, "int8-static": 0.95, "fp8": 0.98, "qat": 0.9}
FLOOR_4BIT = 0.85


@dataclass
class Cell:
    """What one (model, preset) did: the verbs that passed, the figures, and the first failure."""

    model: str
    preset: str
    status: str = "ok"  # ok | refused (a lowbit error, documented) | crash | fail (a check failed)
    verbs: list[str] = field(default_factory=list)  # verbs that passed
    cosine: float | None = None  # quantized vs float, main output, mean per row
    top1: float | None = None  # argmax agreement with float (classifiers)
    reload_identical: bool | None = None
    ort_cosine: float | None = None  # ORT vs PyTorch (quantized), main output
    ort_rel_diff: float | None = None  # max |ORT - PyTorch| / max |PyTorch|
    ort_shapes_equal: bool | None = None
    eval_cosine: float | None = None  # lowbit.evaluate's record.after
    export_warnings: list[str] = field(default_factory=list)
    fallbacks: int | None = None  # layers ORT computes in float (report.fallbacks)
    quant_warnings: list[str] = field(default_factory=list)
    error: str | None = None  # the verb and message of the first failure
    seconds: float = 0.0

    def floor(self) -> float:
        return FLOOR.get(self.preset, FLOOR_4BIT)


def run_model(model: nn.Module, batch: Any) -> Any:
    with torch.no_grad():
        return call_model(model, batch)


def main_output(model: nn.Module, batch: Any) -> torch.Tensor:
    return output_tensor(run_model(model, batch)).detach().float()


def qat_model(built: Built, steps: int = QAT_STEPS, lr: float = QAT_LR) -> nn.Module:
    """A few QAT steps as a user would write them: W8A8 fake quantization (``lowbit.qat.recipe(8)``),
    ranges calibrated first, Adam on MSE to the float model's outputs, BatchNorm frozen."""
    recipe = lowbit.qat.recipe(8)
    m = lowbit.qat.prepare(built.model, recipe)
    lowbit.qat.calibrate(m, built.calibration)
    targets = [main_output(built.model, b) for b in built.calibration]
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=lr)
    m.train()
    # BatchNorm statistics stay frozen (eval mode): a handful of small batches would overwrite the
    # running statistics the float model was fitted with. prepare already folds or freezes trained
    # BatchNorms (batchnorm="auto"); this also covers models whose BatchNorms never trained.
    for module in m.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    for step in range(steps):
        batch, target = built.calibration[step % len(built.calibration)], targets[step % len(targets)]
        loss = nn.functional.mse_loss(output_tensor(call_model(m, batch)).float(), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lowbit.qat.convert(m.eval())


def quantize(built: Built, preset: str) -> nn.Module:
    if preset == "qat":
        return qat_model(built)
    return lowbit.quantize(built.model, preset, calibration=built.calibration, progress=False)


def torch_outputs(model: nn.Module, batch: Any) -> list[torch.Tensor]:
    """Every output tensor, flat, as the exported graph returns them: without the key / value cache
    (``export_onnx`` switches it off; a Hugging Face model called with a mapping takes the flag)."""
    if isinstance(batch, Mapping) and "use_cache" in inspect.signature(model.forward).parameters:
        batch = {**batch, "use_cache": False}
    return [t for _name, t in flat_outputs(run_model(model, batch))]


def run_cell(built: Built, name: str, preset: str, workdir: str | Path) -> Cell:
    """Run every verb of one cell; never raises (the failure is recorded in the cell)."""
    cell = Cell(name, preset)
    started = time.perf_counter()
    verb = "quantize"
    workdir = Path(workdir)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            q = quantize(built, preset)
        cell.quant_warnings = sorted({str(w.message) for w in caught if "lowbit" in str(w.message)})
        cell.verbs.append(verb)

        verb = "forward"
        refs = [main_output(built.model, b) for b in built.evaluation]
        outs = [main_output(q, b) for b in built.evaluation]
        if any(o.shape != r.shape for o, r in zip(outs, refs, strict=True)):
            raise AssertionError("quantized output shape differs from float")
        if not all(torch.isfinite(o).all() for o in outs):
            raise AssertionError("quantized output has NaN / Inf")
        cell.cosine = float(cosine_per_row(refs, outs).mean())
        if built.classifier:
            agree = [
                (o.argmax(-1) == r.argmax(-1)).float().flatten() for o, r in zip(outs, refs, strict=True)
            ]
            cell.top1 = float(torch.cat(agree).mean())
        cell.verbs.append(verb)

        verb = "save/load"
        target = workdir / f"{name}-{preset}"
        lowbit.save(q, target)
        again = lowbit.load(target, copy.deepcopy(built.model))
        cell.reload_identical = all(
            torch.equal(main_output(again, b), o) for b, o in zip(built.evaluation, outs, strict=True)
        )
        if not cell.reload_identical:
            raise AssertionError("outputs after save + load differ from the quantized model's")
        cell.verbs.append(verb)

        verb = "export_onnx"
        from lowbit.runtime import load as ort_load

        path = workdir / f"{name}-{preset}.onnx"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = lowbit.export_onnx(q, path, built.calibration[0])
        cell.export_warnings = list(report.warnings)
        cell.fallbacks = len(report.fallbacks)
        batch = built.evaluation[0]
        ort_out = ort_load(path)(batch)
        ort_list = list(ort_out) if isinstance(ort_out, tuple) else [ort_out]
        torch_list = torch_outputs(q, batch)
        cell.ort_shapes_equal = len(ort_list) == len(torch_list) and all(
            a.shape == b.shape for a, b in zip(ort_list, torch_list, strict=False)
        )
        ref, got = torch_list[0].float(), ort_list[0].float()
        if ref.shape == got.shape:
            cell.ort_cosine = float(cosine_per_row([ref], [got]).mean())
            cell.ort_rel_diff = float((ref - got).abs().max() / ref.abs().max().clamp_min(1e-30))
        if not cell.ort_shapes_equal:
            shapes = [tuple(t.shape) for t in ort_list], [tuple(t.shape) for t in torch_list]
            raise AssertionError(f"ORT output shapes {shapes[0]} differ from PyTorch's {shapes[1]}")
        if not (cell.ort_cosine >= ORT_COSINE or cell.ort_rel_diff <= ORT_REL_DIFF):
            raise AssertionError(f"ORT differs from PyTorch: cosine {cell.ort_cosine:.5f}")
        cell.verbs.append(verb)

        verb = "evaluate"
        record = lowbit.evaluate(built.model, q, built.evaluation, metric="cosine", latency=False,
                                 per_layer=False)  # fmt: skip
        cell.eval_cosine = record.after
        if record.reload_identical is not True:
            raise AssertionError("evaluate's save + load check failed")
        if record.after is None or abs(record.after - cell.cosine) > 1e-4:
            raise AssertionError(f"evaluate's cosine {record.after} differs from the suite's {cell.cosine}")
        cell.verbs.append(verb)

        if cell.cosine < cell.floor():
            cell.status = "fail"
            cell.error = f"fidelity: cosine {cell.cosine:.4f} below the floor {cell.floor()}"
    except LOWBIT_ERRORS as exc:
        cell.status, cell.error = "refused", f"{verb}: {type(exc).__name__}: {exc}"
    except AssertionError as exc:
        cell.status, cell.error = "fail", f"{verb}: {exc}"
    except Exception as exc:  # a crash: recorded with where it happened, for the doc and the fix
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        where = f"{Path(tb.filename).name}:{tb.lineno}"
        cell.status, cell.error = "crash", f"{verb}: {type(exc).__name__}: {exc} ({where})"
    cell.seconds = time.perf_counter() - started
    return cell


def cell_text(cell: Cell) -> str:
    """The table entry: fidelity, or a short reason."""
    if cell.status == "refused":
        return f"refused: {cell.error.split(': ', 2)[-1][:80]}"
    if cell.status == "crash":
        return f"CRASH ({cell.error[:60]})"
    if cell.cosine is None:
        return f"FAIL ({cell.error[:60]})"
    text = f"{cell.cosine:.4f}"
    if cell.top1 is not None:
        text += f" / {100 * cell.top1:.0f}%"
    if cell.status == "fail":
        text += f" FAIL ({cell.error.split(': ', 1)[0]})"
    elif cell.export_warnings:
        text += " (static ONNX)"
    return text


def write_doc(cells: list[Cell], size: str, path: Path, seconds: float) -> None:
    models = list(dict.fromkeys(c.model for c in cells))
    presets = list(dict.fromkeys(c.preset for c in cells))
    by = {(c.model, c.preset): c for c in cells}
    lines = [
        "# Models from outside: the suite",
        "",
        "Models lowbit's authors did not write, each through every preset and every verb as a user",
        "runs them (`bench/model_suite.py`; builders in `bench/outside_models.py`; the small configs",
        "also run as `tests/test_model_suite.py`). Regenerate with",
        f"`python bench/model_suite.py --size {size}` ({size} configs; this run took {seconds:.0f} s).",
        "",
        "Verbs per cell: `quantize` (calibration batches as the user has them: `BatchEncoding` for",
        "token models, `{'pixel_values': ...}` dicts for vision models, tensors for ours), `forward`,",
        "`save` / `load` (outputs bit-identical), `export_onnx` run by ONNX Runtime (same output count",
        f"and shapes; cosine vs PyTorch >= {ORT_COSINE} or max abs diff <= {ORT_REL_DIFF:.0%} of the",
        'output scale) and `evaluate` (`metric="cosine"`).',
        "",
        "Each cell: mean per-row cosine of the quantized model's main output (logits or last hidden",
        "state) vs float on held-out batches / top-1 agreement with float (classifiers, per token for",
        "LMs and taggers, per box for the detector). `(static ONNX)`: exported with static shapes",
        "(the graph does not allow free axes; `export_onnx` warns). `qat`: `lowbit.qat.recipe(8)`",
        f"(int8 weights, static uint8 activations), {QAT_STEPS} Adam steps (lr {QAT_LR:g}) of MSE to",
        "the float outputs on the calibration batches (BatchNorm frozen), then `lowbit.qat.convert`.",
        "",
        "| model | " + " | ".join(presets) + " |",
        "| --- | " + " | ".join("---" for _ in presets) + " |",
    ]
    for m in models:
        lines.append(
            f"| {m} | " + " | ".join(cell_text(by[m, p]) if (m, p) in by else "" for p in presets) + " |"
        )
    lines += ["", "Models (small configs in the tests, full configs here; random init, no downloads):", ""]
    for m in models:
        lines.append(f"- `{m}`: {CLASSES[m]}; init: {INITS.get(m, 'PyTorch default')}")
    problems = [c for c in cells if c.status != "ok"]
    lines += ["", "## Cells that are not OK", ""]
    if not problems:
        lines.append("None: every cell ran every verb and met its floors.")
    for c in problems:
        lines.append(f"- `{c.model}` x `{c.preset}` ({c.status}): {c.error}")
    static = sorted({c.model for c in cells if c.export_warnings})
    if static:
        lines += ["", "Exported with static shapes (`export_onnx` warned; no free axes in the graph): "
                  + ", ".join(f"`{m}`" for m in static) + "."]  # fmt: skip
    lines += ["", "## What is not supported", ""] + NOT_SUPPORTED + ["", "## Pretrained MTCNN", ""] + MTCNN
    path.write_text("\n".join(lines) + "\n")


# Plain words for the doc; each item is backed by a cell of the table or a test.
NOT_SUPPORTED = [
    "- ONNX export of models whose graph needs a key / value cache: `export_onnx` switches the cache",
    "  off (`use_cache=False`), so the ONNX graph of a causal LM or Whisper computes every position",
    "  from scratch; incremental decoding in ONNX Runtime is not supported.",
    "- Free (dynamic) ONNX axes through `AdaptiveAvgPool2d((None, 1))` (the `crnn` model): the",
    "  exporter cannot size the pooling at run time, so the graph is exported with the example's",
    "  static shapes and `export_onnx` warns; export once per input shape.",
    "- RNN layers (LSTM / GRU) in ONNX run as float ops on the dequantized weights (listed in",
    "  `report.fallbacks`): the file is float-sized for those layers, the results match PyTorch.",
]

# The real pretrained detector (tests/test_mtcnn.py; figures in docs/notes/mtcnn.md).
MTCNN = [
    "`lowbit.zoo.mtcnn.MTCNN()` loads facenet-pytorch's pretrained P / R / O-Net weights (install",
    "`facenet-pytorch==2.6.0 --no-deps`; the package itself is never imported) and runs the cascade",
    "in plain torch. Under `int8-static` every face count matches float, but the worst box IoU is",
    "0.84-0.89 (< 0.9) on a portrait and a 3-face composite (scikit-learn's sample photos have no",
    "faces); keeping P-Net and the two box-regression heads float reaches IoU >= 0.90 on every face.",
    "Details and every recipe tried: [notes/mtcnn.md](notes/mtcnn.md).",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="full", choices=["small", "full"])
    parser.add_argument("--models", nargs="*", default=list(BUILDERS))
    parser.add_argument("--presets", nargs="*", default=list(PRESETS))
    parser.add_argument("--doc", default=None, help="write the markdown table here (default: docs/models.md)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    root = Path(__file__).resolve().parent.parent
    cells: list[Cell] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lowbit-suite-") as tmp:
        for name in args.models:
            built = build(name, args.size)
            for preset in args.presets:
                cell = run_cell(built, name, preset, tmp)
                cells.append(cell)
                print(f"{name:12s} {preset:17s} {cell.status:8s} {cell_text(cell)}  [{cell.seconds:.1f}s]"
                      + (f"\n    {cell.error}" if cell.error else ""), flush=True)  # fmt: skip
    seconds = time.perf_counter() - started
    out_json = Path(args.json) if args.json else root / "bench" / "results" / f"model_suite_{args.size}.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(
        json.dumps(
            {"size": args.size, "seconds": seconds, "cells": [asdict(c) for c in cells]},
            indent=1,
            default=lambda x: None if isinstance(x, float) and math.isnan(x) else x,
        )
    )
    print(f"wrote {out_json} ({seconds:.0f} s)")
    doc = Path(args.doc) if args.doc else root / "docs" / "models.md"
    write_doc(cells, args.size, doc, seconds)
    print(f"wrote {doc}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
