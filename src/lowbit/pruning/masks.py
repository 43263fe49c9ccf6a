"""Weight masks: unstructured magnitude pruning (per layer or global) and N:M semi-structured (2:4).

A ``Masks`` object maps parameter names to boolean keep-masks. ``apply(model)`` zeroes the pruned
weights in place; call it after every optimizer step while fine-tuning (``lowbit.train.fit``'s
``after_step``), so the pruned weights stay exactly zero. The model keeps its ordinary parameters:
no re-parametrisation, so quantization and export see plain ``weight`` tensors.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
>>> masks = magnitude_masks(model, 0.5)
>>> masks.apply(model)
>>> round(masks.sparsity(), 2), round(sparsity(model), 2)
(0.5, 0.5)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.ptq.plan import module_kind

DEFAULT_KINDS = ("linear", "conv", "rnn")


def prunable_weights(
    model: nn.Module, kinds: tuple[str, ...] = DEFAULT_KINDS, exclude: tuple[str, ...] = ()
) -> dict[str, nn.Parameter]:
    """Weight matrices of linear / conv / LSTM layers by qualified parameter name (biases excluded).

    >>> list(prunable_weights(torch.nn.Sequential(torch.nn.Linear(2, 2))))
    ['0.weight']
    """
    out: dict[str, nn.Parameter] = {}
    for name, module in model.named_modules():
        if module_kind(module) not in kinds or name in exclude:
            continue
        for pname, p in module.named_parameters(recurse=False):
            if pname.startswith("weight") and p.dim() >= 2:
                out[f"{name}.{pname}" if name else pname] = p
    return out


@dataclass
class Masks:
    """Keep-masks (``True`` = kept) by qualified parameter name."""

    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero every pruned weight of ``model`` in place."""
        params = dict(model.named_parameters())
        for name, mask in self.masks.items():
            if name not in params:
                raise ValueError(
                    f"mask for {name!r} has no parameter in this model; masks are tied to the "
                    "architecture they were computed on (recompute them after structural changes)"
                )
            params[name].mul_(mask.to(params[name].device, params[name].dtype))

    def sparsity(self) -> float:
        """Fraction of masked-out weights over all masked tensors."""
        total = sum(m.numel() for m in self.masks.values())
        return sum(int((~m).sum()) for m in self.masks.values()) / max(total, 1)

    def __len__(self) -> int:
        return len(self.masks)


def sparsity(model: nn.Module, kinds: tuple[str, ...] = DEFAULT_KINDS) -> float:
    """Fraction of exactly-zero values among the prunable weights of ``model``."""
    weights = list(prunable_weights(model, kinds).values())
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / max(total, 1)


def _threshold_mask(w: torch.Tensor, amount: float) -> torch.Tensor:
    """Keep all but the ``amount`` fraction of smallest-magnitude values (exact count, ties by index)."""
    k = int(round(amount * w.numel()))
    mask = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
    if k > 0:
        mask[w.detach().abs().flatten().argsort(stable=True)[:k]] = False
    return mask.reshape(w.shape)


def magnitude_masks(
    model: nn.Module,
    amount: float,
    scope: str = "layer",
    kinds: tuple[str, ...] = DEFAULT_KINDS,
    exclude: tuple[str, ...] = (),
) -> Masks:
    """Masks removing the ``amount`` fraction of smallest-magnitude weights.

    ``scope="layer"``: every layer loses ``amount`` of its weights. ``scope="global"``: one threshold
    across all layers (big, redundant layers lose more; Han et al. 2015). Already-zero weights count
    as pruned, so calling it with a rising ``amount`` extends the previous masks.
    """
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"pruning amount must be in [0, 1), got {amount}")
    weights = prunable_weights(model, kinds, exclude)
    if not weights:
        raise ValueError("the model has no linear / conv / LSTM weights to prune")
    if scope == "layer":
        return Masks({n: _threshold_mask(w, amount) for n, w in weights.items()})
    if scope != "global":
        raise ValueError(f"unknown pruning scope {scope!r}; use 'layer' or 'global'")
    flat = torch.cat([w.detach().abs().flatten().cpu() for w in weights.values()])
    keep = _threshold_mask(flat, amount)
    masks, start = {}, 0
    for name, w in weights.items():
        masks[name] = keep[start : start + w.numel()].reshape(w.shape).to(w.device)
        start += w.numel()
    return Masks(masks)


def nm_mask(w: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep the ``n`` largest of every ``m`` consecutive weights along the input (last) dimension.

    >>> nm_mask(torch.tensor([[0.1, -3.0, 2.0, 0.5]])).tolist()
    [[False, True, True, False]]
    """
    matrix = w.detach().reshape(w.shape[0], -1)
    if matrix.shape[1] % m:
        raise ValueError(
            f"a {n}:{m} mask needs the input dimension to be a multiple of {m}, got {matrix.shape[1]}"
        )
    groups = matrix.abs().reshape(matrix.shape[0], -1, m)
    top = groups.topk(n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return mask.reshape(w.shape)


def semi_structured_masks(
    model: nn.Module,
    n: int = 2,
    m: int = 4,
    kinds: tuple[str, ...] = DEFAULT_KINDS,
    exclude: tuple[str, ...] = (),
) -> Masks:
    """N:M masks (2:4 by default: what sparse tensor cores run) for every weight whose input
    dimension is a multiple of ``m``; other layers (e.g. a 1-channel 3x3 first conv, 9 inputs)
    are left dense, as hardware would run them. Conv kernels group along ``in * kh * kw``."""
    if not 0 < n < m:
        raise ValueError(f"N:M sparsity needs 0 < n < m, got {n}:{m}")
    masks = {}
    for name, w in prunable_weights(model, kinds, exclude).items():
        if w[0].numel() % m == 0:
            masks[name] = nm_mask(w, n, m)
    if not masks:
        raise ValueError(f"no layer has an input dimension divisible by {m}; {n}:{m} sparsity cannot apply")
    return Masks(masks)


def prune(
    model: nn.Module, amount: float = 0.5, method: str = "magnitude", scope: str = "layer", **kwargs
) -> Masks:
    """Compute masks (``magnitude`` or ``2:4``) and apply them to ``model`` in place; returns the masks.

    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    >>> round(prune(model, method="2:4").sparsity(), 2)
    0.5
    """
    if method == "magnitude":
        masks = magnitude_masks(model, amount, scope, **kwargs)
    elif method in ("2:4", "semi-structured"):
        masks = semi_structured_masks(model, **kwargs)
    else:
        raise ValueError(f"unknown pruning method {method!r}; use 'magnitude' or '2:4'")
    masks.apply(model)
    return masks
