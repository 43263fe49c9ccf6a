"""Learned rounding inside a calibration stage: the adapter between the pipeline and AutoRound.

The pipeline hands over one stage (a transformer layer, a block), the layers in it whose
algorithm is ``autoround``, a way to get the stage's inputs per calibration batch and the float
stage's outputs (the targets). The stage is run through ``torch.func.functional_call`` with the
layers' weights replaced by AutoRound's fake-quantized ones, so the model itself is not edited
while the rounding is learned and gradients reach nothing but the rounding parameters.

The inputs come from the quantized model (earlier stages already quantized), the targets from
the float model (AutoRound's default: a stage learns to undo the error that reaches it, too).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lowbit import formats
from lowbit.algorithms.autoround import RoundingWeight, tune
from lowbit.codecs import QParams
from lowbit.granularity import parse
from lowbit.nn.layers import is_hf_conv1d
from lowbit.nn.qweight import QuantizedWeight
from lowbit.primitives import check_finite
from lowbit.ptq.matrices import matrices, read
from lowbit.ptq.modifiers import LayerResult, gptq_as_recipe
from lowbit.ptq.plan import LayerPlan
from lowbit.ptq.stages import hidden_of
from lowbit.recipes import Recipe
from lowbit.threads import single_thread

Inputs = Callable[[int], tuple[tuple[Any, ...], dict[str, Any]]]


def _as_param(layer: LayerPlan, matrix: torch.Tensor) -> torch.Tensor:
    """A ``[out, in]`` matrix in the layout of the layer's ``weight`` parameter."""
    p = layer.module.weight
    if is_hf_conv1d(layer.module):
        return matrix.t().to(p.dtype)
    return matrix.reshape(p.shape).to(p.dtype)


def _key(stage_name: str, layer: LayerPlan) -> str:
    """The layer's ``weight`` as ``functional_call`` names it inside the stage."""
    if layer.name == stage_name:
        return "weight"
    return layer.name[len(stage_name) + 1 :] + ".weight" if stage_name else layer.name + ".weight"


def tune_stage(
    stage: nn.Module,
    stage_name: str,
    layers: list[LayerPlan],
    recipe: Recipe,
    inputs: Inputs,
    target: Callable[[int], torch.Tensor],
    batches: int,
    deadline: float | None = None,
    on_step: Callable[[int, float], None] | None = None,
    hessians: dict[str, torch.Tensor] | None = None,
) -> dict[str, LayerResult]:
    """Learn the rounding of ``layers`` (all inside ``stage``) on the stage's output.

    ``inputs(i)`` gives the stage's ``(args, kwargs)`` for calibration batch ``i`` and
    ``target(i)`` the float stage's output tensor for it. Layers named in ``hessians`` (their
    ``2 X^T X``: the recipe says ``[gptq, autoround]``) start from GPTQ's result instead of round
    to nearest. Returns each layer's result, to be kept like any other modifier's
    (``effective`` holds the dequantized weight).
    """
    weights: dict[str, RoundingWeight] = {}
    by_key: dict[str, LayerPlan] = {}
    for layer in layers:
        spec = layer.weight
        assert spec is not None and matrices(layer)[0].param == "weight"
        w = read(layer, matrices(layer)[0])
        check_finite(w, f"layer {layer.name} weight")
        key = _key(stage_name, layer)
        fmt, g, symmetric = formats.get(spec.format), parse(spec.granularity), bool(spec.symmetric)
        start = None
        if hessians and layer.name in hessians:
            w, start = _gptq_start(w, hessians[layer.name], layer, recipe)
        weights[key] = RoundingWeight(w, fmt, g, symmetric, start=start)
        by_key[key] = layer
    frozen = [p for p in stage.parameters() if p.requires_grad]
    for p in frozen:  # gradients go to the rounding parameters only
        p.requires_grad_(False)

    def loss(fake: dict[str, torch.Tensor], index: int) -> torch.Tensor:
        args, kwargs = inputs(index)
        overrides = {k: _as_param(by_key[k], v) for k, v in fake.items()}
        out = hidden_of(functional_call(stage, overrides, args, kwargs, strict=False))
        assert out is not None
        return F.mse_loss(out.float(), target(index).float())

    o = recipe.autoround
    try:
        info = tune(
            weights, loss, batches, steps=o.steps, lr=o.lr, seed=o.seed, deadline=deadline, on_step=on_step
        )
    finally:
        for p in frozen:
            p.requires_grad_(True)
    results: dict[str, LayerResult] = {}
    for key, rounding in weights.items():
        layer = by_key[key]
        spec = layer.weight
        assert spec is not None
        codes, qp = rounding.result()
        g = parse(spec.granularity)
        qw = QuantizedWeight.from_codes(codes, rounding.fmt, qp, g, bool(spec.symmetric), tuple(codes.shape))
        qw.algorithm = "autoround"
        qw.info = dict(info)
        results[layer.name] = LayerResult({"weight": qw}, effective=[(matrices(layer)[0], qw.dequantize())])
    return results


def _gptq_start(
    w: torch.Tensor, hessian: torch.Tensor, layer: LayerPlan, recipe: Recipe
) -> tuple[torch.Tensor, QParams]:
    """GPTQ's updated weight and scales: rounded to nearest they are GPTQ's codes."""
    spec = layer.weight
    assert spec is not None
    updated = torch.empty_like(w)
    with single_thread():  # as the gptq modifier runs it: many small ops
        _, qp = gptq_as_recipe(w, hessian, spec, recipe, updated=updated)
    return updated, qp


def stage_deadline(budget_s: float | None, started: float, stages_left: int) -> float | None:
    """When the current stage must stop: an equal share of the time left (``None``: no budget).

    >>> stage_deadline(None, 0.0, 3) is None
    True
    >>> stage_deadline(60.0, time.perf_counter(), 3) > time.perf_counter()
    True
    """
    if budget_s is None:
        return None
    now = time.perf_counter()
    left = max(0.0, started + budget_s - now)
    return now + left / max(1, stages_left)
