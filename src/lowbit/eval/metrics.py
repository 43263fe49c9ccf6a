"""Task metrics and output-error measures shared by evaluation, benchmarks and search.

Data conventions (see ``lowbit.zoo.ZooModel``): for ``accuracy`` each item is ``(inputs, labels)``;
for ``cosine`` each item is an input batch and the reference is the float model's own output; for
``perplexity`` items are dict batches with ``input_ids``.

>>> import torch
>>> model = torch.nn.Linear(4, 3)
>>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
>>> 0.0 <= accuracy(model, data) <= 1.0
True
>>> round(sqnr_db(torch.ones(4), torch.ones(4) * 1.1), 1)
20.0
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lowbit.ptq.convert import model_device, to_device
from lowbit.zoo.base import call_model

METRICS = ("accuracy", "cosine", "perplexity")
# Whether a larger value of the metric is better (used to express "drop" the same way for all).
HIGHER_IS_BETTER = {"accuracy": True, "cosine": True, "perplexity": False}


def output_tensor(out: Any) -> torch.Tensor:
    """The main tensor of a model output: a tensor itself, ``.logits``, ``.last_hidden_state``, or
    the first element of a tuple.

    >>> output_tensor((torch.ones(1), torch.zeros(1))).tolist()
    [1.0]
    """
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("logits", "last_hidden_state"):
        value = getattr(out, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find the output tensor in a {type(out).__name__}")


def model_outputs(model: nn.Module, batches: Iterable[Any]) -> list[torch.Tensor]:
    """The model's main output tensor for every input batch (no gradients, on CPU, float32)."""
    device = model_device(model)
    outs = []
    with torch.no_grad():
        for batch in batches:
            outs.append(output_tensor(call_model(model, to_device(batch, device))).detach().float().cpu())
    return outs


def accuracy(model: nn.Module, data: Iterable[tuple[Any, torch.Tensor]]) -> float:
    """Fraction of correct top-1 predictions over ``(inputs, labels)`` batches."""
    correct = total = 0
    device = model_device(model)
    with torch.no_grad():
        for inputs, labels in data:
            logits = output_tensor(call_model(model, to_device(inputs, device)))
            correct += int((logits.argmax(dim=-1).cpu() == labels.cpu()).sum())
            total += labels.numel()
    if total == 0:
        raise ValueError("accuracy needs at least one labelled example")
    return correct / total


def cosine_per_row(reference: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Cosine similarity of every output row (last dim = features) to the reference row.

    >>> cosine_per_row([torch.tensor([[1.0, 0.0]])], [torch.tensor([[1.0, 1.0]])]).tolist()
    [0.7071067690849304]
    """
    rows = []
    for ref, out in zip(reference, outputs, strict=True):
        r, o = ref.float().reshape(-1, ref.shape[-1]), out.float().reshape(-1, out.shape[-1])
        rows.append(torch.nn.functional.cosine_similarity(r, o, dim=1, eps=1e-12))
    return torch.cat(rows)


def mse(reference: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> float:
    """Mean squared difference over all output values."""
    total = count = 0.0
    for ref, out in zip(reference, outputs, strict=True):
        total += float(((ref.double() - out.double()) ** 2).sum())
        count += ref.numel()
    return total / max(count, 1)


def sqnr_db(
    reference: torch.Tensor | Sequence[torch.Tensor], outputs: torch.Tensor | Sequence[torch.Tensor]
) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum ref^2 / sum (ref - out)^2)``.

    ``inf`` when the outputs are identical.
    """
    refs = [reference] if isinstance(reference, torch.Tensor) else list(reference)
    outs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    signal = sum(float((r.double() ** 2).sum()) for r in refs)
    noise = sum(float(((r.double() - o.double()) ** 2).sum()) for r, o in zip(refs, outs, strict=True))
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-300) / noise)


def task_score(
    model: nn.Module,
    data: Sequence[Any],
    metric: str,
    reference: Sequence[torch.Tensor] | None = None,
) -> float:
    """The task metric of ``model`` on ``data``: accuracy (fraction), mean cosine to ``reference``
    outputs (the float model's, on the same inputs), or perplexity."""
    if metric == "accuracy":
        return accuracy(model, data)
    if metric == "cosine":
        if reference is None:
            raise ValueError("the cosine metric needs the float model's outputs as reference")
        return float(cosine_per_row(reference, model_outputs(model, data)).mean())
    if metric == "perplexity":
        from lowbit.eval.perplexity import perplexity

        return perplexity(model, data)
    raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")


def metric_drop(metric: str, before: float, after: float) -> float:
    """How much worse ``after`` is than ``before`` (positive = worse), in the metric's own units;
    accuracy and cosine in points (x100), perplexity as a ratio minus one, in percent."""
    if metric == "perplexity":
        return (after / before - 1.0) * 100.0
    return (before - after) * 100.0
