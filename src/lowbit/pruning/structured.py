"""Structured channel pruning that really shrinks the model (fewer channels, smaller tensors).

For a chain of conv / linear layers (the order in which they run, found by tracing one example
batch), removing output channel ``c`` of a layer removes input channel ``c`` of the next one: for
conv -> conv the kernel's input slice, for conv -> flatten -> linear the block of ``H * W`` input
features that came from channel ``c``. BatchNorm layers in between are sliced too. Channels are
ranked by the L1 norm of their filters (Li et al., "Pruning Filters for Efficient ConvNets", 2017).
The last layer of the chain keeps all its outputs (they are the model's outputs).

>>> import torch
>>> model = torch.nn.Sequential(
...     torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 16, 4))
>>> small = prune_channels(model, 0.5, torch.zeros(1, 1, 4, 4))
>>> small[0].out_channels, small[3].in_features, small(torch.zeros(2, 1, 4, 4)).shape
(4, 64, torch.Size([2, 4]))
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lowbit.zoo.base import call_model

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)


def _trace(model: nn.Module, example: object) -> list[tuple[str, nn.Module]]:
    """Conv / linear / BatchNorm modules in the order they run on ``example``."""
    order: list[tuple[str, nn.Module]] = []
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, _LAYERS + _BN):
            handles.append(m.register_forward_hook(lambda mod, _i, _o, n=name: order.append((n, mod))))
    try:
        with torch.no_grad():
            call_model(model, example)
    finally:
        for h in handles:
            h.remove()
    return order


def _keep_index(layer: nn.Module, amount: float) -> torch.Tensor:
    w = layer.weight.detach()
    scores = w.reshape(w.shape[0], -1).abs().sum(dim=1)
    keep = max(1, round(w.shape[0] * (1.0 - amount)))
    return scores.topk(keep).indices.sort().values


def _slice_out(layer: nn.Module, idx: torch.Tensor) -> None:
    layer.weight = nn.Parameter(layer.weight.detach()[idx].clone())
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.detach()[idx].clone())
    if isinstance(layer, nn.Linear):
        layer.out_features = len(idx)
    else:
        layer.out_channels = len(idx)


def _slice_bn(bn: nn.Module, idx: torch.Tensor) -> None:
    for attr in ("weight", "bias"):
        p = getattr(bn, attr)
        if p is not None:
            setattr(bn, attr, nn.Parameter(p.detach()[idx].clone()))
    for attr in ("running_mean", "running_var"):
        b = getattr(bn, attr)
        if b is not None:
            setattr(bn, attr, b[idx].clone())
    bn.num_features = len(idx)


def _slice_in(name: str, layer: nn.Module, idx: torch.Tensor, channels: int) -> None:
    w = layer.weight.detach()
    if isinstance(layer, nn.Linear):
        if w.shape[1] % channels:
            raise ValueError(
                f"layer {name}: {w.shape[1]} input features do not split into {channels} channels; "
                "structured pruning follows plain conv/linear chains only (exclude this layer)"
            )
        per = w.shape[1] // channels  # flatten of [C, H, W] is channel-major: C blocks of H*W features
        cols = (idx[:, None] * per + torch.arange(per, device=idx.device)[None, :]).flatten()
        layer.weight = nn.Parameter(w[:, cols].clone())
        layer.in_features = len(cols)
    else:
        if layer.groups != 1:
            raise ValueError(f"layer {name}: grouped convolutions cannot be channel-pruned here")
        layer.weight = nn.Parameter(w[:, idx].clone())
        layer.in_channels = len(idx)


def prune_channels(
    model: nn.Module,
    amount: float,
    example_inputs: object,
    exclude: tuple[str, ...] = (),
    inplace: bool = False,
) -> nn.Module:
    """Remove the ``amount`` fraction of output channels (lowest L1 filter norm) of every conv /
    linear layer in the traced chain except the last, and the matching inputs of the next layer.

    ``example_inputs`` is one batch (as the model is called with it); layers named in ``exclude``
    keep all their outputs. The result is checked with the same batch: a shape mismatch means the
    model is not a plain chain and raises a ``ValueError`` naming the layer.
    """
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"channel pruning amount must be in [0, 1), got {amount}")
    if not inplace:
        model = copy.deepcopy(model)
    order = _trace(model, example_inputs)
    layers = [(n, m) for n, m in order if isinstance(m, _LAYERS)]
    if len(layers) < 2:
        raise ValueError("structured pruning needs at least two conv / linear layers in a chain")
    if len({id(m) for _, m in layers}) != len(layers):
        raise ValueError("a layer runs twice in one forward pass; structured pruning needs a plain chain")
    for (name, layer), (next_name, nxt) in zip(layers, layers[1:], strict=False):
        if name in exclude:
            continue
        if isinstance(layer, nn.Conv1d | nn.Conv2d) and layer.groups != 1:
            continue
        channels = layer.weight.shape[0]
        idx = _keep_index(layer, amount)
        _slice_out(layer, idx)
        start = [n for n, _ in order].index(name)
        stop = [n for n, _ in order].index(next_name)
        for _bn_name, bn in order[start + 1 : stop]:
            if isinstance(bn, _BN) and bn.num_features == channels:
                _slice_bn(bn, idx)
        _slice_in(next_name, nxt, idx, channels)
    try:
        with torch.no_grad():
            call_model(model, example_inputs)
    except RuntimeError as err:
        raise ValueError(
            f"the channel-pruned model no longer runs ({err}); it is not a plain conv/linear chain: "
            "exclude the layers whose outputs branch or are reshaped"
        ) from None
    return model
