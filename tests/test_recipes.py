"""Recipes: presets, YAML / dict round trips, and errors that name the offending key."""

from __future__ import annotations

import dataclasses

import pytest

import lowbit.recipes as R
from lowbit.recipes import ActivationSpec, LayerRule, Recipe, WeightSpec

REQUIRED = [
    "int8-weight-only",
    "int8-dynamic",
    "int8-static",
    "int4-weight-only",
    "int2-weight-only",
    "nf4",
    "fp8",
    "fp16",
    "bf16",
    "log2-4bit",
    "kmeans-4bit",
    "pq",
    "binary",
    "ternary",
]


def test_required_presets_exist_with_descriptions():
    described = R.describe()
    for name in REQUIRED:
        assert name in R.names() and described[name].strip(), name


@pytest.mark.parametrize("name", REQUIRED)
def test_presets_round_trip_through_yaml(name):
    recipe = R.get(name)
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert recipe.to_dict()["version"] == 1


def test_custom_recipe_with_overrides_round_trips(tmp_path):
    recipe = Recipe(
        name="mixed",
        weight=WeightSpec(format="int4", granularity="group:32", symmetric=False, algorithm="mse"),
        activation=ActivationSpec(mode="dynamic", format="uint8", granularity="token"),
        exclude=("lm_head",),
        overrides=(
            LayerRule("encoder.*.attention.*", weight=WeightSpec(format="int8")),
            LayerRule("x", skip=True),
        ),
        smoothquant_alpha=0.5,
    )
    path = tmp_path / "r.yaml"
    recipe.save(path)
    assert R.resolve(str(path)) == recipe


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match="unknown key 'granularty' in recipe.weight"):
        Recipe.from_yaml("weight:\n  format: int8\n  granularty: channel\n")
    with pytest.raises(ValueError, match="unknown key 'colour' in recipe"):
        Recipe.from_dict({"colour": "blue"})


def test_bad_values_are_clear():
    with pytest.raises(ValueError, match="unknown format 'int9'"):
        WeightSpec(format="int9")
    with pytest.raises(ValueError, match="static activations are per tensor"):
        ActivationSpec(mode="static", granularity="token")
    with pytest.raises(ValueError, match="unknown recipe 'int7-magic'"):
        R.resolve("int7-magic")
    with pytest.raises(ValueError, match="version 2 is not supported"):
        Recipe.from_dict({"version": 2})


def test_with_overrides_adjusts_a_preset_in_one_call():
    import lowbit.recipes as R

    base = R.get("int4-gptq")
    r = R.with_overrides(
        "int4-gptq",
        exclude=["lm_head"],
        weight={"granularity": "group:64"},
        overrides=[LayerRule("*.down_proj", weight=WeightSpec(format="int8"))],
        bias_correction=True,
    )
    assert r.name == "int4-gptq+overrides" and r.bias_correction
    assert r.exclude == (*base.exclude, "lm_head")
    assert r.weight == dataclasses.replace(base.weight, granularity="group:64")
    assert r.overrides[-1].pattern == "*.down_proj" and r.overrides[-1].weight.format == "int8"
    assert Recipe.from_dict(r.to_dict()) == r
    assert R.get("int4-gptq") == base  # the preset itself is unchanged
    with pytest.raises(R.RecipeError, match="unknown key .formt. in recipe.weight"):
        R.with_overrides("int4-gptq", weight={"formt": "int4"})
