"""Fold batch norm into the preceding convolution (or linear layer) before QAT.

At inference a BatchNorm after a conv is an affine map per output channel, so it can be absorbed:
``w' = w * gamma / sqrt(var + eps)`` per output channel and ``b' = (b - mean) * gamma / sqrt(var + eps)
+ beta``. Folding first means QAT trains (and quantizes) the weights the deployed model really
uses, instead of quantizing ``w`` and then rescaling it by a float BatchNorm.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
>>> _ = model.train()(torch.randn(8, 1, 6, 6))  # give the BatchNorm non-trivial statistics
>>> x = torch.randn(2, 1, 6, 6)
>>> reference = model.eval()(x)
>>> folded = fold_batchnorm(model)
>>> type(folded[1]).__name__, torch.allclose(folded(x), reference, atol=1e-5)
('Identity', True)
"""

from __future__ import annotations

import copy

import torch
from torch import nn

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def fold_into(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Absorb ``bn`` (eval-mode statistics) into ``layer``'s weight and bias, in place."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"cannot fold {type(bn).__name__} without running statistics (track_running_stats=False)"
        )
    out = layer.weight.shape[0]
    if bn.num_features != out:
        raise ValueError(
            f"cannot fold {type(bn).__name__}({bn.num_features}) into a layer with {out} output channels"
        )
    with torch.no_grad():
        inv_std = torch.rsqrt(bn.running_var.float() + bn.eps)
        gamma = bn.weight.float() if bn.weight is not None else torch.ones_like(inv_std)
        beta = bn.bias.float() if bn.bias is not None else torch.zeros_like(inv_std)
        factor = gamma * inv_std
        w = layer.weight
        w.mul_(factor.to(w.dtype).reshape(-1, *([1] * (w.dim() - 1))))
        bias = layer.bias.float() if layer.bias is not None else torch.zeros_like(factor)
        new_bias = (bias - bn.running_mean.float()) * factor + beta
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias.to(w.dtype))
        else:
            layer.bias.copy_(new_bias)


def fold_batchnorm(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every BatchNorm that directly follows a conv / linear layer inside an ``nn.Sequential``.

    Each folded BatchNorm is replaced by ``nn.Identity`` so indices (and names) stay the same.
    BatchNorms elsewhere are left alone. Grouped / transposed convolutions are not folded.
    Returns the folded model (a copy unless ``inplace``), in eval mode.
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()  # folding uses the running statistics, i.e. the eval-mode function
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for prev_name, name in zip(names, names[1:], strict=False):
            prev, bn = seq._modules[prev_name], seq._modules[name]
            if isinstance(bn, _BN) and isinstance(prev, _FOLDABLE) and getattr(prev, "groups", 1) == 1:
                fold_into(prev, bn)
                seq._modules[name] = nn.Identity()
    return model
