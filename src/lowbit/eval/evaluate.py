"""``lowbit.evaluate``: what a quantized model bought (size, speed) and cost (task metric, error).

One call measures, on the same data and in the same process:

* the task metric of the float and the quantized model (accuracy, cosine fidelity, perplexity);
* output MSE and SQNR of the quantized model against the float model;
* per-layer error (``lowbit.eval.layers``): which layers lose the most;
* size: the artifact is really written with ``lowbit.save`` to a temporary directory and the
  bytes on disk are read back, next to ``size_report``'s bits per parameter;
* latency: medians of interleaved repeats, float baseline in the same run, and the backend that
  actually ran (the reference simulation is labelled as such and never called faster).

>>> import torch, lowbit
>>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
>>> data = [(torch.randn(8, 16), torch.randint(0, 4, (8,)))]
>>> q = lowbit.quantize(model, "int8-weight-only", progress=False)
>>> rec = evaluate(model, q, data, metric="accuracy", repeats=3)
>>> rec.disk_bytes == rec.to_dict()["size"]["disk_bytes"], rec.latency.speedup
(True, None)
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.eval.latency import Latency, compare_latency
from lowbit.eval.layers import LayerError, layer_errors
from lowbit.eval.metrics import METRICS, cosine_per_row, metric_drop, model_outputs, mse, sqnr_db, task_score
from lowbit.export.artifact import MANIFEST_FILE, load, save
from lowbit.modelcheck import require_module
from lowbit.size import SizeReport, size_report


def _finite(x: float | None) -> float | None:
    """JSON has no inf / nan: a lossless SQNR becomes ``None`` (shown as "lossless")."""
    if x is None or math.isnan(x) or math.isinf(x):
        return None
    return x


@dataclass
class DiskSize:
    """What ``lowbit.save`` wrote: the tensor file and the manifest, in bytes, read back from disk."""

    disk_bytes: int  # model.safetensors as stored (header + packed tensors)
    manifest_bytes: int  # lowbit.json
    size: SizeReport  # tensor bytes and bits / parameter, overall and per layer


def measure_disk(model: nn.Module, directory: str | Path | None = None) -> DiskSize:
    """Save ``model`` with ``lowbit.save`` (to a temporary directory unless ``directory`` is given)
    and return the file sizes found on disk.

    >>> import torch
    >>> d = measure_disk(torch.nn.Linear(10, 10))
    >>> d.disk_bytes > d.size.stored_bytes == 440
    True
    """
    with tempfile.TemporaryDirectory(prefix="lowbit-eval-") as tmp:
        target = Path(directory) if directory is not None else Path(tmp) / "artifact"
        manifest = save(model, target)
        weights = target / manifest["file"]["name"]
        disk = os.path.getsize(weights)
        if disk != manifest["file"]["bytes"]:  # would mean the manifest lies about the file
            raise RuntimeError(f"{weights} is {disk} bytes but its manifest says {manifest['file']['bytes']}")
        manifest_path = target / MANIFEST_FILE
        if not manifest_path.is_file():  # a compressed artifact stores lowbit.json.xz
            manifest_path = target / (MANIFEST_FILE + ".xz")
        return DiskSize(disk, os.path.getsize(manifest_path), size_report(model))


def model_inputs(data: Sequence[Any], metric: str | None) -> list[Any]:
    """The input part of every data item: drops labels for ``accuracy``; other items are inputs.

    >>> model_inputs([(torch.ones(1), torch.zeros(1))], "accuracy")[0].tolist()
    [1.0]
    """
    if metric == "accuracy":
        return [item[0] for item in data]
    return list(data)


@dataclass
class Baseline:
    """Float-model measurements shared by every quantized variant of the same model and data."""

    metric: str | None
    score: float | None
    outputs: list[torch.Tensor]
    disk: DiskSize

    @classmethod
    def measure(cls, float_model: nn.Module, data: Sequence[Any], metric: str | None) -> Baseline:
        """Measure the float model once (metric, outputs on the inputs, size on disk)."""
        if metric is not None and metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)} (or None)")
        outputs = model_outputs(float_model, model_inputs(data, metric))
        score = _score(float_model, data, metric, outputs, outputs)
        return cls(metric, score, outputs, measure_disk(float_model))


@dataclass
class EvalRecord:
    """Everything ``evaluate`` measured for one quantized model (``to_dict()`` for JSON)."""

    name: str
    metric: str | None
    before: float | None  # task metric of the float model
    after: float | None  # task metric of the quantized model
    output_mse: float
    output_sqnr_db: float
    parameters: int
    stored_bytes: int  # tensor bytes (size_report): codes, scales, codebooks, float leftovers
    bits_per_param: float  # stored_bytes * 8 / parameters
    disk_bytes: int  # model.safetensors on disk, read back after lowbit.save
    float_disk_bytes: int  # the float model saved the same way
    manifest_bytes: int
    layers: list[LayerError] = field(default_factory=list)
    latency: Latency | None = None
    ort: dict[str, Any] | None = None  # ONNX Runtime latency when lowbit.runtime is available
    reload_identical: bool | None = None  # outputs after save + load equal the in-memory model's
    recipe: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # how long quantize / evaluate took
    notes: list[str] = field(default_factory=list)

    @property
    def drop(self) -> float | None:
        """How much worse the metric got, in points (accuracy, cosine) or percent (perplexity)."""
        if self.metric is None or self.before is None or self.after is None:
            return None
        return metric_drop(self.metric, self.before, self.after)

    @property
    def size_reduction(self) -> float:
        """Float bytes on disk / quantized bytes on disk."""
        return self.float_disk_bytes / max(self.disk_bytes, 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (infinities and NaN become ``None``)."""
        return {
            "name": self.name,
            "recipe": self.recipe,
            "metric": self.metric,
            "before": self.before,
            "after": self.after,
            "drop": self.drop,
            "output_mse": _finite(self.output_mse),
            "output_sqnr_db": _finite(self.output_sqnr_db),
            "size": {
                "parameters": self.parameters,
                "stored_bytes": self.stored_bytes,
                "bits_per_param": self.bits_per_param,
                "disk_bytes": self.disk_bytes,
                "float_disk_bytes": self.float_disk_bytes,
                "manifest_bytes": self.manifest_bytes,
                "size_reduction": self.size_reduction,
            },
            "latency": None if self.latency is None else self.latency.to_dict(),
            "ort": self.ort,
            "reload_identical": self.reload_identical,
            "layers": [row.to_dict() for row in self.layers],
            "seconds": self.seconds,
            "notes": self.notes,
        }


def _score(
    model: nn.Module,
    data: Sequence[Any],
    metric: str | None,
    reference: list[torch.Tensor],
    outputs: list[torch.Tensor],
) -> float | None:
    """The task metric, from outputs already computed where possible (one model pass, not two)."""
    if metric is None:
        return None
    if metric == "accuracy":
        correct = sum(int((o.argmax(-1) == y.cpu()).sum()) for o, (_x, y) in zip(outputs, data, strict=True))
        return correct / max(sum(int(y.numel()) for _x, y in data), 1)
    if metric == "cosine":
        return float(cosine_per_row(reference, outputs).mean())
    return task_score(model, data, metric, reference=reference)


def _reload_identical(float_model: nn.Module, qmodel: nn.Module, batch: Any) -> bool:
    """Save, load into a copy of the float architecture, and compare outputs bit for bit."""
    from lowbit.eval.metrics import output_tensor
    from lowbit.ptq.convert import model_device, to_device
    from lowbit.zoo.base import call_model

    with tempfile.TemporaryDirectory(prefix="lowbit-reload-") as tmp:
        save(qmodel, tmp + "/a")
        reloaded = load(tmp + "/a", model=copy.deepcopy(float_model))
    reloaded.to(model_device(qmodel))
    with torch.no_grad():
        b = to_device(batch, model_device(qmodel))
        return torch.equal(output_tensor(call_model(qmodel, b)), output_tensor(call_model(reloaded, b)))


def evaluate(
    float_model: nn.Module,
    qmodel: nn.Module,
    data: Sequence[Any],
    metric: str | None = "accuracy",
    *,
    name: str | None = None,
    latency: bool = True,
    repeats: int = 20,
    per_layer: bool = True,
    layer_batches: int | None = None,
    ort: bool = False,
    check_reload: bool = True,
    baseline: Baseline | None = None,
) -> EvalRecord:
    """Compare ``qmodel`` with ``float_model`` on ``data``; see the module docstring.

    ``data``: for ``metric="accuracy"``, ``(inputs, labels)`` batches; for ``"cosine"`` (fidelity of
    the outputs to the float model's) and ``None`` (output error only), input batches; for
    ``"perplexity"``, dict batches with ``input_ids``. ``baseline`` reuses float measurements
    across several quantized variants (``Baseline.measure``). ``latency=False`` skips timing;
    ``layer_batches`` limits the per-layer error pass to the first batches (it runs both models).
    ``ort=True`` adds ONNX Runtime latency of both models exported (``lowbit.eval.ort``), when the
    ONNX extras are installed.
    """
    require_module(float_model, "evaluate")
    require_module(qmodel, "evaluate")
    started = time.perf_counter()
    data = list(data)
    if not data:
        raise ValueError("evaluate needs at least one batch of data")
    base = baseline if baseline is not None else Baseline.measure(float_model, data, metric)
    inputs = model_inputs(data, metric)
    outputs = model_outputs(qmodel, inputs)
    after = _score(qmodel, data, metric, base.outputs, outputs)
    disk = measure_disk(qmodel)
    rec = EvalRecord(
        name=name or getattr(getattr(qmodel, "lowbit_recipe", None), "name", None) or type(qmodel).__name__,
        metric=metric,
        before=base.score,
        after=after,
        output_mse=mse(base.outputs, outputs),
        output_sqnr_db=sqnr_db(base.outputs, outputs),
        parameters=disk.size.parameters,
        stored_bytes=disk.size.stored_bytes,
        bits_per_param=disk.size.bits_per_param,
        disk_bytes=disk.disk_bytes,
        float_disk_bytes=base.disk.disk_bytes,
        manifest_bytes=disk.manifest_bytes,
        recipe=getattr(getattr(qmodel, "lowbit_recipe", None), "name", None),
    )
    if per_layer:
        rec.layers = layer_errors(float_model, qmodel, inputs, max_batches=layer_batches)
    if latency:
        rec.latency = compare_latency(float_model, qmodel, inputs[0], repeats=repeats)
    if ort:
        from lowbit.eval.ort import ort_latency

        rec.ort = ort_latency(float_model, qmodel, inputs[0], repeats=repeats)
    if check_reload:
        rec.reload_identical = _reload_identical(float_model, qmodel, inputs[0])
        if not rec.reload_identical:
            rec.notes.append("outputs after save + load differ from the in-memory model")
    rec.seconds["evaluate"] = time.perf_counter() - started
    return rec
