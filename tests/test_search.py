"""Accuracy-aware mixed-precision search: constraints met on held-out data, recipes reproducible."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lowbit
import lowbit.backends
from lowbit.analysis import CANDIDATES, search, split_holdout
from lowbit.eval.metrics import model_outputs
from lowbit.recipes import Recipe


def fragile_mlp(gen: torch.Generator) -> nn.Sequential:
    """Layer "2" sees one input channel 1000x larger than the rest (float function unchanged);
    layer "4" is its twin (same shape) without the plant."""
    model = nn.Sequential(
        nn.Linear(16, 128),
        nn.ReLU(),
        nn.Linear(128, 128),
        nn.ReLU(),
        nn.Linear(128, 128),
        nn.ReLU(),
        nn.Linear(128, 8),
    )
    with torch.no_grad():
        for layer in (model[0], model[2], model[4], model[6]):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) / layer.in_features**0.5)
            layer.bias.zero_()
        model[0].weight[5] *= 1000.0
        model[2].weight[:, 5] /= 1000.0
    return model.eval()


def test_digits_search_is_smaller_than_int8_and_holds_on_held_out_data() -> None:
    zm = lowbit.zoo.get("digits-cnn")
    # All six candidates, as the CLI searches (calibration images would add evidence, and time).
    result = search(zm.model, zm.eval_data, zm.metric, max_drop=0.5, frontier_points=4, progress=False)
    int8 = result.point("int8 (uniform)")
    assert int8 is not None and result.point("int4 (uniform)") is not None
    assert result.met
    assert result.stored_bytes < int8.stored_bytes
    assert result.drop <= 0.5 and result.holdout_drop <= 0.5
    assert len(result.explanations()) == len(result.layers) == 5
    assert all(c.name in c.reason for c in result.layers)

    # The saved recipe reproduces the searched model exactly through the ordinary quantize path.
    recipe = Recipe.from_yaml(result.recipe.to_yaml())
    rebuilt = lowbit.quantize(zm.model, recipe, progress=False)
    for m in (rebuilt, result.model):  # the exact comparison is on the reference path
        lowbit.backends.use_kernels(m, "reference")
    inputs = [x for x, _ in zm.eval_data]
    for a, b in zip(model_outputs(rebuilt, inputs), model_outputs(result.model, inputs), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert lowbit.size_report(rebuilt).stored_bytes == result.stored_bytes

    json.dumps(result.to_dict())
    assert result.plot_png().startswith(b"\x89PNG")
    assert "searched" in result.to_markdown() and "Pareto" in result.frontier_markdown()


def test_size_target_keeps_the_fragile_layer_precise(gen: torch.Generator) -> None:
    model = fragile_mlp(gen)
    data = [torch.randn(64, 16, generator=gen) for _ in range(4)]
    result = search(
        model, data, "cosine", target_size=0.25, candidates=("int8", "int4", "int2", "float"), progress=False
    )
    assert result.met and result.stored_bytes <= 0.25 * result.float_bytes
    formats = {c.name: c.format for c in result.layers}
    bits = {"float": 32, "int8": 8, "int4": 4, "int2": 2}
    # Same size, same budget pressure: the planted layer keeps more bits than its twin.
    assert bits[formats["2"]] > bits[formats["4"]]
    # A size target is met with the best metric among the explored points that fit.
    fitting = [p for p in result.frontier if p.stored_bytes <= 0.25 * result.float_bytes]
    assert result.value >= max(p.value for p in fitting) - 1e-6


def test_max_drop_on_cosine_and_custom_candidate(gen: torch.Generator) -> None:
    model = fragile_mlp(gen)
    data = [torch.randn(64, 16, generator=gen) for _ in range(4)]
    nf4 = ("nf4", lowbit.recipes.WeightSpec(format="nf4", granularity="group:32"))
    result = search(model, data, "cosine", max_drop=1.0, candidates=("int8", nf4, "float"), progress=False)
    assert result.met and result.drop <= 1.0 and result.holdout_drop <= 1.0
    assert result.stored_bytes < result.float_bytes / 2
    assert {c.format for c in result.layers} <= {"int8", "nf4", "float"}


def test_zero_budget_still_returns_a_valid_result(gen: torch.Generator) -> None:
    model = fragile_mlp(gen)
    data = [torch.randn(32, 16, generator=gen) for _ in range(2)]
    result = search(model, data, "cosine", max_drop=1.0, budget_minutes=0, progress=False)
    assert result.budget_exhausted and result.met
    assert result.stored_bytes == result.float_bytes  # nothing measured: everything stays float


def test_constraints_and_candidates_are_validated(gen: torch.Generator) -> None:
    model = fragile_mlp(gen)
    data = [torch.randn(8, 16)]
    with pytest.raises(ValueError, match="give a constraint"):
        search(model, data, "cosine")
    with pytest.raises(ValueError, match="unknown candidate"):
        search(model, data, "cosine", max_drop=1, candidates=("int5",))
    with pytest.raises(ValueError, match="target_size"):
        search(model, data, "cosine", target_size=20)
    assert "float" in CANDIDATES and CANDIDATES["float"] is None


def test_split_holdout_halves_a_single_batch() -> None:
    (a,), (b,) = split_holdout([(torch.zeros(6, 2), torch.arange(6))])
    assert a[0].shape[0] == 3 and b[1].tolist() == [3, 4, 5]
    assert split_holdout([1, 2, 3]) == ([1, 3], [2])


def test_target_bits_bounds_the_stored_bits_per_parameter(gen: torch.Generator) -> None:
    model = fragile_mlp(gen)
    data = [torch.randn(32, 16, generator=gen) for _ in range(2)]
    result = search(
        model, data, "cosine", target_bits=6.0, candidates=("int8", "int4", "float"), progress=False
    )
    assert result.met and result.bits_per_param <= 6.0
    assert result.bits_per_param > 4.5  # a looser budget than uniform int4 is used, not wasted
