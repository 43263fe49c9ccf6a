"""Fold BatchNorm into the conv (or linear layer) that feeds it, found from the model's structure
(never from names). The one folder: ``lowbit.quantize`` (static recipes) and ``lowbit.qat.prepare``
both use it, and ``lowbit.load`` repeats what the artifact records.

A BatchNorm in eval mode is a per-channel affine map, so ``conv -> bn`` is one conv with scaled
weights and a new bias. Static int8 recipes fold before quantizing (the folded weights are what
gets quantized), because an unfolded BatchNorm between a quantized conv and the next one costs a
float pass per layer in PyTorch and, in ONNX, stops ONNX Runtime from fusing the Q/DQ pairs
around the conv into ``QLinearConv`` (so the model runs float convs).

The structure comes from a ``torch.fx`` trace: a Conv1d / Conv2d / Linear whose only user is a
BatchNorm of the same width. Models that do not trace are followed with forward hooks on an
example input instead (the BatchNorm's input must be the very tensor the conv returned). Either
way the folded model is run on the example and compared with the original; when they differ
(e.g. a conv output also used elsewhere, which hooks cannot see) nothing is folded.

>>> import torch
>>> from torch import nn
>>> class Block(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.conv, self.norm = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
...         self.skip = nn.Conv2d(4, 4, 1)
...     def forward(self, x):
...         return torch.relu(self.norm(self.conv(x))) + self.skip(x)
>>> m = Block().eval()
>>> folded, pairs = fold_batchnorm(m, torch.randn(1, 4, 8, 8))
>>> pairs, type(folded.norm).__name__
({'norm': 'conv'}, 'Identity')
>>> x = torch.randn(2, 4, 8, 8); torch.allclose(folded(x), m(x), atol=1e-5)
True
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

# A Linear feeding a BatchNorm1d folds the same way (per output feature), as QAT models often have.
_CONV = (nn.Conv1d, nn.Conv2d, nn.Linear)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def fold_into(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Absorb ``bn`` (its eval-mode statistics) into ``layer``'s weight and bias, in place:
    ``w' = w * gamma / sqrt(var + eps)`` per output channel, ``b' = (b - mean) * gamma / sqrt(var + eps)
    + beta``.

    >>> conv, bn = nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2).eval()
    >>> with torch.no_grad(): _ = bn.running_var.fill_(4.0)
    >>> fold_into(conv, bn); conv.bias is not None
    True
    """
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


def _width(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        isinstance(conv, _CONV)
        and isinstance(bn, _BN)
        and bn.num_features == _width(conv)
        and bn.running_mean is not None
        and bn.running_var is not None
    )


def _fx_pairs(model: nn.Module) -> dict[str, str] | None:
    """BatchNorm name -> conv name from a ``torch.fx`` trace (``None``: the model does not trace)."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # any Python the tracer cannot follow: fall back to hooks
        return None
    modules = dict(model.named_modules())
    pairs: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _CONV):
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module":
            continue  # the conv output feeds something besides the BatchNorm: folding would change it
        bn_name = users[0].target
        if _foldable(modules[node.target], modules.get(bn_name)) and bn_name not in pairs:
            pairs[bn_name] = node.target
    return pairs


def _hook_pairs(model: nn.Module, example: Any) -> dict[str, str]:
    """BatchNorm name -> conv name, from which tensor each one saw in a forward pass."""
    from lowbit.zoo.base import call_model

    produced: dict[int, str] = {}
    pairs: dict[str, str] = {}
    uses: dict[str, int] = {}
    handles = []
    keep: list[torch.Tensor] = []  # outputs stay alive, so their ids are not reused mid-pass

    def on_conv(name: str):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                produced[id(out)] = name
                keep.append(out)

        return hook

    def on_bn(name: str):
        def hook(module: nn.Module, args: Any) -> None:
            uses[name] = uses.get(name, 0) + 1
            if args and isinstance(args[0], torch.Tensor) and id(args[0]) in produced:
                pairs[name] = produced[id(args[0])]

        return hook

    for name, module in model.named_modules():
        if isinstance(module, _CONV):
            handles.append(module.register_forward_hook(on_conv(name)))
        elif isinstance(module, _BN):
            handles.append(module.register_forward_pre_hook(on_bn(name)))
    try:
        with torch.no_grad():
            call_model(model, example)
    finally:
        for handle in handles:
            handle.remove()
    modules = dict(model.named_modules())
    # A BatchNorm called twice (shared) or a conv feeding two BatchNorms cannot be folded.
    convs = list(pairs.values())
    return {
        bn: conv
        for bn, conv in pairs.items()
        if uses.get(bn) == 1 and convs.count(conv) == 1 and _foldable(modules[conv], modules[bn])
    }


def find_conv_batchnorm(model: nn.Module, example: Any = None) -> dict[str, str]:
    """Every BatchNorm that can be folded into the conv feeding it: ``{bn name: conv name}``.

    From a ``torch.fx`` trace, else (the model does not trace) from forward hooks on ``example``
    (no example: nothing found)."""
    pairs = _fx_pairs(model)
    if pairs is None:
        pairs = {} if example is None else _hook_pairs(model, example)
    return pairs


def _outputs(model: nn.Module, example: Any) -> list[torch.Tensor]:
    from lowbit.zoo.base import call_model

    with torch.no_grad():
        out = call_model(model, example)
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict) or hasattr(out, "values"):
        out = list(out.values())
    return [t for t in (out if isinstance(out, (list, tuple)) else []) if isinstance(t, torch.Tensor)]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        x, y = x.float(), y.float()
        if x.shape != y.shape or float((x - y).norm()) > 1e-4 * float(y.norm()) + 1e-6:
            return False
    return True


def fold_batchnorm(
    model: nn.Module, example: Any = None, inplace: bool = False
) -> tuple[nn.Module, dict[str, str]]:
    """Fold every BatchNorm that directly follows a conv into it (see the module docstring).

    Returns the model (a copy unless ``inplace``, or ``model`` itself when nothing folds) with
    each folded BatchNorm replaced by ``nn.Identity``, and ``{bn name: conv name}`` of what was
    folded. With ``example`` (an input batch as the model takes it) the result is checked against
    the original; a mismatch folds nothing and warns.
    """
    from lowbit.ptq.convert import set_submodule

    was_training = model.training
    model.eval()  # folding uses the running statistics: the eval-mode function
    try:
        pairs = find_conv_batchnorm(model, example)
        before = _outputs(model, example) if example is not None and pairs else None
    finally:
        model.train(was_training)
    if not pairs:
        return model, {}
    folded = copy.deepcopy(model).eval()
    for bn_name, conv_name in pairs.items():
        fold_into(folded.get_submodule(conv_name), folded.get_submodule(bn_name))
        set_submodule(folded, bn_name, nn.Identity())
    if before is not None and not _same(_outputs(folded, example), before):
        warnings.warn(
            "lowbit: folding BatchNorm into the convs before it changed the model's output; "
            "left unfolded (a conv output is probably also used elsewhere)",
            stacklevel=2,
        )
        return model, {}
    if inplace:
        for bn_name, conv_name in pairs.items():
            set_submodule(model, conv_name, folded.get_submodule(conv_name))
            set_submodule(model, bn_name, nn.Identity())
        return model.eval(), pairs
    return folded, pairs
