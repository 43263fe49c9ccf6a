"""The front door: ``quantize``, ``save``, ``load``, ``size_report``.

>>> import torch, lowbit
>>> model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
>>> q = lowbit.quantize(model, "int8-static", calibration=[torch.randn(8, 32)], progress=False)
>>> round(lowbit.size_report(q).bits_per_param, 1)
9.8
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from lowbit.errors import DataError, RecipeError
from lowbit.export.artifact import load, save
from lowbit.ptq.checks import check_calibration, check_model
from lowbit.ptq.convert import calibrate, convert, prepare
from lowbit.ptq.data_aware import awq_weights, correct_biases, gptq_weights, smoothquant_weights
from lowbit.ptq.plan import plan_model
from lowbit.recipes import resolve
from lowbit.recipes.spec import Recipe
from lowbit.size import size_report

# Weight algorithms that need calibration data before the weights can be chosen (GPTQ, AWQ, ...).
# Each takes (float model, recipe, calibration batches, progress) and returns the keyword arguments
# for ``prepare`` (``weights=`` packed weights by layer, ``input_smooth=`` divisors by layer).
DATA_AWARE_ALGORITHMS: dict[str, Callable[..., dict[str, Any]]] = {"gptq": gptq_weights, "awq": awq_weights}


def quantize(
    model: nn.Module,
    recipe: str | Recipe | dict[str, Any],
    calibration: Iterable[Any] | None = None,
    *,
    inplace: bool = False,
    progress: bool = True,
) -> nn.Module:
    """Quantize ``model`` as ``recipe`` (a preset name, a YAML path, a dict or a ``Recipe``) says.

    ``calibration`` is any iterable of input batches (tensors, tuples, or dicts of tensors, as a
    DataLoader yields them); recipes with static activations or data-aware weight algorithms need
    it. The float model is left untouched unless ``inplace=True``. Returns the quantized model.

    Bad input is refused before any work, each with one error type naming what is wrong
    (``lowbit.errors``): ``RecipeError`` (the recipe), ``DataError`` (calibration data missing, or
    constant: no input varies), ``ModelError`` (meta-device parameters, NaN / Inf in a weight or
    bias, ``fp16`` / ``bf16`` overflow unless the recipe sets ``allow_saturation``).
    """
    recipe = resolve(recipe)
    if calibration is not None and not isinstance(calibration, (list, tuple)):
        calibration = list(calibration)  # it may be read twice (weight algorithm, then activations)
    steps = _data_aware(recipe) + (["smoothquant"] if recipe.smoothquant_alpha is not None else [])
    steps += ["bias_correction"] if recipe.bias_correction else []
    if steps and not calibration:
        raise DataError(f"{', '.join(steps)} needs calibration data: pass calibration=[batch, ...]")
    if len(steps) - recipe.bias_correction > 1:
        raise RecipeError(f"choose one of {', '.join(steps)}: they cannot be combined in one recipe yet")
    uses_data = bool(steps) or recipe.needs_calibration
    # Calibration runs the whole forward pass, so then every parameter must be finite; prepare()
    # repeats the per-layer checks and gives the saturation warnings.
    check_model(model, plan_model(model, recipe), recipe.allow_saturation, whole_model=uses_data)
    if uses_data and calibration:
        check_calibration(calibration)
    extra: dict[str, Any] = {}
    for algorithm in _data_aware(recipe):
        extra = DATA_AWARE_ALGORITHMS[algorithm](model, recipe, calibration, progress)
    if recipe.smoothquant_alpha is not None:
        extra = smoothquant_weights(model, recipe, calibration, progress)  # type: ignore[arg-type]
    qmodel = prepare(model, recipe, inplace=inplace and not recipe.bias_correction, **extra)
    calibrate(qmodel, calibration, progress=progress)
    convert(qmodel)
    if recipe.bias_correction:
        correct_biases(model, qmodel, calibration, progress)  # type: ignore[arg-type]
    return qmodel


def _data_aware(recipe: Recipe) -> list[str]:
    specs = [recipe.weight] + [rule.weight for rule in recipe.overrides]
    used = {s.algorithm for s in specs if s is not None}
    return sorted(used & set(DATA_AWARE_ALGORITHMS))


__all__ = [
    "DATA_AWARE_ALGORITHMS",
    "calibrate",
    "convert",
    "load",
    "prepare",
    "quantize",
    "save",
    "size_report",
]
