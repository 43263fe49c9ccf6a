"""Recipes: presets by name, YAML files, or ``Recipe`` objects.

>>> import lowbit.recipes as R
>>> R.get("int8-dynamic").activation.mode
'dynamic'
>>> "nf4" in R.names()
True
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from lowbit.errors import RecipeError
from lowbit.recipes import schema
from lowbit.recipes.presets import PRESETS
from lowbit.recipes.spec import (
    ActivationSpec,
    AutoRoundOptions,
    AWQOptions,
    GPTQOptions,
    LayerRule,
    Recipe,
    WeightSpec,
)

__all__ = [
    "AWQOptions",
    "AutoRoundOptions",
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
    "with_overrides",
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


def _plain(spec: Any) -> dict[str, Any]:
    """A spec or rule as the dict ``Recipe.from_dict`` reads (tuples as lists, as YAML has them)."""
    d = dataclasses.asdict(spec)
    for key, value in list(d.items()):
        if isinstance(value, tuple):
            d[key] = list(value)
        elif isinstance(value, dict) and isinstance(value.get("algorithm"), tuple):
            value["algorithm"] = list(value["algorithm"])
    return {k: v for k, v in d.items() if v is not None}


def _merged(base: dict[str, Any] | None, change: Any, what: str) -> dict[str, Any] | None:
    if change is None:
        return base
    if isinstance(change, WeightSpec | ActivationSpec):
        change = _plain(change)
    if not isinstance(change, dict):
        raise RecipeError(f"with_overrides: {what} must be a dict of fields (or a spec), got {change!r}")
    return {**(base or {}), **change}


def with_overrides(
    recipe: str | Path | Recipe | dict[str, Any],
    *,
    exclude: list[str] | tuple[str, ...] = (),
    include: list[str] | tuple[str, ...] | None = None,
    overrides: list[dict[str, Any] | LayerRule] | tuple[dict[str, Any] | LayerRule, ...] = (),
    weight: dict[str, Any] | WeightSpec | None = None,
    activation: dict[str, Any] | ActivationSpec | None = None,
    **fields: Any,
) -> Recipe:
    """A preset (or any recipe) adjusted in one call, validated like a new recipe.

    ``exclude`` patterns and ``overrides`` rules are added to the recipe's own; ``include``
    replaces its patterns; ``weight`` / ``activation`` change only the fields given; any other
    ``Recipe`` field is set as given (``bias_correction=True``). The name gets ``+overrides``,
    so an artifact never claims to be the plain preset.

    >>> r = with_overrides("int4-gptq", exclude=["lm_head"], weight={"granularity": "group:64"})
    >>> r.name, r.exclude[-1], r.weight.granularity, r.weight.algorithm
    ('int4-gptq+overrides', 'lm_head', 'group:64', 'gptq')
    """
    base = resolve(recipe)
    d = base.to_dict()
    d["exclude"] = list(d.get("exclude", ())) + list(exclude)
    if include is not None:
        d["include"] = list(include)
    rules = [_plain(r) if isinstance(r, LayerRule) else r for r in overrides]
    d["overrides"] = list(d.get("overrides", ())) + rules
    d["weight"] = _merged(d.get("weight"), weight, "weight")
    d["activation"] = _merged(d.get("activation"), activation, "activation")
    d.update(fields)
    if "name" not in fields:
        d["name"] = f"{base.name}+overrides"
    return Recipe.from_dict(d)
