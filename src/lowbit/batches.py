"""How a batch becomes a model call: one convention for every verb (calibrate, evaluate, export ...).

- a mapping (``dict``, transformers' ``BatchEncoding``): keyword arguments, ``model(**batch)``;
- a ``tuple``: positional arguments, ``model(*batch)``;
- a ``list``: positional arguments too (a ``DataLoader`` collates ``(x, y)`` pairs into lists),
  except when the model's ``forward`` takes a list as its first argument (detectors:
  ``forward(images: list[Tensor])``): then the list is that one argument. For a model without
  such an annotation, wrap the list in a tuple: ``[(images,)]``;
- anything else (a tensor): the one argument.

>>> import torch
>>> from torch import nn
>>> class Detector(nn.Module):
...     def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
...         return torch.stack([im.mean() for im in images])
>>> call_model(Detector(), [torch.ones(3, 4, 4), torch.zeros(3, 8, 6)])
tensor([1., 0.])
>>> call_args(nn.Bilinear(2, 2, 1), [torch.ones(1, 2), torch.ones(1, 2)])[0][0].shape
torch.Size([1, 2])
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

_LIST_TYPES = ("list", "List", "Sequence", "Iterable")


def takes_a_list(model: nn.Module) -> bool:
    """Whether ``model.forward``'s first parameter is annotated as a list / sequence."""
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values() if p.name != "self"]
    except (TypeError, ValueError):
        return False
    if not params or params[0].kind in (params[0].VAR_POSITIONAL, params[0].VAR_KEYWORD):
        return False
    annotation = params[0].annotation
    try:
        annotation = typing.get_type_hints(model.forward).get(params[0].name, annotation)
    except Exception:  # unresolvable string annotations: read the text below
        pass
    origin = typing.get_origin(annotation)
    if origin is not None:
        return getattr(origin, "__name__", "") in ("list", "Sequence", "Iterable")
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    return text.split("[")[0].split(".")[-1] in _LIST_TYPES


def call_args(model: nn.Module, batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` for calling ``model`` on ``batch`` (see the module docstring)."""
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, tuple):
        return tuple(batch), {}
    if isinstance(batch, list):
        return ((batch,), {}) if takes_a_list(model) else (tuple(batch), {})
    return (batch,), {}


def call_model(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on one batch by the convention above (gradients are not disabled here)."""
    args, kwargs = call_args(model, batch)
    return model(*args, **kwargs)


def run_with_pre_hooks(
    model: nn.Module, batches: Iterable[Any], hooks: dict[nn.Module, Callable[..., Any]]
) -> None:
    """Run ``model`` on every batch without gradients, with each ``hooks[module]`` as a forward
    pre-hook of its module; the hooks are removed afterwards, also when a batch fails.

    >>> import torch
    >>> seen = []
    >>> lin = torch.nn.Linear(2, 2)
    >>> run_with_pre_hooks(lin, [torch.ones(1, 2)], {lin: lambda m, args: seen.append(args[0].shape)})
    >>> seen
    [torch.Size([1, 2])]
    """
    handles = [module.register_forward_pre_hook(hook) for module, hook in hooks.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                call_model(model, batch)
    finally:
        for handle in handles:
            handle.remove()
