"""``lowbit bench --suite domains``: every domain task x every technique, measured in one run.

For each task (``lowbit.domains.builders``) the float model is scored once; then each technique
builds its model, which is scored with the task's own metrics and measured like the demo measures:
bytes stored (``lowbit.save`` to disk, read back), bits per parameter (scales, zero points and
codebooks counted), output MSE against float on held-out inputs, and latency on every backend
present (PyTorch; ONNX Runtime and OpenVINO on lowbit's exports; CUDA when a GPU is present),
with the backend that actually ran named. A PyTorch model on the reference path (dequantize,
then the float op) is timed but never given a speed-up.

A task that cannot be built (a missing package or program) becomes one row saying why; a
technique that fails on a model becomes a row with the error, never a crash of the whole table.

>>> [f for f in ROW_FIELDS][:6]
['domain', 'model', 'technique', 'metric', 'higher_is_better', 'value']
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

from lowbit.domains import DOMAIN_MODULES, DOMAINS, builders
from lowbit.domains.common import FirstBatches
from lowbit.domains.task import DomainTask
from lowbit.domains.techniques import TECHNIQUES, DomainTechnique

# --quick times ONNX Runtime / OpenVINO for these rows only (PyTorch for every row): each export
# and session costs seconds, and these are the rows a deployment picks from.
QUICK_ONNX = ("float", "int8-dynamic", "int8-static")
# --quick fine-tunes (QAT, pruning) on this share of each pass over the training batches.
QUICK_FINETUNE_SHARE = 0.5
# Domains in the order their models are queued for the parallel build. Speech goes first: its two
# models share a corpus, so they are one job, the longest (116 s of a serial cold run, against
# 45-57 s for the slowest single models); the order of the rest only decides which worker idles
# at the end.
BUILD_ORDER = ("speech", "nlp", "detection", "classification")
# The --json schema: every row has these keys (None where a value does not apply).
ROW_FIELDS = (
    "domain",
    "model",
    "technique",
    "metric",
    "higher_is_better",
    "value",
    "float_value",
    "delta",
    "bytes",
    "float_bytes",
    "parameters",
    "bits_per_param",
    "mse",
    "latency",
    "family",
    "quantize_seconds",
    "error",
    "notes",
)


@dataclass
class Row:
    """One (model, technique, metric) cell of the domain tables; ``to_dict`` gives the JSON row.

    ``latency`` is a list of ``{"runtime", "backend", "latency_ms", "float_ms", "speedup",
    "noisy"}``, one per backend that ran; ``speedup`` is ``None`` when the quantized model ran
    the reference simulation (never reported as faster).
    """

    domain: str
    model: str
    technique: str
    metric: str | None
    higher_is_better: bool | None
    value: float | None = None
    float_value: float | None = None
    bytes: int | None = None
    float_bytes: int | None = None
    parameters: int | None = None
    bits_per_param: float | None = None
    mse: float | None = None
    latency: list[dict[str, Any]] = field(default_factory=list)
    family: str = ""
    quantize_seconds: float | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def delta(self) -> float | None:
        """``value - float_value`` in the metric's own units (negative = worse when higher is better)."""
        if self.value is None or self.float_value is None:
            return None
        return self.value - self.float_value

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["delta"] = self.delta
        return {k: _finite(d[k]) for k in ROW_FIELDS}


def _finite(x: Any) -> Any:
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    return x


@dataclass
class SuiteResult:
    """All rows of one run, plus what the run was (machine, options, seconds per task)."""

    rows: list[Row]
    meta: dict[str, Any]
    tasks: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"meta": self.meta, "tasks": self.tasks, "rows": [r.to_dict() for r in self.rows]}


def flat_output(out: Any) -> torch.Tensor:
    """Every floating tensor of a model output (tensor, tuple, dict, ``ModelOutput``) flattened
    into one vector, so a detector's several heads all count in the output MSE.

    >>> flat_output((torch.ones(2, 2), {"b": torch.zeros(3)})).shape
    torch.Size([7])
    """
    parts: list[torch.Tensor] = []

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            if x.is_floating_point():
                parts.append(x.detach().float().reshape(-1).cpu())
        elif isinstance(x, dict) or hasattr(x, "items"):
            for v in x.values():
                visit(v)
        elif isinstance(x, (tuple, list)):
            for v in x:
                visit(v)

    visit(out)
    if not parts:
        raise TypeError(f"no floating tensor in a {type(out).__name__} output")
    return torch.cat(parts)


def outputs(model: nn.Module, inputs: Sequence[Any]) -> list[torch.Tensor]:
    """``flat_output`` of ``model`` on every input batch (no gradients)."""
    from lowbit.batches import call_model
    from lowbit.ptq.convert import model_device, to_device

    device = model_device(model)
    with torch.no_grad():
        return [flat_output(call_model(model, to_device(b, device))) for b in inputs]


def backend_latencies(
    float_model: nn.Module,
    qmodel: nn.Module | None,
    batch: Any,
    repeats: int,
    onnx: bool = True,
    min_seconds: float = 0.5,
    float_onnx: Path | None = None,
    time_reference: bool = True,
) -> list[dict[str, Any]]:
    """Latency of ``qmodel`` (``None``: the float model alone) on ``batch`` on every backend present,
    each with the float model timed in the same run. ``float_onnx``: the float model's export on
    ``batch`` (``lowbit.eval.ort.export_float``), reused instead of exporting it again.
    ``time_reference=False``: a PyTorch model that runs the reference path only is not timed (it
    could not be called faster anyway); its row names the path."""
    from lowbit.eval.latency import backend_of, compare_latency, is_real_kernel, median_ms
    from lowbit.eval.ort import available, ort_latency

    rows: list[dict[str, Any]] = []
    if qmodel is None:
        from lowbit.batches import call_model

        with torch.no_grad():
            ms = median_ms(lambda: call_model(float_model, batch), repeats=max(repeats, 5))
        rows.append(_latency_row("pytorch", backend_of(float_model), ms, ms, 1.0, False))
    elif not time_reference and not is_real_kernel(backend_of(qmodel)):
        rows.append(_latency_row("pytorch", backend_of(qmodel), None, None, None, False))
        rows[-1]["note"] = "reference path (dequantize + float op): not timed in --quick"
    else:
        lat = compare_latency(
            float_model, qmodel, batch, repeats=repeats, warmup=min(repeats, 3), min_seconds=min_seconds
        )
        rows.append(_latency_row("pytorch", lat.backend, lat.quant_ms, lat.float_ms, lat.speedup, lat.noisy))
        if not is_real_kernel(lat.backend):
            rows[-1]["note"] = "reference path (dequantize + float op): no speed-up claimed"
    if onnx and available():
        ort = ort_latency(
            float_model,
            qmodel if qmodel is not None else float_model,
            batch,
            repeats=repeats,
            warmup=min(repeats, 3),
            openvino=True,
            float_onnx=float_onnx,
        )
        if ort is not None:
            rows.append(_runtime_row("onnxruntime", ort))
            if "openvino" in ort:
                rows.append(_runtime_row("openvino", ort["openvino"]))
    if torch.cuda.is_available():
        rows.append(_cuda_latency(float_model, qmodel, batch, repeats))
    return rows


def _latency_row(
    runtime: str, backend: str, ms: float | None, float_ms: float | None, speedup: float | None, noisy: bool
) -> dict[str, Any]:
    return {
        "runtime": runtime,
        "backend": backend,
        "latency_ms": ms,
        "float_ms": float_ms,
        "speedup": speedup,
        "noisy": bool(noisy),
    }


def _runtime_row(runtime: str, result: dict[str, Any]) -> dict[str, Any]:
    if "error" in result:
        return {
            "runtime": runtime,
            "backend": None,
            "latency_ms": None,
            "float_ms": None,
            "speedup": None,
            "noisy": False,
            "error": result["error"],
        }
    return _latency_row(
        runtime, result["backend"], result["quant_ms"], result["float_ms"], result["speedup"], result["noisy"]
    )


def _cuda_latency(
    float_model: nn.Module, qmodel: nn.Module | None, batch: Any, repeats: int
) -> dict[str, Any]:
    from lowbit.eval.latency import backend_of, compare_latency

    try:
        f = copy.deepcopy(float_model).cuda()
        q = f if qmodel is None else copy.deepcopy(qmodel).cuda()
        lat = compare_latency(f, q, batch, repeats=repeats)
        speedup = 1.0 if qmodel is None else lat.speedup
        return _latency_row(
            "cuda",
            f"{backend_of(q)} on {torch.cuda.get_device_name()}",
            lat.quant_ms,
            lat.float_ms,
            speedup,
            lat.noisy,
        )
    except Exception as err:  # a format without a CUDA path is a finding for the table, not a crash
        return {
            "runtime": "cuda",
            "backend": None,
            "latency_ms": None,
            "float_ms": None,
            "speedup": None,
            "noisy": False,
            "error": f"{type(err).__name__}: {err}".splitlines()[0][:200],
        }


def _error(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return (text.splitlines() or [text])[0][:300]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Per-layer warnings (layers kept float, fidelity) are summarised by the table itself."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@dataclass
class _Float:
    scores: dict[str, float]
    outputs: list[torch.Tensor]
    bytes: int
    parameters: int
    bits: float
    latency: list[dict[str, Any]]
    onnx_path: Path | None  # the float export every row's ONNX timing reuses
    onnx_error: str | None  # why the float model does not export (then no row is timed in ONNX)


def _measure_float(task: DomainTask, repeats: int, onnx: bool, min_seconds: float, folder: Path) -> _Float:
    from lowbit.eval.evaluate import measure_disk
    from lowbit.eval.ort import available, export_float

    disk = measure_disk(task.model)
    path: Path | None = None
    error: str | None = None
    if onnx and available():
        path = folder / "float.onnx"
        error = export_float(task.model, task.inputs[0], path)
    latency = backend_latencies(
        task.model, None, task.inputs[0], repeats, onnx and error is None, min_seconds, float_onnx=path
    )
    if error is not None:
        latency.append(_runtime_row("onnxruntime", {"error": error}))
    return _Float(
        scores=task.score(task.model),
        outputs=outputs(task.model, task.inputs),
        bytes=disk.disk_bytes,
        parameters=disk.size.parameters,
        bits=disk.size.bits_per_param,
        latency=latency,
        onnx_path=None if error else path,
        onnx_error=error,
    )


def _rows_for(
    task: DomainTask,
    tech: DomainTechnique,
    base: _Float,
    repeats: int,
    onnx: bool,
    min_seconds: float,
    quick: bool = False,
) -> list[Row]:
    """The rows (one per metric) of one technique on one task."""
    from lowbit.eval.evaluate import measure_disk

    def row(metric: str, **values: Any) -> Row:
        return Row(
            task.domain,
            task.name,
            tech.name,
            metric,
            task.higher_is_better(metric),
            float_value=base.scores.get(metric),
            family=tech.family,
            **values,
        )

    if tech.name == "float":
        return [
            row(
                m,
                value=base.scores.get(m),
                bytes=base.bytes,
                float_bytes=base.bytes,
                parameters=base.parameters,
                bits_per_param=base.bits,
                mse=0.0,
                latency=base.latency,
                quantize_seconds=0.0,
            )
            for m in task.metrics
        ]
    reason = task.skip.get(tech.name)
    if reason is None and tech.trains and not task.train_data:
        reason = "no training data for this model"
    if reason is not None:
        return [row(m, notes=[f"not applicable: {reason}"]) for m in task.metrics]
    started = time.perf_counter()
    try:
        with _quiet():
            qmodel = tech.build(task)
            built = time.perf_counter() - started
            scores = task.score(qmodel)
            disk = measure_disk(qmodel)
            err = _output_mse(base.outputs, outputs(qmodel, task.inputs))
            latency = backend_latencies(
                task.model,
                qmodel,
                task.inputs[0],
                repeats,
                onnx,
                min_seconds,
                float_onnx=base.onnx_path,
                time_reference=not quick,
            )
    except Exception as exc:  # one technique failing on one model is a row, not a crash
        return [row(m, error=_error(exc)) for m in task.metrics]
    return [
        row(
            m,
            value=scores.get(m),
            bytes=disk.disk_bytes,
            float_bytes=base.bytes,
            parameters=disk.size.parameters,
            bits_per_param=disk.size.bits_per_param,
            mse=err,
            latency=latency,
            quantize_seconds=built,
        )
        for m in task.metrics
    ]


def _output_mse(reference: list[torch.Tensor], quantized: list[torch.Tensor]) -> float | None:
    """Output MSE against float, or ``None`` when the outputs differ in size (a detector that
    returns one row per object found: its own metric compares them)."""
    from lowbit.eval.metrics import mse

    if any(r.shape != q.shape for r, q in zip(reference, quantized, strict=True)):
        return None
    return mse(reference, quantized)


def _say(stream: TextIO | None, text: str) -> None:
    if stream is not None:
        print(text, file=stream, flush=True)


def _prebuild(
    domains: list[str], models: Sequence[str] | None, quick: bool, workers: int, stream: TextIO | None
) -> dict[str, float | None]:
    """Train (or load) the run's models in ``workers`` processes first; seconds per job."""
    from lowbit.domains.prebuild import Job, prebuild

    if workers < 2:
        return {}
    grouped, single = [], []
    for domain in sorted(domains, key=lambda d: BUILD_ORDER.index(d) if d in BUILD_ORDER else -1):
        try:
            found = builders(domain)
            together = getattr(importlib.import_module(DOMAIN_MODULES[domain]), "BUILD_TOGETHER", False)
        except ImportError:  # reported as a row by the main loop
            continue
        names = tuple(n for n in found if not models or n in models)
        if together and names:
            grouped.append(Job(DOMAIN_MODULES[domain], names))
        else:
            # One job per model, the last listed first (classification lists its cheapest first).
            single += [Job(DOMAIN_MODULES[domain], (n,)) for n in reversed(names)]
    jobs = grouped + single  # the longest chains first, so no worker is left with one at the end
    t0 = time.perf_counter()
    seconds = prebuild(jobs, quick, workers)
    _say(stream, f"[build] models trained or loaded in {workers} processes: {time.perf_counter() - t0:.1f} s")
    return seconds


def _task_rows(
    task: DomainTask,
    chosen: Sequence[DomainTechnique],
    quick: bool,
    repeats: int,
    onnx: bool,
    min_seconds: float,
    stream: TextIO | None,
    on_row: Callable[[Row], None] | None,
) -> list[Row]:
    """Every technique's rows on one built task, printed as they come."""
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="lowbit-domains-") as folder:
        base = _measure_float(task, repeats, onnx, min_seconds, Path(folder))
        # When the float model does not export, no quantized variant can be timed against it.
        if base.onnx_error is not None:
            task.notes.append(
                f"ONNX Runtime / OpenVINO not timed: the float model does not export ({base.onnx_error})"
            )
        for tech in chosen:
            t1 = time.perf_counter()
            timed_onnx = onnx and base.onnx_error is None and (not quick or tech.name in QUICK_ONNX)
            new = _rows_for(task, tech, base, repeats, timed_onnx, min_seconds, quick)
            rows.extend(new)
            first = new[0]
            shown = "n/a" if first.value is None else f"{first.value:.4g}"
            _say(
                stream,
                f"    {tech.name:<20} {task.primary}={shown:<8} ({time.perf_counter() - t1:.1f} s)"
                + (f"  ERROR {first.error}" if first.error else ""),
            )
            if on_row is not None:
                for r in new:
                    on_row(r)
    return rows


def run_suite(
    *,
    domains: Sequence[str] | None = None,
    models: Sequence[str] | None = None,
    techniques: Sequence[str] | None = None,
    quick: bool = False,
    repeats: int | None = None,
    onnx: bool = True,
    stream: TextIO | None = sys.stdout,
    on_row: Callable[[Row], None] | None = None,
    workers: int | None = None,
) -> SuiteResult:
    """Build, quantize and score every task of ``domains`` (default all) with every technique.

    ``models`` / ``techniques`` restrict the run by name. ``quick`` shrinks held-out data and
    timing repeats, times ONNX Runtime / OpenVINO for ``QUICK_ONNX`` rows only and fine-tunes the
    training rows on ``QUICK_FINETUNE_SHARE`` of each pass (every row is still measured; the
    trained models and their cache are the same). ``onnx=False`` skips the ONNX Runtime /
    OpenVINO latency columns. ``workers``: processes that train or load the models (and build the
    C++ kernel) before anything is measured (``lowbit.domains.prebuild``; default 2 where there
    are 2 or more cores, 1: build each model in the main run).

    >>> result = run_suite(domains=["classification"], models=["none"], stream=None)  # doctest: +SKIP
    """
    from lowbit.domains.techniques import technique
    from lowbit.report.writer import environment

    chosen = [technique(t) for t in techniques] if techniques else list(TECHNIQUES)
    if chosen[0].name != "float":  # every table needs its baseline
        chosen = [technique("float"), *[t for t in chosen if t.name != "float"]]
    repeats = repeats if repeats is not None else (3 if quick else 20)
    min_seconds = 0.1 if quick else 0.5
    started = time.perf_counter()
    rows: list[Row] = []
    tasks: list[dict[str, Any]] = []
    workers = workers if workers is not None else (2 if (os.cpu_count() or 1) >= 2 else 1)
    build_seconds = _prebuild(list(domains or DOMAINS), models, quick, workers, stream)
    for domain in domains or DOMAINS:
        try:
            domain_builders = builders(domain)
        except ImportError as exc:  # a domain whose module or package is missing: one row saying so
            rows.append(Row(domain, "*", "float", None, None, error=_error(exc)))
            _say(stream, f"[{domain}] not available ({_error(exc)})")
            continue
        for name, build in domain_builders.items():
            if models and name not in models:
                continue
            t0 = time.perf_counter()
            try:
                with _quiet():
                    task = build(quick)
            except Exception as exc:  # a missing package or program: one row saying so
                rows.append(Row(domain, name, "float", None, None, error=_error(exc)))
                _say(stream, f"[{domain}] {name}: not built ({_error(exc)})")
                tasks.append({"domain": domain, "model": name, "error": _error(exc)})
                continue
            build_s = time.perf_counter() - t0
            _say(stream, f"[{domain}] {name}: {task.description} (built in {build_s:.1f} s)")
            if quick and task.train_data:
                task.train_data = FirstBatches(task.train_data, len(task.train_data) * QUICK_FINETUNE_SHARE)
            rows.extend(_task_rows(task, chosen, quick, repeats, onnx, min_seconds, stream, on_row))
            tasks.append(
                {
                    "domain": domain,
                    "model": name,
                    "description": task.description,
                    "build_seconds": build_s,
                    "train_seconds": task.train_seconds,
                    "seconds": time.perf_counter() - t0,
                    "notes": task.notes,
                }
            )
    meta = {
        "title": "lowbit domain tables",
        "quick": quick,
        "workers": workers,
        "prebuild_seconds": build_seconds,
        "repeats": repeats,
        "seconds": time.perf_counter() - started,
        "environment": environment(),
        "techniques": [{"name": t.name, "family": t.family, "description": t.description} for t in chosen],
    }
    return SuiteResult(rows, meta, tasks)
