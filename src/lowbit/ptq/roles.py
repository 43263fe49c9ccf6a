"""Layer roles found from structure, not names: which linear layers are MLP output projections.

An MLP block's output projection (BERT's ``output.dense``, GPT-2's ``mlp.c_proj``, ViT's
``output.dense``) reads the output of the block's activation function: wide, non-negative-skewed
GELU / ReLU outputs whose range differs from every other linear input in the model, which is why
recipes treat them apart (per-token activations, no smoothing). It is found from one forward pass:
a linear layer (``nn.Linear`` or Hugging Face ``Conv1D``) whose input tensor *is* the output of an
activation module (``torch.nn``'s or transformers' activation classes), passing through ``Dropout``
/ ``Identity`` unchanged. Gated MLPs (SwiGLU: ``act(gate(x)) * up(x)``) multiply first, so their
down projection is not found this way.

>>> import torch
>>> from torch import nn
>>> block = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 8))
>>> mlp_output_projections(block.eval(), torch.randn(2, 8))
['3']
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowbit.batches import call_model
from lowbit.nn.layers import is_hf_conv1d

_ACTIVATION_MODULES = ("torch.nn.modules.activation", "transformers.activations")
_PASS_THROUGH = (nn.Dropout, nn.Identity)


def is_activation(module: nn.Module) -> bool:
    """A parameter-free activation function module (``nn.GELU``, transformers' ``GELUActivation`` ...)."""
    own_params = next(module.parameters(recurse=False), None) is not None
    return not own_params and type(module).__module__.startswith(_ACTIVATION_MODULES)


def mlp_output_projections(model: nn.Module, batch: Any) -> list[str]:
    """Names of the linear layers that read an activation module's output (one pass on ``batch``)."""
    # The activation outputs themselves are kept (not just their ids): alive for the whole pass,
    # their ids cannot be reused by the allocator for an unrelated tensor.
    produced: dict[int, torch.Tensor] = {}
    found: list[str] = []

    def fed(args: tuple[Any, ...]) -> bool:
        return bool(args) and isinstance(args[0], torch.Tensor) and id(args[0]) in produced

    def after_activation(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if isinstance(out, torch.Tensor):
            produced[id(out)] = out

    def pass_through(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if fed(args) and isinstance(out, torch.Tensor):
            produced[id(out)] = out

    def reads(name: str) -> Any:
        def check(module: nn.Module, args: tuple[Any, ...]) -> None:
            if fed(args) and name not in found:
                found.append(name)

        return check

    handles = []
    try:
        for name, module in model.named_modules():
            if is_activation(module):
                handles.append(module.register_forward_hook(after_activation))
            elif isinstance(module, _PASS_THROUGH):
                handles.append(module.register_forward_hook(pass_through))
            elif isinstance(module, nn.Linear) or is_hf_conv1d(module):
                handles.append(module.register_forward_pre_hook(reads(name)))
        with torch.no_grad():
            call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    return found
