"""What sensitivity analysis and search share: candidate formats, scoring a model, swapping layers.

Both tools ask the same question many times ("what does the metric become if layer X is stored
as format F?"), so they quantize each (layer, format) pair once, swap the quantized module into
one working copy of the float model, score it, and swap the float module back. No model is copied
per question, and no weight is quantized twice.

>>> sorted(CANDIDATES)
['float', 'fp16', 'int2', 'int3', 'int4', 'int8']
>>> CANDIDATES["int4"].granularity
'group:64'
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.eval.metrics import HIGHER_IS_BETTER, cosine_per_row, metric_drop, model_outputs, task_score
from lowbit.nn.base import QuantizedModule
from lowbit.nn.layers import QUANTIZED_CLASSES
from lowbit.ptq.convert import set_submodule
from lowbit.recipes.spec import ActivationSpec, WeightSpec

# Weight-only candidates. int4 uses groups of 64 like the ``int4-weight-only`` preset; the lower
# widths use groups of 32 because their error grows fastest with the group's range. ``None`` means
# the layer stays float (a ``LayerRule(skip=True)`` in the searched recipe).
CANDIDATES: dict[str, WeightSpec | None] = {
    "float": None,
    "fp16": WeightSpec(format="fp16", granularity="tensor"),
    "int8": WeightSpec(format="int8", granularity="channel"),
    "int4": WeightSpec(format="uint4", granularity="group:64", symmetric=False, algorithm="mse"),
    "int3": WeightSpec(format="uint3", granularity="group:32", symmetric=False, algorithm="mse"),
    "int2": WeightSpec(format="uint2", granularity="group:32", symmetric=False, algorithm="mse"),
}
DEFAULT_CANDIDATES = ("fp16", "int8", "int4", "int3", "int2", "float")

Candidate = str | tuple[str, WeightSpec | None]


def resolve_candidates(candidates: Sequence[Candidate]) -> dict[str, WeightSpec | None]:
    """Candidate names (keys of ``CANDIDATES``) or ``(label, WeightSpec | None)`` pairs -> dict.

    >>> list(resolve_candidates(["int8", ("nf4", WeightSpec(format="nf4", granularity="group:64"))]))
    ['int8', 'nf4']
    """
    out: dict[str, WeightSpec | None] = {}
    for cand in candidates:
        if isinstance(cand, tuple):
            label, spec = cand
            out[str(label)] = spec
        elif cand in CANDIDATES:
            out[cand] = CANDIDATES[cand]
        else:
            known = ", ".join(CANDIDATES)
            raise ValueError(f"unknown candidate {cand!r}; use one of {known} or a (label, WeightSpec) pair")
    if not out:
        raise ValueError("give at least one candidate format")
    return out


def split_data(data: Sequence[Any], metric: str) -> tuple[list[Any], list[torch.Tensor] | None]:
    """Model inputs and, for ``accuracy``, the labels of every ``(inputs, labels)`` item."""
    if metric == "accuracy":
        return [x for x, _ in data], [y for _, y in data]
    return list(data), None


def output_sqnr_db(reference: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> float:
    """SQNR of ``outputs`` against ``reference`` in dB (``inf`` when identical)."""
    signal = sum(float((r.double() ** 2).sum()) for r in reference)
    noise = sum(
        float(((r.double() - o.double()) ** 2).sum()) for r, o in zip(reference, outputs, strict=True)
    )
    return math.inf if noise == 0.0 else 10.0 * math.log10(max(signal, 1e-300) / noise)


@dataclass
class Score:
    """One measurement: the task metric, its drop from float, and the model output's SQNR.

    ``risk`` is the drop that counts only losses: for accuracy, the share (in points) of examples
    the float model gets right and this one gets wrong. Lucky fixes of float's mistakes do not
    carry over to new data, so search decides by ``risk``; for other metrics it equals ``drop``.
    """

    value: float
    drop: float
    output_sqnr_db: float
    seconds: float
    risk: float = 0.0


class Evaluator:
    """Scores models on fixed data against the float model (computed once, at construction).

    ``reference`` (cosine metric): the float model's outputs on ``data``; computed when ``None``.
    ``unlabelled`` (accuracy metric): extra input batches; the share whose top-1 prediction differs
    from float's also counts towards ``Score.risk`` (more examples than the labelled ones alone).

    >>> model = torch.nn.Linear(4, 3)
    >>> ev = Evaluator(model, [(torch.randn(8, 4), torch.randint(0, 3, (8,)))], "accuracy")
    >>> ev.score(model).drop
    0.0
    """

    def __init__(
        self,
        model: nn.Module,
        data: Sequence[Any],
        metric: str,
        reference: Sequence[torch.Tensor] | None = None,
        unlabelled: Sequence[Any] | None = None,
    ) -> None:
        if metric not in HIGHER_IS_BETTER:
            raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(HIGHER_IS_BETTER)}")
        if not data:
            raise ValueError("the evaluation data is empty: pass at least one batch")
        self.data, self.metric = list(data), metric
        self.inputs, self.labels = split_data(self.data, metric)
        self.float_outputs = model_outputs(model, self.inputs)
        self.reference = list(reference) if reference is not None else self.float_outputs
        self.float_value = self._value(model, self.float_outputs)
        if self.labels is not None:
            self.float_correct = [
                o.argmax(-1) == y.cpu() for o, y in zip(self.float_outputs, self.labels, strict=True)
            ]
        self.unlabelled = list(unlabelled or []) if metric == "accuracy" else []
        self.float_top1 = [o.argmax(-1) for o in model_outputs(model, self.unlabelled)]

    def _value(self, model: nn.Module, outputs: list[torch.Tensor]) -> float:
        if self.metric == "accuracy":
            assert self.labels is not None
            correct = sum(
                int((o.argmax(-1) == y.cpu()).sum()) for o, y in zip(outputs, self.labels, strict=True)
            )
            return correct / max(sum(y.numel() for y in self.labels), 1)
        if self.metric == "cosine":
            return float(cosine_per_row(self.reference, outputs).mean())
        return task_score(model, self.data, self.metric)

    def score(self, model: nn.Module) -> Score:
        """Score ``model`` (float or partly quantized) on this evaluator's data."""
        started = time.perf_counter()
        outputs = model_outputs(model, self.inputs)
        value = self._value(model, outputs)
        drop = metric_drop(self.metric, self.float_value, value)
        risk = drop
        if self.labels is not None:
            lost = sum(
                int((fc & (o.argmax(-1) != y.cpu())).sum())
                for fc, o, y in zip(self.float_correct, outputs, self.labels, strict=True)
            )
            risk = 100.0 * lost / max(sum(y.numel() for y in self.labels), 1)
        if self.unlabelled:
            top1 = [o.argmax(-1) for o in model_outputs(model, self.unlabelled)]
            flips = sum(int((a != b).sum()) for a, b in zip(self.float_top1, top1, strict=True))
            risk = max(risk, 100.0 * flips / max(sum(t.numel() for t in top1), 1))
        return Score(
            value, drop, output_sqnr_db(self.float_outputs, outputs), time.perf_counter() - started, risk
        )


def quantize_layer(
    module: nn.Module, kind: str, spec: WeightSpec, name: str, activation: ActivationSpec | None = None
) -> QuantizedModule:
    """The quantized counterpart of one float layer (weights quantized now, activations as given)."""
    qmodule = QUANTIZED_CLASSES[kind].from_float(module, spec, name=name)
    qmodule.set_activation(activation, name)
    return qmodule.to(_device_of(module))


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def float_bytes(module: nn.Module) -> int:
    """Bytes of a float layer's parameters as stored (weights and biases)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


@contextlib.contextmanager
def swapped(model: nn.Module, replacements: dict[str, nn.Module]) -> Iterator[nn.Module]:
    """Temporarily replace submodules of ``model`` by name; the originals come back on exit."""
    originals = {name: model.get_submodule(name) for name in replacements}
    try:
        for name, new in replacements.items():
            set_submodule(model, name, new)
        yield model
    finally:
        for name, old in originals.items():
            set_submodule(model, name, old)


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'`` (powers of 1024).

    >>> human_bytes(1536), human_bytes(3 * 1024**2)
    ('1.5 KiB', '3.0 MiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def halve_batch(batch: Any) -> tuple[Any, Any]:
    """Split one batch (tensor, dict or tuple of tensors) into two halves along the first dimension.

    >>> [t.shape[0] for t in halve_batch(torch.zeros(5, 2))]
    [2, 3]
    """
    if isinstance(batch, torch.Tensor):
        if batch.shape[0] < 2:
            raise ValueError("cannot hold out part of a one-example batch: pass holdout=... or more data")
        h = batch.shape[0] // 2
        return batch[:h], batch[h:]
    if isinstance(batch, Mapping):
        halves = {k: halve_batch(v) for k, v in batch.items()}
        return {k: v[0] for k, v in halves.items()}, {k: v[1] for k, v in halves.items()}
    if isinstance(batch, (tuple, list)):
        parts = [halve_batch(v) for v in batch]
        return type(batch)(p[0] for p in parts), type(batch)(p[1] for p in parts)
    raise TypeError(f"cannot split a {type(batch).__name__} batch; pass holdout=... explicitly")
