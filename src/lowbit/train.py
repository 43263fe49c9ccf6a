"""A small training loop for users without their own: ``fit(model, train_data, val_data, loss_fn)``.

Adam(W) or SGD, cosine learning-rate decay, a tqdm progress bar, early stopping on a validation
metric (the best weights are restored), seeded so that a run is reproducible, and wall-clock
training time reported. QAT models, pruned models (``after_step`` re-applies masks) and
distillation (``loss_fn=lowbit.distill.DistillationLoss(teacher)``) all train through it.

>>> import torch
>>> x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
>>> data = batches(x, y, batch_size=16)
>>> result = fit(torch.nn.Linear(4, 2), data, val_data=data, epochs=2, progress=False)
>>> result.epochs, 0.0 <= result.best_metric <= 1.0
(2, True)
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.eval.metrics import accuracy, output_tensor
from lowbit.ptq.convert import model_device, to_device
from lowbit.zoo.base import call_model

LossFn = Callable[[nn.Module, Any], torch.Tensor]
MetricFn = Callable[[nn.Module, Any], float]


class Batches:
    """``(inputs, labels)`` mini-batches of two tensors, reshuffled on every pass (seeded).

    >>> b = batches(torch.arange(10.0), torch.arange(10), batch_size=4, seed=1)
    >>> [len(y) for _, y in b], len(b)
    ([4, 4, 2], 3)
    """

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = True, seed: int = 0
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"inputs and labels differ in length: {len(x)} vs {len(y)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.y)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield self.x[idx], self.y[idx]


def batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int = 64, shuffle: bool = True, seed: int = 0
) -> Batches:
    """Re-iterable shuffled mini-batches of ``(x, y)`` (see ``Batches``)."""
    return Batches(x, y, batch_size, shuffle, seed)


def classification_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Cross-entropy of ``model(inputs)`` against ``labels`` for an ``(inputs, labels)`` batch."""
    inputs, labels = batch
    logits = output_tensor(call_model(model, inputs))
    return nn.functional.cross_entropy(logits, labels)


@dataclass
class FitResult:
    """What ``fit`` did: epochs run, best validation metric (and its epoch), per-epoch history, seconds."""

    epochs: int
    best_metric: float | None
    best_epoch: int | None
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False


def fit(
    model: nn.Module,
    train_data: Iterable[Any],
    val_data: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    *,
    epochs: int = 5,
    lr: float = 1e-3,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    schedule: str = "cosine",
    metric: MetricFn | None = None,
    patience: int | None = None,
    seed: int = 0,
    after_step: Callable[[], None] | None = None,
    after_epoch: Callable[[int], None] | None = None,
    restore_best: bool = True,
    progress: bool = True,
    desc: str = "training",
) -> FitResult:
    """Train ``model`` in place on ``train_data`` (a re-iterable of batches); returns a ``FitResult``.

    ``loss_fn(model, batch) -> loss`` defaults to cross-entropy on ``(inputs, labels)`` batches.
    ``metric(model, val_data) -> float`` (higher is better) defaults to top-1 accuracy; it runs
    after every epoch, with the model in eval mode. ``patience``: stop after that many epochs
    without improvement. ``after_step`` runs after every optimizer step (pruning re-applies its
    masks there), ``after_epoch(epoch)`` after every epoch (e.g. freeze QAT ranges for the last one).
    ``schedule`` is ``cosine`` (decay to 0 over ``epochs``) or ``constant``. The global RNG is left
    as it was; runs with the same ``seed`` and data are identical.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"unknown schedule {schedule!r}; use 'cosine' or 'constant'")
    if patience is not None and patience < 1:
        raise ValueError(f"patience must be >= 1 or None, got {patience}")
    loss_fn = loss_fn or classification_loss
    metric = metric or accuracy
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    opt = _optimizer(optimizer, params, lr, weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs) if schedule == "cosine" else None
    device = model_device(model)
    result = FitResult(epochs=0, best_metric=None, best_epoch=None, seconds=0.0)
    best_state: dict[str, torch.Tensor] | None = None
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress, leave=False)
        for epoch in bar:
            model.train()
            total = count = 0.0
            for batch in train_data:
                loss = loss_fn(model, to_device(batch, device))
                if not torch.isfinite(loss):
                    value = float(loss.detach())
                    raise ValueError(f"the training loss became {value} at epoch {epoch + 1}; lower lr={lr}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if after_step is not None:
                    after_step()
                total += float(loss.detach())
                count += 1
            if count == 0:
                raise ValueError("train_data yielded no batch")
            if sched is not None:
                sched.step()
            record = {"epoch": epoch + 1, "loss": total / count}
            model.eval()
            if val_data is not None:
                value = float(metric(model, val_data))
                record["metric"] = value
                if result.best_metric is None or value > result.best_metric:
                    result.best_metric, result.best_epoch = value, epoch + 1
                    if restore_best:
                        best_state = copy.deepcopy(model.state_dict())
            result.history.append(record)
            result.epochs = epoch + 1
            bar.set_postfix({k: round(v, 4) for k, v in record.items() if k != "epoch"})
            if after_epoch is not None:
                after_epoch(epoch + 1)
            if (
                patience is not None
                and result.best_epoch is not None
                and epoch + 1 - result.best_epoch >= patience
            ):
                result.stopped_early = epoch + 1 < epochs
                break
        bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    result.seconds = time.perf_counter() - started
    return result


def _optimizer(
    name: str, params: list[nn.Parameter], lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    raise ValueError(f"unknown optimizer {name!r}; use 'adam' or 'sgd'")
