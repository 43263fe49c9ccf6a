"""Loss you can see: after ``quantize``, each quantized layer and the whole model are compared with
the float model on a few calibration batches, and what falls below a threshold is named.

Per layer, the quantized layer's output is compared with the float layer's output *on the same
input* (the input the quantized model actually feeds it), so the figure is the layer's own error,
not the error accumulated before it. For the model, the first tensor of the outputs is compared.
Cosine similarity over all elements of the checked batches (float64 sums).

>>> import torch, lowbit
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
>>> calib = [torch.randn(32, 16) for _ in range(4)]
>>> q = lowbit.quantize(model, "int8-static", calibration=calib, progress=False)
>>> f = q.lowbit_fidelity
>>> sorted(f.layers), f.output > 0.99, f.findings()
(['0', '2'], True, [])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit.batches import call_model
from lowbit.nn.base import QuantizedModule
from lowbit.ptq.convert import model_device, to_device

LAYER_COSINE = 0.98  # below this a layer's own output error is worth a look
OUTPUT_COSINE = 0.95  # below this the model's output has moved enough to change decisions
CHECK_BATCHES = 2


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, Mapping) else out if isinstance(out, tuple | list) else ()
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


class _Cosine:
    def __init__(self) -> None:
        self.dot = self.a = self.b = 0.0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.detach().double().flatten(), y.detach().double().flatten()
        self.dot += float(x @ y)
        self.a += float(x @ x)
        self.b += float(y @ y)

    def value(self) -> float:
        if self.a == 0.0 and self.b == 0.0:
            return 1.0  # both zero: identical
        if self.a == 0.0 or self.b == 0.0:
            return 0.0
        return self.dot / math.sqrt(self.a * self.b)


@dataclass
class Fidelity:
    """Cosine of each quantized layer (name -> value) and of the model's output vs float."""

    layers: dict[str, float] = field(default_factory=dict)
    output: float | None = None
    formats: dict[str, str] = field(default_factory=dict)  # layer -> its weight format, for messages

    def findings(self, layer_min: float = LAYER_COSINE, output_min: float = OUTPUT_COSINE) -> list[str]:
        """One line per problem: the worst layers below ``layer_min``, the output below ``output_min``."""
        out = []
        low = sorted((c, n) for n, c in self.layers.items() if c < layer_min)
        if low:
            shown = ", ".join(f"{n} ({self.formats.get(n, '?')}: {c:.3f})" for c, n in low[:5])
            more = f" and {len(low) - 5} more" if len(low) > 5 else ""
            out.append(
                f"{len(low)} quantized layer(s) reproduce their float output with cosine below "
                f"{layer_min} on the calibration data: {shown}{more}; keep them at 8 bits (an "
                "override), exclude them, use a finer granularity (group:64 or channel), or a "
                "data-aware algorithm (gptq)"
            )
        if self.output is not None and self.output < output_min:
            out.append(
                f"the quantized model's output has cosine {self.output:.3f} with the float model's on the "
                f"calibration data (below {output_min}); check the task metric (lowbit.evaluate) and "
                "lowbit.sensitivity for the layers that cost most"
            )
        return out


def measure(float_model: nn.Module, qmodel: nn.Module, batches: Sequence[Any]) -> Fidelity:
    """Compare ``qmodel`` with ``float_model`` (same architecture) on ``batches`` (see the module doc)."""
    result = Fidelity()
    layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantizedModule)}
    if not layers or not batches:
        return result
    cosines = {n: _Cosine() for n in layers}
    output = _Cosine()

    def hook(name: str, float_layer: nn.Module) -> Any:
        def run(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            ref = _first_tensor(float_layer(*args, **kwargs))
            got = _first_tensor(out)
            if ref is not None and got is not None and ref.shape == got.shape:
                cosines[name].add(got, ref)

        return run

    handles = []
    try:
        for name, layer in layers.items():
            float_layer = float_model.get_submodule(name)
            handles.append(layer.register_forward_hook(hook(name, float_layer), with_kwargs=True))
            weights = layer.quantized_weights()
            if weights:
                result.formats[name] = next(iter(weights.values())).fmt.name
        device = model_device(qmodel)
        was = qmodel.training, float_model.training
        qmodel.eval()
        float_model.eval()
        with torch.no_grad():
            for batch in batches:
                batch = to_device(batch, device)
                got = _first_tensor(call_model(qmodel, batch))
                ref = _first_tensor(call_model(float_model, batch))
                if got is not None and ref is not None and got.shape == ref.shape:
                    output.add(got, ref)
        qmodel.train(was[0])
        float_model.train(was[1])
    finally:
        for h in handles:
            h.remove()
    result.layers = {n: c.value() for n, c in cosines.items() if c.a or c.b}
    result.output = output.value() if output.a or output.b else None
    return result
