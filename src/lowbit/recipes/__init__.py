"""Recipes: presets by name, YAML files, or ``Recipe`` objects.

>>> import lowbit.recipes as R
>>> R.get("int8-dynamic").activation.mode
'dynamic'
>>> "nf4" in R.names()
True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowbit.errors import RecipeError
from lowbit.recipes import schema
from lowbit.recipes.presets import PRESETS
from lowbit.recipes.spec import ActivationSpec, AWQOptions, GPTQOptions, LayerRule, Recipe, WeightSpec

__all__ = [
    "AWQOptions",
    "ActivationSpec",
    "GPTQOptions",
    "LayerRule",
    "Recipe",
    "RecipeError",
    "WeightSpec",
    "describe",
    "get",
    "names",
    "resolve",
]


def names() -> list[str]:
    """Preset names, in the order they are documented."""
    return list(PRESETS)


def describe() -> dict[str, str]:
    """Preset name -> one-line description."""
    return {name: r.description for name, r in PRESETS.items()}


def get(name: str) -> Recipe:
    """A preset by name."""
    if name not in PRESETS:
        presets = ", ".join(PRESETS)
        raise RecipeError(f"unknown recipe {name!r}; presets: {presets} (or a path to a YAML file)")
    return PRESETS[name]


def resolve(recipe: str | Path | Recipe | dict[str, Any]) -> Recipe:
    """Accept a preset name, a YAML path, a dict or a ``Recipe``; any problem is a ``RecipeError``.

    >>> resolve({"weight": {"format": "int4", "granularity": "group:32"}}).weight.format
    'int4'
    """
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    text = str(recipe)
    if text in PRESETS:
        return PRESETS[text]
    path = Path(text)
    if path.suffix in (".yaml", ".yml", ".json") or path.exists():
        return schema.from_file(Recipe, path)
    return get(text)
