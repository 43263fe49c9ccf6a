"""``DomainTask``: one model of the domain tables with its data, its task metric and its loss.

The domain suite (``lowbit.domains.suite``) quantizes every task with every technique and scores
the result with the task's own metric (top-1, mAP, Spearman, accuracy, perplexity, WER), so a
task carries everything the suite needs and nothing it has to guess:

* ``model``: the trained float model, eval mode, on CPU;
* ``calibration``: input batches from the *training* split (what ``lowbit.quantize`` sees);
* ``train_data``: a re-iterable of training batches and ``loss(model, batch)`` for the rows that
  train (QAT, pruning + fine-tuning);
* ``score(model) -> {metric: value}``: the held-out metrics, the primary one first;
* ``inputs``: a few held-out input batches for output MSE vs float; the first one is timed.

Batches follow ``lowbit.batches``: a tensor is the one argument, a tuple positional, a mapping
keyword arguments, a list of images for a detector's ``forward(images)``.

>>> import torch
>>> from torch import nn
>>> model = nn.Linear(4, 3).eval()
>>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
>>> task = DomainTask(
...     domain="classification", name="toy", model=model, calibration=[x],
...     train_data=[(x, y)], loss=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
...     score=lambda m: {"top1": float((m(x).argmax(-1) == y).float().mean())},
...     metrics={"top1": True}, inputs=[x])
>>> task.primary, task.higher_is_better("top1")
('top1', True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

DOMAINS = ("classification", "detection", "nlp", "speech")
# metric -> whether larger is better; every metric a row may carry (the --json schema).
METRICS = {
    "top1": True,
    "map50": True,
    "map": True,
    "iou": True,
    "count_agreement": True,
    "spearman": True,
    "accuracy": True,
    "perplexity": False,
    "wer": False,
}

LossFn = Callable[[nn.Module, Any], torch.Tensor]
ScoreFn = Callable[[nn.Module], dict[str, float]]


@dataclass
class DomainTask:
    """One model of the domain tables (see the module docstring).

    ``metrics`` names the metrics ``score`` returns, primary first, each mapped to
    higher-is-better. ``skip`` maps a technique name to the reason it does not apply to this
    model (the row is written with that reason instead of a value). ``train_seconds`` is how long
    building took (0 when the weights came from the cache). ``notes`` are printed under the table.
    """

    domain: str
    name: str
    model: nn.Module
    calibration: list[Any]
    train_data: Iterable[Any]
    loss: LossFn
    score: ScoreFn
    metrics: dict[str, bool]
    inputs: list[Any]
    description: str = ""
    skip: dict[str, str] = field(default_factory=dict)
    train_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    # Optional: fine-tuning length for the training rows (QAT, pruning), in passes over train_data.
    finetune_epochs: int = 1
    finetune_lr: float = 1e-4

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise ValueError(f"unknown domain {self.domain!r}; choose one of {', '.join(DOMAINS)}")
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"task {self.name}: unknown metric(s) {unknown}; known: {', '.join(METRICS)}")
        if not self.metrics:
            raise ValueError(f"task {self.name}: give at least one metric")
        if not self.inputs:
            raise ValueError(f"task {self.name}: give at least one held-out input batch")

    @property
    def primary(self) -> str:
        """The metric the table is sorted and checked by (the first of ``metrics``)."""
        return next(iter(self.metrics))

    def higher_is_better(self, metric: str) -> bool:
        return self.metrics[metric]
