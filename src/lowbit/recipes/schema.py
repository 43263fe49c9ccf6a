"""Type-checking recipes with pydantic: strict types, unknown keys refused, errors that name the key.

The dataclasses in ``spec.py`` stay the one description of a recipe; everything here is derived
from their annotations, so a new field is checked without touching this file.

- ``from_dict``: a strict pydantic model mirroring the dataclasses (generated from their
  annotations) validates the raw mapping first: YAML's quoted ``'no'`` is not ``False``, a string is
  not a list, ``true`` is not ``1``, a string is not a number. A lax ``TypeAdapter`` over the
  dataclasses then builds them (nested specs, lists to tuples, each ``__post_init__``).
- ``validated``: a class decorator that type-checks the fields of every instance (strict, so a
  ``Recipe(...)`` written in Python is checked too) and turns the value checks of ``__post_init__``
  into ``RecipeError``.
- ``from_file``: reads a YAML/JSON recipe file with bounded size, naming the file (and the line) in
  every error.

>>> from lowbit.recipes import Recipe
>>> Recipe.from_dict({"exclude": "features.0"})
Traceback (most recent call last):
...
lowbit.errors.RecipeError: recipe.exclude: expected a list, got 'features.0' (str)
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BeforeValidator, ConfigDict, TypeAdapter, ValidationError, create_model

from lowbit.errors import RecipeError

T = TypeVar("T")

# Recipes are a few hundred bytes; a bound keeps a wrong path (a data file, /dev/zero) from being read.
MAX_RECIPE_BYTES = 1 << 20
_STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

# What a user should read for each pydantic error type (the rest fall back to pydantic's text).
_EXPECTED = {
    "bool_type": "true or false",
    "string_type": "a string",
    "int_type": "an integer",
    "float_type": "a number",
    "finite_number": "a finite number",
    "list_type": "a list",
    "tuple_type": "a tuple",
    "model_type": "a mapping",
    "dict_type": "a mapping",
}


# --- the strict mirror of the dataclasses -----------------------------------------------------------


def _tuple_as_list(value: Any) -> Any:
    # YAML gives lists, Python callers (and to_dict's readers) may give tuples: both are sequences.
    return list(value) if isinstance(value, tuple) else value


def _mirror_type(tp: Any) -> Any:
    """The strict input type for one dataclass annotation."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        return functools.reduce(lambda a, b: a | b, [_mirror_type(a) for a in typing.get_args(tp)])
    if origin is tuple:
        (item, _ellipsis) = typing.get_args(tp)
        return Annotated[list[_mirror_type(item)], BeforeValidator(_tuple_as_list)]
    if dataclasses.is_dataclass(tp):
        return _mirror(tp)
    return tp


@functools.cache
def _mirror(cls: type) -> Any:
    """A strict pydantic model with ``cls``'s fields, used only to validate raw mappings."""
    hints = typing.get_type_hints(cls)
    spec: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        spec[f.name] = (_mirror_type(hints[f.name]), ... if required else None)
    return create_model(f"{cls.__name__}Input", __config__=_STRICT, **spec)


@functools.cache
def _builder(cls: type) -> TypeAdapter:
    # Lax on purpose: the mirror has already refused wrong types; this only builds the dataclasses.
    return TypeAdapter(cls)


@functools.cache
def _fields_model(cls: type) -> Any:
    """Strict pydantic model of ``cls``'s annotations, for checking an instance's field values."""
    hints = typing.get_type_hints(cls)
    spec = {f.name: (hints[f.name], ...) for f in dataclasses.fields(cls)}
    return create_model(f"{cls.__name__}Fields", __config__=_STRICT, **spec)


# --- errors ------------------------------------------------------------------------------------------


def _path(root: str, loc: tuple[Any, ...]) -> str:
    return root + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)


def _show(value: Any) -> str:
    text = repr(value)
    return f"{text[:60] + '...' if len(text) > 60 else text} ({type(value).__name__})"


def _allowed_keys(cls: type, loc: tuple[Any, ...]) -> list[str]:
    """The field names of the dataclass reached by following ``loc`` from ``cls``."""
    for part in loc:
        if isinstance(part, int):
            continue
        tp = typing.get_type_hints(cls).get(part)
        candidates = [tp, *typing.get_args(tp)] if tp is not None else []
        nested = [c for c in candidates if dataclasses.is_dataclass(c)]
        if not nested:
            return []
        cls = nested[0]
    return sorted(f.name for f in dataclasses.fields(cls))


_UNION_BRANCHES = {"str", "int", "float", "bool", "none", "tuple", "list", "dict"}


def _field_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """``loc`` without pydantic's union-branch tags (``str``, ``function-before[...]``, ``list[str]``)."""
    return tuple(
        p
        for p in loc
        if isinstance(p, int) or not (p in _UNION_BRANCHES or "[" in p or p.startswith("function-"))
    )


def _message(err: ValidationError, cls: type, root: str) -> str:
    """One line for a pydantic error: the key path, what was expected and what was given."""
    lines: list[str] = []
    for e in err.errors():
        loc = _field_loc(tuple(e["loc"]))
        kind = e["type"]
        if kind == "extra_forbidden":
            where = _path(root, loc[:-1])
            allowed = ", ".join(_allowed_keys(cls, loc[:-1]))
            lines.append(f"unknown key {loc[-1]!r} in {where}; allowed keys: {allowed}")
        elif kind == "missing":
            lines.append(f"{_path(root, loc)}: missing (a value is required)")
        elif kind == "value_error":
            lines.append(f"{_path(root, loc)}: {e['ctx']['error']}")
        else:
            what = _EXPECTED.get(kind) or e["msg"].removeprefix("Input should be ")
            head = f"{_path(root, loc)}: expected "
            tail = f", got {_show(e['input'])}"
            same = [i for i, line in enumerate(lines) if line.startswith(head) and line.endswith(tail)]
            if same:  # one value that fits no branch of a union: one line naming every branch
                lines[same[0]] = lines[same[0]][: -len(tail)] + f" or {what}" + tail
            else:
                lines.append(f"{head}{what}{tail}")
    more = f" (and {len(lines) - 3} more problems)" if len(lines) > 3 else ""
    return "; ".join(lines[:3]) + more


# --- entry points --------------------------------------------------------------------------------------


def from_dict(cls: type[T], data: Any, root: str = "recipe") -> T:
    """Validate a raw mapping strictly, then build ``cls`` from it (see the module docstring)."""
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe must be a mapping of keys to values, got {_show(data)}")
    if "activation" in data and data["activation"] is None:
        data = {k: v for k, v in data.items() if k != "activation"}  # ``activation:`` left empty: default
    try:
        _mirror(cls).model_validate(data)
        return _builder(cls).validate_python(data)
    except ValidationError as err:
        raise RecipeError(_message(err, cls, root)) from None


def validated(cls: type[T]) -> type[T]:
    """Class decorator, written below ``@dataclass`` (so the generated ``__init__`` calls the hook
    even for a class without its own ``__post_init__``): type-check every field on construction,
    strictly, and raise ``RecipeError`` for whatever the class's own ``__post_init__`` finds wrong."""
    own: Callable[[Any], None] | None = cls.__dict__.get("__post_init__")

    def __post_init__(self: Any) -> None:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        try:
            _fields_model(type(self)).model_validate(values)
        except ValidationError as err:
            raise RecipeError(_message(err, type(self), type(self).__name__)) from None
        if own is None:
            return
        try:
            own(self)
        except RecipeError:
            raise
        except ValueError as err:
            raise RecipeError(str(err)) from None

    cls.__post_init__ = __post_init__  # type: ignore[attr-defined]
    return cls


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice (YAML would silently keep the last one)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                line = key_node.start_mark.line + 1
                raise RecipeError(f"key {key!r} is given twice (line {line}); keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, source: str = "recipe") -> Any:
    """``yaml.safe_load`` (no Python tags), refusing duplicate keys; errors name ``source`` and the line."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except RecipeError as err:
        raise RecipeError(f"{source}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(f"{source} does not parse as YAML{where}: {problem}") from None


def from_file(cls: type[T], path: str | Path) -> T:
    """Read a recipe file (YAML or JSON): bounded size, UTF-8, every error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist (or is not a regular file)")
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe file {path} is {size:,} bytes; a recipe is at most {MAX_RECIPE_BYTES:,}")
    with path.open("rb") as f:
        raw = f.read(MAX_RECIPE_BYTES + 1)  # the size may change between stat and read
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise RecipeError(
            f"recipe file {path} is not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line}); "
            "save it as UTF-8"
        ) from None
    data = parse_yaml(text, f"recipe file {path}")
    if data is None:
        raise RecipeError(f"recipe file {path} is empty; expected a mapping like 'weight: {{format: int8}}'")
    try:
        return from_dict(cls, data)
    except RecipeError as err:
        raise RecipeError(f"recipe file {path}: {err}") from None
