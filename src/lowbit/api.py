"""The front door: ``quantize``, ``save``, ``load``, ``size_report``.

>>> import torch, lowbit
>>> model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
>>> q = lowbit.quantize(model, "int8-static", calibration=[torch.randn(8, 32)], progress=False)
>>> round(lowbit.size_report(q).bits_per_param, 1)
9.8
"""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

from lowbit.backends import use_kernels
from lowbit.errors import DataError
from lowbit.export import artifact
from lowbit.export.artifact import save
from lowbit.modelcheck import require_module
from lowbit.ptq.activation_plan import apply_activation_plan, measure_activation_plan
from lowbit.ptq.checks import check_calibration, check_model
from lowbit.ptq.convert import calibrate, convert, prepare
from lowbit.ptq.distributed import same_everywhere, shard, world
from lowbit.ptq.fidelity import CHECK_BATCHES
from lowbit.ptq.fidelity import measure as measure_fidelity
from lowbit.ptq.modifiers import DATA_AWARE, check_sequence
from lowbit.ptq.pipeline import calibrate_weights
from lowbit.ptq.plan import plan_model
from lowbit.ptq.rotate import rotate_planned
from lowbit.recipes import resolve
from lowbit.recipes.spec import Recipe
from lowbit.size import size_report


def quantize(
    model: nn.Module,
    recipe: str | Recipe | dict[str, Any],
    calibration: Iterable[Any] | None = None,
    *,
    inplace: bool = False,
    progress: bool = True,
    cache_bytes: int | None = None,
    kernels: str = "auto",
    fold_bn: bool | None = None,
) -> nn.Module:
    """Quantize ``model`` as ``recipe`` (a preset name, a YAML path, a dict or a ``Recipe``) says.

    ``calibration`` is any iterable of input batches (tensors, tuples, or dicts of tensors, as a
    DataLoader yields them); recipes with static activations or data-aware weight algorithms need
    it. Data-aware algorithms run in the sequential calibration pipeline
    (``lowbit.ptq.pipeline``; ``cache_bytes`` caps the activations it keeps in memory), whose
    per-stage report is ``result.lowbit_calibration``. The float model is left untouched unless
    ``inplace=True``; the untouched model costs a deep copy (a second float model in memory), so
    pass ``inplace=True`` when the float model is not needed afterwards (data-aware recipes then
    free each layer's float weight as soon as its stage is done, so ``model`` holds no float
    weights afterwards). Returns the quantized model.

    ``kernels`` picks what runs each quantized layer (``lowbit.backends.use_kernels``): ``"auto"``
    (the fastest registered integer kernel this machine runs accurately, measured once and cached;
    the choices are ``result.lowbit_kernels``), ``"reference"`` (dequantize + float op, the exact
    simulation) or a backend name.

    ``fold_bn`` folds every BatchNorm that directly follows a conv into it before the weights are
    quantized (``lowbit.ptq.fold``; found from the model's structure, checked on the first
    calibration batch). ``None`` (default): only for recipes with static activations, where an
    unfolded BatchNorm blocks the integer conv fusions (ONNX ``QLinearConv``). What was folded
    is ``result.lowbit_folded`` and recorded in the artifact; ``lowbit.load`` folds the same.

    With calibration data (and not ``inplace``), every quantized layer and the model's output are
    then compared with the float model on the first batches (``lowbit.ptq.fidelity``): the result
    is ``result.lowbit_fidelity``, and a warning names the layers whose own output falls below
    cosine 0.98 (and the output below 0.95) with what to try.

    Bad input is refused before any work, each with one error type naming what is wrong
    (``lowbit.errors``): ``RecipeError`` (the recipe), ``DataError`` (calibration data missing, or
    constant: no input varies), ``ModelError`` (meta-device parameters, NaN / Inf in a weight or
    bias, ``fp16`` / ``bf16`` overflow unless the recipe sets ``allow_saturation``).
    """
    require_module(model, "quantize")
    recipe = resolve(recipe)
    if calibration is not None and not isinstance(calibration, (list, tuple)):
        calibration = list(calibration)  # it may be read twice (weight algorithm, then activations)
    if calibration is not None and world()[1] > 1:
        calibration = shard(calibration)  # data-parallel: this rank's share (lowbit.ptq.distributed)
    folded: dict[str, str] = {}
    if fold_bn or (fold_bn is None and recipe.needs_calibration):
        from lowbit.ptq.fold import fold_batchnorm

        example = calibration[0] if calibration else None
        # Not inplace: ``model`` becomes a folded copy, the float reference fidelity compares with.
        model, folded = fold_batchnorm(model, example, inplace=inplace)
    plan = None
    # Rotated inputs are not measured yet: the activations stay as the recipe writes them.
    measured = recipe.activation_plan == "measured" and bool(calibration) and recipe.rotation == "none"
    if measured:  # the measurement runs the model: the same checks as calibration, done once
        check_model(model, plan_model(model, recipe), recipe.allow_saturation, whole_model=True)
        check_calibration(calibration)  # type: ignore[arg-type]
        plan = measure_activation_plan(model, recipe, calibration)
        recipe = apply_activation_plan(model, recipe, plan)
        if progress:
            print(f"lowbit: {plan.summary()}", file=sys.stderr)
    same_everywhere(recipe.to_dict(), "the recipe")  # a measured plan may differ between ranks
    steps = data_aware_steps(recipe)
    edges = recipe.embeddings_and_head != "recipe"
    if (steps or edges) and not calibration:
        needs = ", ".join(steps) if steps else f"embeddings_and_head={recipe.embeddings_and_head!r}"
        raise DataError(f"{needs} needs calibration data: pass calibration=[batch, ...]")
    uses_data = bool(steps) or edges or recipe.needs_calibration
    # Calibration runs the whole forward pass, so then every parameter must be finite; prepare()
    # repeats the per-layer checks and gives the saturation warnings.
    if not measured:
        check_model(model, plan_model(model, recipe), recipe.allow_saturation, whole_model=uses_data)
    if uses_data and calibration and not measured:
        check_calibration(calibration)
    work, extra, result = model, {}, None
    if steps or edges:
        work = model if inplace else copy.deepcopy(model)
        if recipe.rotation != "none":  # before calibration: statistics and GPTQ see rotated inputs
            rotate_planned(work, plan_model(work, recipe).layers, recipe.rotation_seed)
        # ``work`` is swapped for the quantized layers below: its float weights can go stage by stage.
        result = calibrate_weights(
            work,
            recipe,
            calibration,  # type: ignore[arg-type]
            progress=progress,
            cache_bytes=cache_bytes,
            release_weights=True,
        )
        recipe = result.recipe
        extra = {"weights": result.weights, "input_smooth": result.input_smooth}
        if progress:
            for note in result.notes:
                print(f"lowbit: {note}", file=sys.stderr)
    qmodel = prepare(work, recipe, inplace=inplace or work is not model, **extra)
    calibrate(qmodel, calibration, progress=progress)
    convert(qmodel)
    if result is not None:
        # The report stays with the model; the weights themselves now live in its layers.
        result.weights, result.input_smooth = {}, {}
        qmodel.lowbit_calibration = result
    if plan is not None:
        qmodel.lowbit_activation_plan = plan
    if folded:
        qmodel.lowbit_folded = folded
    use_kernels(qmodel, kernels)
    if calibration and qmodel is not model:
        fidelity = measure_fidelity(model, qmodel, list(calibration)[:CHECK_BATCHES])
        qmodel.lowbit_fidelity = fidelity
        for finding in fidelity.findings():
            warnings.warn(f"lowbit: {finding}", stacklevel=2)
    return qmodel


def data_aware_steps(recipe: Recipe) -> list[str]:
    """The data-aware steps a recipe uses anywhere (sorted), after checking every sequence.

    >>> data_aware_steps(resolve("int4-awq-gptq"))
    ['awq', 'gptq']
    """
    specs = [recipe.weight] + [rule.weight for rule in recipe.overrides]
    used: set[str] = set()
    for spec in specs:
        if spec is not None:
            check_sequence(spec.steps)
            used.update(spec.steps)
    if recipe.smoothquant_alpha is not None:
        used.add("smoothquant")
    if recipe.bias_correction:
        used.add("bias_correction")
    return sorted(used & set(DATA_AWARE))


def load(path: str | Path, model: nn.Module | None = None, **options: Any) -> nn.Module:
    """A quantized model from ``path``: a lowbit artifact directory (``model`` is the float
    architecture to fill, see ``lowbit.export.artifact.load`` for ``options``), a GGUF file
    (``lowbit.interop.gguf_import.load_gguf``) or a compressed-tensors checkpoint directory
    (``lowbit.interop.compressed_tensors``); the last two rebuild the architecture themselves
    and take only ``kernels``. Nothing is re-quantized.

    >>> qmodel = lowbit.load("tiny.gguf")  # doctest: +SKIP
    >>> qmodel = lowbit.load("out/", model=skeleton)  # doctest: +SKIP
    """
    from lowbit.errors import ArtifactError
    from lowbit.interop.gguf_import import is_gguf_file

    foreign = None
    if is_gguf_file(path):
        from lowbit.interop.gguf_import import load_gguf as foreign
    elif (Path(path) / "config.json").is_file() and not (Path(path) / "lowbit.json").is_file():
        try:
            from lowbit.interop.compressed_tensors import is_compressed_tensors_dir, load_compressed_tensors
        except ImportError:
            is_compressed_tensors_dir = None
        if is_compressed_tensors_dir is not None and is_compressed_tensors_dir(path):
            foreign = load_compressed_tensors
    if foreign is not None:
        unknown = set(options) - {"kernels"}
        if unknown:
            raise TypeError(f"loading {path} takes only kernels=, not {', '.join(sorted(unknown))}")
        return foreign(path, **options)
    if model is None:
        raise ArtifactError(
            f"{path} is a lowbit artifact (or not a model file lowbit knows: GGUF, compressed-tensors); "
            "a lowbit artifact loads into its float architecture: lowbit.load(path, model=skeleton)"
        )
    return artifact.load(path, model, **options)


__all__ = [
    "calibrate",
    "convert",
    "data_aware_steps",
    "load",
    "prepare",
    "quantize",
    "save",
    "size_report",
]
