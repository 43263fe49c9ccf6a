"""Every verb needs an eager ``torch.nn.Module``: anything else gets one ``ModelError`` saying what to do.

Users hand over what they have: a path to an ONNX or TorchScript file, a ``torch.jit`` module, a
scikit-learn estimator, a Hugging Face pipeline. A deep ``AttributeError`` from inside lowbit helps
none of them, so each public verb checks its model first.

>>> import lowbit
>>> try:
...     lowbit.quantize("model.onnx", "int8-dynamic")
... except lowbit.ModelError as err:
...     print(str(err)[:76])
quantize: got the path 'model.onnx'; lowbit needs an eager torch.nn.Module (
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import ModelError

EAGER = "lowbit needs an eager torch.nn.Module (the Python model class with its weights)"


def _is_sklearn(model: Any) -> bool:
    return any(c.__module__.startswith("sklearn.") for c in type(model).__mro__)


def require_module(model: Any, verb: str) -> nn.Module:
    """Return ``model`` if it is an eager ``nn.Module``, else raise ``ModelError`` naming the fix.

    >>> require_module(torch.nn.Linear(2, 2), "quantize")
    Linear(in_features=2, out_features=2, bias=True)
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise ModelError(
            f"{verb}: got a TorchScript module ({type(model).__name__}); {EAGER}: build the model from "
            "its code and load its state_dict (TorchScript has lost the Python modules lowbit swaps)"
        )
    if isinstance(model, nn.Module):
        return model
    if isinstance(model, str | Path):
        suffix = Path(model).suffix.lower()
        state = "load it first (torch.load(path, weights_only=True) gives a state_dict for your model class)"
        hint = {
            ".onnx": "for an ONNX file, quantize the PyTorch model it was exported from",
            ".pt": state,
            ".pth": state,
        }.get(suffix, "load the model first (for a Hugging Face directory: AutoModel.from_pretrained(path))")
        raise ModelError(f"{verb}: got the path {str(model)!r}; {EAGER}: {hint}")
    if _is_sklearn(model):
        raise ModelError(
            f"{verb}: got a scikit-learn {type(model).__name__}; {EAGER}: convert it first with "
            "lowbit.from_sklearn(estimator)"
        )
    raise ModelError(f"{verb}: got {type(model).__name__}, not a torch.nn.Module; {EAGER}")
