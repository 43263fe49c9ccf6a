"""Post-training quantization in three explicit steps: prepare -> calibrate -> convert.

- ``prepare(model, recipe)``: swap every planned layer for its quantized counterpart (weights are
  quantized and packed now); static activation quantizers start in the ``observing`` state.
- ``calibrate(model, batches)``: run representative batches through the model (progress bar);
  observers record activation ranges while the activations pass through unchanged.
- ``convert(model)``: freeze every observer into a fixed scale / zero point.

``lowbit.quantize`` runs all three. Weight-only and dynamic recipes need no calibration data.

>>> import torch
>>> from lowbit.recipes import get
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> q = prepare(model, get("int8-static"))
>>> calibrate(q, [torch.randn(4, 8) for _ in range(3)], progress=False)
>>> convert(q)[0].input_quant.state
'frozen'
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import DataError
from lowbit.modelcheck import require_module
from lowbit.nn.activation import ActivationQuantizer
from lowbit.nn.base import QuantizedModule
from lowbit.nn.layers import QUANTIZED_CLASSES
from lowbit.nn.qweight import QuantizedWeight
from lowbit.ptq.checks import check_calibration, check_model
from lowbit.ptq.distributed import reduce_ranges
from lowbit.ptq.plan import plan_model
from lowbit.ptq.rotate import ATTRIBUTE as ROTATION_ATTRIBUTE
from lowbit.ptq.rotate import rotate_planned
from lowbit.recipes import resolve
from lowbit.recipes.spec import Recipe
from lowbit.zoo.base import call_model


def _run_submodules(_module: nn.Module, _args: Any) -> None:
    """A forward pre-hook that changes nothing (see ``set_submodule``)."""
    return None


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``new``.

    >>> layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    >>> set_submodule(layer, "linear1", nn.Sequential(nn.Linear(8, 16)))
    >>> len(layer._forward_pre_hooks)  # its fused eval path is off: linear1's forward runs
    1
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    if isinstance(parent, nn.TransformerEncoderLayer) and type(new) is not nn.Linear:
        # In eval mode without gradients TransformerEncoderLayer runs one fused kernel that reads
        # linear1.weight / linear2.weight directly, skipping a quantized (or QAT) layer's forward
        # and its input quantizer. PyTorch takes the module-by-module path whenever a hook is
        # attached, so a no-op one keeps the swapped layers in charge (the hook survives deepcopy).
        if _run_submodules not in parent._forward_pre_hooks.values():
            parent.register_forward_pre_hook(_run_submodules)
        # A TransformerEncoder above it would pack padded batches into nested tensors for that
        # fused path, which the swapped layers cannot take: keep them padded.
        parts = name.split(".")
        for depth in range(len(parts) - 1):
            ancestor = model.get_submodule(".".join(parts[:depth])) if depth else model
            if isinstance(ancestor, nn.TransformerEncoder):
                ancestor.use_nested_tensor = False


def prepare(
    model: nn.Module,
    recipe: str | Recipe | dict[str, Any],
    inplace: bool = False,
    weights: dict[str, QuantizedWeight] | None = None,
    input_smooth: dict[str, torch.Tensor] | None = None,
    warn: bool = True,
) -> nn.Module:
    """Swap planned layers for quantized ones (see the module docstring).

    ``weights`` supplies packed weights chosen elsewhere (GPTQ, QAT) by layer name; ``input_smooth``
    per-input-channel divisors (SmoothQuant, AWQ) whose inverse the caller already folded into the
    float weights. Warnings list layers kept float, patterns that matched nothing and weights that
    saturate their float format (when the recipe allows it). A model on the meta device, NaN / Inf
    in a planned layer, or saturation the recipe does not allow raise ``ModelError`` (see
    ``lowbit.ptq.checks``).
    """
    require_module(model, "prepare")
    recipe = resolve(recipe)
    if not inplace:
        model = copy.deepcopy(model)
    plan = plan_model(model, recipe)
    saturated = check_model(model, plan, recipe.allow_saturation)
    if warn:
        for message in plan.warnings() + saturated:
            warnings.warn(f"lowbit: {message}", stacklevel=2)
    if not plan.layers:
        warnings.warn(
            f"lowbit: recipe {recipe.name!r} selected no layer; the model is unchanged", stacklevel=2
        )
    weights = weights or {}
    input_smooth = input_smooth or {}
    if recipe.rotation != "none":  # data-aware callers rotated the layers already: skipped then
        others = rotate_planned(model, plan.layers, recipe.rotation_seed)
        if others and warn:
            warnings.warn(
                f"lowbit: rotation: hadamard rotates linear layers' inputs only; {len(others)} other "
                f"layer(s) keep theirs ({', '.join(others[:4])}{' ...' if len(others) > 4 else ''})",
                stacklevel=2,
            )
    for layer in plan.layers:
        assert layer.weight is not None
        cls = QUANTIZED_CLASSES[layer.kind]
        qmodule = cls.from_float(layer.module, layer.weight, name=layer.name, qweight=weights.get(layer.name))
        qmodule.set_activation(layer.activation, layer.name)
        if layer.name in input_smooth:
            qmodule.set_input_smooth(input_smooth[layer.name])
        qmodule.set_input_rotation(getattr(layer.module, ROTATION_ATTRIBUTE, None))
        set_submodule(model, layer.name, qmodule)
    model.lowbit_recipe = recipe  # recorded in the artifact
    return model


def observing_quantizers(model: nn.Module) -> list[ActivationQuantizer]:
    return [m for m in model.modules() if isinstance(m, ActivationQuantizer) and m.state == "observing"]


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for an empty model)."""
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device) -> Any:
    """Move a batch (tensor, tuple / list, dict of tensors) to ``device``; other values pass through."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):  # a dict or a BatchEncoding: a plain dict either way
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def run_batches(
    model: nn.Module, batches: Iterable[Any], progress: bool = True, desc: str = "calibrating"
) -> int:
    """Call ``model`` on every batch (no gradients), with a progress bar; returns how many ran."""
    device = model_device(model)
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    count = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(
                batches, total=total, desc=desc, unit="batch", disable=not progress, leave=False
            ):
                call_model(model, to_device(batch, device))
                count += 1
    finally:
        model.train(was_training)
    return count


def calibrate(
    model: nn.Module, batches: Iterable[Any] | None, progress: bool = True, diagnose: bool = True
) -> None:
    """Feed calibration batches to every observing activation quantizer of a prepared model.

    Batches may be tensors, tuples (positional arguments) or dicts (keyword arguments), as a
    ``DataLoader`` yields them; they are moved to the model's device. With ``diagnose`` (default)
    a warning says when the data looks too small or unrepresentative: too few samples, or ranges
    still moving between the first half of the batches and all of them (see
    ``lowbit.analysis.diagnostics``), with a suggested sample count. Missing, empty or constant
    data (no input varies: all-zero, one repeated token) raises ``DataError``.
    """
    if not observing_quantizers(model):
        return
    if batches is None:
        raise DataError(
            "this recipe calibrates activations (static mode) and needs calibration data: pass "
            "calibration=[batch, ...] with a few representative input batches"
        )
    batches = list(batches)
    if not batches:
        raise DataError(
            "the calibration data is empty: pass at least one input batch (a few dozen samples is typical)"
        )
    check_calibration(batches)
    from lowbit.analysis.diagnostics import count_samples, snapshot_ranges
    from lowbit.analysis.diagnostics import diagnose as diagnose_ranges

    half = len(batches) // 2
    run_batches(model, batches[:half], progress)
    first_half = snapshot_ranges(model) if half else {}
    run_batches(model, batches[half:], progress)
    reduce_ranges(observing_quantizers(model))  # data-parallel: every rank's ranges combined
    if diagnose:
        samples = sum(count_samples(b) for b in batches)
        for finding in diagnose_ranges(model, first_half, samples):
            warnings.warn(f"lowbit: {finding}", stacklevel=2)


def convert(model: nn.Module) -> nn.Module:
    """Freeze every observing activation quantizer (ranges become fixed buffers); returns ``model``."""
    for quantizer in observing_quantizers(model):
        quantizer.freeze()
    return model


def quantized_layers(model: nn.Module) -> dict[str, QuantizedModule]:
    """Every quantized layer of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedModule)}
