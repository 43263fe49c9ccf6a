"""Iterative prune-and-fine-tune: raise sparsity in steps, training in between so the network adapts.

The sparsity after step ``k`` of ``n`` follows the cubic schedule of Zhu & Gupta ("To prune, or not to
prune", 2017): ``s_k = s * (1 - (1 - k / n) ** 3)``, pruning fast while many weights are redundant
and slowly near the target. Between steps the model is fine-tuned with ``lowbit.train.fit``; masks are
re-applied after every optimizer step so pruned weights stay zero.

>>> import torch
>>> from lowbit.train import batches
>>> x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
>>> result = iterative_prune(model, 0.75, batches(x, y, 16), steps=2, epochs_per_step=1, progress=False)
>>> round(result.masks.sparsity(), 2), [round(s, 3) for s in result.schedule]
(0.75, [0.656, 0.75])
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lowbit.pruning.masks import Masks, magnitude_masks, semi_structured_masks
from lowbit.train import FitResult, LossFn, fit


def cubic_schedule(target: float, steps: int) -> list[float]:
    """Sparsity after each of ``steps`` pruning steps, ending exactly at ``target``.

    >>> [round(s, 3) for s in cubic_schedule(0.8, 4)]
    [0.463, 0.7, 0.788, 0.8]
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return [target * (1.0 - (1.0 - k / steps) ** 3) for k in range(1, steps + 1)]


@dataclass
class PruneResult:
    """Final masks, the sparsity reached at each step, the fine-tuning runs and their total seconds."""

    masks: Masks
    schedule: list[float]
    fits: list[FitResult] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(f.seconds for f in self.fits)


def iterative_prune(
    model: nn.Module,
    amount: float,
    train_data: Iterable[Any],
    val_data: Iterable[Any] | None = None,
    *,
    method: str = "magnitude",
    scope: str = "layer",
    steps: int = 3,
    epochs_per_step: int = 2,
    loss_fn: LossFn | None = None,
    exclude: tuple[str, ...] = (),
    **fit_options: Any,
) -> PruneResult:
    """Prune ``model`` in place to ``amount`` sparsity in ``steps`` steps, fine-tuning after each.

    ``method="2:4"`` applies the N:M mask in one step (its sparsity is fixed) and fine-tunes
    ``steps * epochs_per_step`` epochs. ``fit_options`` go to ``lowbit.train.fit`` (``lr``,
    ``progress``, ``seed`` ...); best-epoch restoring is off, since an earlier epoch is less sparse.
    """
    fit_options.setdefault("restore_best", False)
    if method in ("2:4", "semi-structured"):
        masks = semi_structured_masks(model, exclude=exclude)
        masks.apply(model)
        fits = [
            fit(model, train_data, val_data, loss_fn, epochs=steps * epochs_per_step,
                after_step=lambda: masks.apply(model), **fit_options)
        ]  # fmt: skip
        return PruneResult(masks, [masks.sparsity()], fits)
    if method != "magnitude":
        raise ValueError(f"unknown pruning method {method!r}; use 'magnitude' or '2:4'")
    result = PruneResult(Masks(), [])
    for level in cubic_schedule(amount, steps):
        masks = magnitude_masks(model, level, scope, exclude=exclude)
        masks.apply(model)
        result.masks = masks
        result.schedule.append(masks.sparsity())
        if epochs_per_step > 0:
            result.fits.append(
                fit(model, train_data, val_data, loss_fn, epochs=epochs_per_step,
                    after_step=lambda m=masks: m.apply(model), **fit_options)
            )  # fmt: skip
    return result
