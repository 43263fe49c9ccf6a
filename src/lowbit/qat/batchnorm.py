"""BatchNorm during quantization-aware training: fold it, freeze its statistics, or let it train.

A BatchNorm after a conv is, at inference, a per-channel affine map. QAT has three ways to treat it
(``lowbit.qat.prepare(..., batchnorm=...)``, the choice printed):

- ``"fold"``: absorb it into the conv / linear layer before it (``lowbit.ptq.fold``, the same folder
  ``lowbit.quantize`` uses, pairs found from the traced graph or the forward order, wherever the
  layers sit). QAT then trains and quantizes the weights the deployed model really uses, and no
  statistics can drift while training. BatchNorms that do not follow a conv are frozen instead.
  What was folded is ``model.lowbit_folded``; ``lowbit.save`` records it and ``lowbit.load`` folds
  the user's unfolded model the same way.
- ``"freeze"``: keep them, but always normalise with the running statistics (``FrozenBatchNorm``;
  its affine ``weight`` / ``bias`` still train). ``convert`` puts the plain BatchNorm back.
- ``"train"``: leave them alone: in ``model.train()`` they normalise with batch statistics and
  update their running ones, as for a model trained from scratch. Re-estimate the statistics of
  the converted model afterwards (``reestimate_batchnorm``): its activations moved.

``"auto"`` (the default) folds when the statistics were ever trained (fine-tuning a trained
model: a few small batches would otherwise overwrite them) and trains them otherwise.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
>>> _ = model.train()(torch.randn(8, 1, 6, 6))  # give the BatchNorm non-trivial statistics
>>> x = torch.randn(2, 1, 6, 6)
>>> reference = model.eval()(x)
>>> folded = fold_batchnorm(model)
>>> type(folded[1]).__name__, folded.lowbit_folded, torch.allclose(folded(x), reference, atol=1e-5)
('Identity', {'1': '0'}, True)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from lowbit.ptq.fold import fold_batchnorm as _fold

BatchNormMode = Literal["auto", "fold", "freeze", "train"]
MODES: tuple[str, ...] = ("auto", "fold", "freeze", "train")
_BatchNorm = nn.modules.batchnorm._BatchNorm


def fold_batchnorm(model: nn.Module, example: Any = None, inplace: bool = False) -> nn.Module:
    """Fold every BatchNorm that directly follows a conv / linear layer into it, wherever it sits
    (``lowbit.ptq.fold.fold_batchnorm``: a ``torch.fx`` trace, else forward hooks on ``example``).

    Each folded BatchNorm becomes ``nn.Identity`` (names stay the same) and the pairs are recorded
    in ``model.lowbit_folded`` (``{bn name: conv name}``), so an artifact made from the model loads
    into the unfolded architecture. ``lowbit.qat.prepare`` folds by itself (``batchnorm="fold"``);
    call this only to fold a model before other work. Returns a copy unless ``inplace``, in eval mode.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    >>> fold_batchnorm(m).lowbit_folded
    {'1': '0'}
    """
    folded, pairs = _fold(model, example, inplace=inplace)
    if folded is model and not inplace:  # nothing folded: still hand back a copy, as asked
        import copy

        folded = copy.deepcopy(model)
    if pairs:
        folded.lowbit_folded = {**getattr(folded, "lowbit_folded", {}), **pairs}
    return folded.eval()


class FrozenBatchNorm(nn.Module):
    """A BatchNorm that normalises with its running statistics in train mode too (they never
    change); its affine ``weight`` / ``bias`` still train. Reads of other attributes go to the
    wrapped BatchNorm (``bn``), which ``lowbit.qat.convert`` puts back in its place.

    >>> import torch
    >>> bn = torch.nn.BatchNorm1d(3)
    >>> frozen = FrozenBatchNorm(bn).train()
    >>> _ = frozen(torch.randn(8, 3) + 5)
    >>> float(frozen.running_mean.abs().max()), frozen.num_features
    (0.0, 3)
    """

    def __init__(self, bn: _BatchNorm) -> None:
        super().__init__()
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"cannot freeze {type(bn).__name__} without running statistics")
        self.bn = bn

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("bn")
            if inner is None or name.startswith("_"):
                raise
            return getattr(inner, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        bn._check_input_dim(x)
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _trained(bn: _BatchNorm) -> bool:
    count = getattr(bn, "num_batches_tracked", None)
    return count is not None and int(count) > 0


def _bn_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def prepare_batchnorm(
    model: nn.Module, mode: str, example: Any = None, low_bit: bool = False
) -> tuple[dict[str, str], str]:
    """Apply ``mode`` (see the module docstring) to ``model`` in place, before the QAT layers go in.
    ``low_bit`` (binary / ternary weights) makes ``"auto"`` train them: folded into binary /
    ternary weights the per-channel BatchNorm scale would be lost to the format's own scale.

    Returns ``{bn name: conv name}`` of what was folded and one line saying what was done (``""``
    when the model has no BatchNorm)."""
    from lowbit.ptq.convert import set_submodule

    if mode not in MODES:
        raise ValueError(f"batchnorm must be one of {', '.join(MODES)}; got {mode!r}")
    names = _bn_names(model)
    if not names:
        return {}, ""
    modules = dict(model.named_modules())
    if mode == "auto":
        trained = any(_trained(modules[n]) for n in names)
        mode = "fold" if trained and not low_bit else "train"
        why = (
            "statistics trained: fine-tuning"
            if mode == "fold"
            else "low-bit weights"
            if trained
            else "statistics never trained"
        )
    else:
        why = "asked"
    if mode == "train":
        return {}, (
            f"BatchNorm: {len(names)} left training ({why}; batch statistics in train mode); "
            "re-estimate them after training: convert(model, reestimate=batches); "
            "batchnorm='fold' or 'freeze' keeps trained statistics"
        )
    pairs: dict[str, str] = {}
    if mode == "fold":
        was_training = model.training
        _, pairs = _fold(model, example, inplace=True)
        model.train(was_training)
    frozen = 0
    for name in _bn_names(model):
        bn = model.get_submodule(name)
        if bn.running_mean is not None and bn.running_var is not None:
            set_submodule(model, name, FrozenBatchNorm(bn))
            frozen += 1
    parts = [f"{len(pairs)} folded into the layer before them"] if mode == "fold" else []
    if frozen:
        parts.append(f"{frozen} frozen (running statistics, affine part trained)")
    left = len(names) - len(pairs) - frozen
    if left:
        parts.append(f"{left} without running statistics left training")
    # Hooks need an input: without one, a model torch.fx cannot trace folds nothing.
    hint = (
        "; pass example= to find pairs by forward hooks"
        if mode == "fold" and frozen and example is None
        else ""
    )
    return pairs, f"BatchNorm: {', '.join(parts)} ({why}; batchnorm='train' lets them update{hint})"


def restore_batchnorm(model: nn.Module) -> None:
    """Put every ``FrozenBatchNorm``'s plain BatchNorm back in its place (in place)."""
    from lowbit.ptq.convert import set_submodule

    for name, m in list(model.named_modules()):
        if isinstance(m, FrozenBatchNorm):
            set_submodule(model, name, m.bn)


def reestimate_batchnorm(model: nn.Module, batches: Iterable[Any]) -> int:
    """Recompute every BatchNorm's running statistics from ``batches`` (their plain average), the
    rest of the model in eval mode: after ``convert`` of a model whose BatchNorms trained, or any
    time quantization moved the activations they normalise. Returns how many were re-estimated.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    >>> reestimate_batchnorm(m, [torch.randn(16, 3) + 2]), m.training
    (1, True)
    """
    from lowbit.ptq.convert import model_device, to_device
    from lowbit.zoo.base import call_model

    batches = list(batches)
    if not batches:  # checked first: the statistics are reset below
        raise ValueError("reestimate_batchnorm needs at least one input batch")
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    was_training = model.training
    saved = [bn.momentum for bn in norms]
    device = model_device(model)
    model.eval()
    try:
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average: every batch counts the same
            bn.train()
        with torch.no_grad():
            for batch in batches:
                call_model(model, to_device(batch, device))
    finally:
        for bn, momentum in zip(norms, saved, strict=True):
            bn.momentum = momentum
        model.train(was_training)
    return len(norms)
