"""Rotate the inputs of a model's linear layers before quantizing (``Recipe.rotation``).

For each linear layer the recipe quantizes (``nn.Linear``, Hugging Face ``Conv1D``), a random
Hadamard rotation ``R`` of its input width is drawn (``lowbit.algorithms.rotation``), the weight
becomes ``W R`` and a forward pre-hook rotates the input, so the float model computes the same
function (up to float rounding) while its activations and weights have their outliers spread over
all channels. Everything downstream then works on the rotated layer without knowing: calibration
statistics and GPTQ's Hessian see the rotated inputs, and ``prepare`` gives the quantized layer
the same rotation (``QuantizedModule.set_input_rotation``), which the artifact stores.

The rotation runs online in every rotated layer (a fast Walsh-Hadamard transform of the input,
``n log n`` per token); fusing it into the neighbouring weights where the graph allows (the
residual stream of pre-norm transformers, as QuaRot does) would remove that cost and is not done.

>>> import torch, lowbit
>>> torch.manual_seed(0)
<torch._C.Generator object at ...>
>>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
>>> x = torch.randn(2, 16)
>>> rotated = rotated_copy(model, ["0", "2"], seed=0)
>>> torch.allclose(model(x), rotated(x), atol=1e-5), torch.allclose(model[0].weight, rotated[0].weight)
(True, False)
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lowbit.algorithms.rotation import HadamardRotation
from lowbit.nn.layers import is_hf_conv1d

ATTRIBUTE = "lowbit_rotation"  # the float layer's rotation (a child module), read by ``prepare``


def _rotate_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (getattr(module, ATTRIBUTE)(args[0]), *args[1:])


def rotatable(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer whose input can be rotated (and is not yet)."""
    linear = isinstance(module, nn.Linear) or is_hf_conv1d(module)
    return linear and getattr(module, ATTRIBUTE, None) is None


def rotate_inputs(model: nn.Module, names: Iterable[str], seed: int = 0) -> dict[str, int]:
    """Rotate the inputs of the layers ``names`` of ``model`` in place; returns ``{name: width}``.

    Layers that are not linear (or already rotated) are skipped. The ``i``-th rotated layer's
    rotation is drawn from ``seed + i``, so the result depends on the seed and the layer order only.
    """
    done: dict[str, int] = {}
    for i, name in enumerate(names):
        module = model.get_submodule(name)
        if not rotatable(module):
            continue
        hf = is_hf_conv1d(module)
        weight = module.weight
        width = weight.shape[0] if hf else weight.shape[1]
        rotation = HadamardRotation.random(width, seed + i).to(weight.device)
        with torch.no_grad():
            w = weight.detach().float()
            # nn.Linear: x W^T -> (x R)(W R)^T; Conv1D (weight [in, out]): x W -> (x R)(R^T W).
            rotated = rotation(w.T).T if hf else rotation(w)
            weight.copy_(rotated.to(weight.dtype))
        setattr(module, ATTRIBUTE, rotation)
        module.register_forward_pre_hook(_rotate_input)
        done[name] = width
    return done


def rotate_planned(model: nn.Module, layers: Iterable[Any], seed: int = 0) -> list[str]:
    """Rotate the inputs of the planned linear ``layers`` (``LayerPlan``s, in plan order: the
    seeds follow it) of ``model``; returns the names of the planned layers of other kinds, which
    keep their inputs. Layers rotated already are skipped, so callers can rotate early."""
    layers = list(layers)
    rotate_inputs(model, [layer.name for layer in layers if layer.kind == "linear"], seed)
    return [layer.name for layer in layers if layer.kind != "linear"]


def rotated_copy(model: nn.Module, names: Iterable[str], seed: int = 0) -> nn.Module:
    """A copy of ``model`` with the inputs of ``names`` rotated (``model`` itself untouched)."""
    copied = copy.deepcopy(model)
    rotate_inputs(copied, names, seed)
    return copied
