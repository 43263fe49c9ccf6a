"""The strict schema of ``lowbit.json``, checked with pydantic before any field is used.

Unknown keys are refused at every level, every value has one type (no ``"no"`` for ``False``, no
``1.0`` for an integer shape), formats come from the format registry only (by their canonical
name), granularities must parse, tensor dtypes come from a fixed list, and sizes are bounded. What
the schema cannot see (whether a shape fits the model, whether an alias is where the saver put one)
is checked by ``lowbit.export.artifact`` against the model and the tensor file.

>>> import torch, tempfile, lowbit
>>> m = lowbit.save(lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(8, 2)), "int8-weight-only"),
...                 tempfile.mkdtemp() + "/a")
>>> validate_manifest(m, "lowbit.json") is m
True
>>> m["layers"]["0"]["weights"]["qweight"]["format"] = "int9"
>>> validate_manifest(m, "lowbit.json")
Traceback (most recent call last):
...
lowbit.errors.ArtifactError: lowbit.json: layers.0.weights.qweight.format: unknown format 'int9'
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from lowbit import formats
from lowbit import granularity as gran
from lowbit.errors import ArtifactError

MAX_DIMS = 8
MAX_NAME = 512  # a qualified module or tensor name
MAX_ELEMENTS = 1 << 40  # no tensor anyone ships has more; keeps products of dims exact
TENSOR_DTYPES = (
    "float32",
    "float16",
    "bfloat16",
    "float64",
    "uint8",
    "int8",
    "int16",
    "int32",
    "int64",
    "bool",
)
TENSOR_ROLES = (
    "packed", "scale", "tensor_scale", "zero_point", "codebook", "input_smooth", "input_rotation", "float",
    "activation_scale", "activation_zero_point",
)  # fmt: skip
MODULE_KINDS = ("linear", "conv", "embedding", "rnn")


def _format_name(name: str) -> str:
    try:
        canonical = formats.get(name).name
    except (ValueError, TypeError) as err:
        raise ValueError(str(err).split(";")[0]) from None
    if canonical != name:
        raise ValueError(f"format {name!r} is not written as lowbit writes it ({canonical!r})")
    return name


def _granularity(text: str) -> str:
    gran.parse(text)  # raises ValueError with the accepted forms
    return text


def _shape(dims: list[int]) -> list[int]:
    if math.prod(dims) > MAX_ELEMENTS:
        raise ValueError(f"shape {dims} has more than 2**40 elements")
    return dims


def _finite(x: float) -> float:
    if not math.isfinite(x):
        raise ValueError("must be finite")
    return x


Name = Annotated[str, Field(max_length=MAX_NAME)]
Short = Annotated[str, Field(max_length=64)]
Count = Annotated[StrictInt, Field(ge=0, le=1 << 50)]
Dim = Annotated[StrictInt, Field(ge=0, le=1 << 40)]
Width = Annotated[StrictInt, Field(ge=1, le=1 << 20)]
Shape = Annotated[list[Dim], Field(max_length=MAX_DIMS), AfterValidator(_shape)]
FormatName = Annotated[str, Field(max_length=32), AfterValidator(_format_name)]
GranularityText = Annotated[str, Field(max_length=32), AfterValidator(_granularity)]
Finite = Annotated[float, AfterValidator(_finite)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
ConfigValue = StrictInt | StrictBool | Finite | Short | list[StrictInt] | None
InfoValue = StrictInt | StrictBool | Finite | Short


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class WeightEntry(_Strict):
    format: FormatName
    granularity: GranularityText
    symmetric: StrictBool
    algorithm: Short
    shape: Shape
    block: Shape
    has_zero_point: StrictBool
    stored_bytes: Count
    bits_per_param: Annotated[Finite, Field(ge=0)]
    info: dict[Short, InfoValue] = Field(max_length=64)


class ActivationEntry(_Strict):
    mode: Literal["dynamic", "static"]
    format: FormatName
    granularity: GranularityText
    symmetric: StrictBool
    observer: Short
    scale: Annotated[Finite, Field(gt=0)] | None = None
    zero_point: Annotated[StrictInt, Field(ge=-(1 << 16), le=1 << 16)] | None = None


class LayerEntry(_Strict):
    kind: Literal[MODULE_KINDS]  # type: ignore[valid-type]
    class_: Short = Field(alias="class")
    config: dict[Short, ConfigValue] = Field(max_length=32)
    weights: dict[Name, WeightEntry] = Field(min_length=1, max_length=64)
    activation: ActivationEntry | None
    input_smooth: StrictBool
    # [width, odd factor] of a HadamardRotation applied to the input (absent: none).
    input_rotation: Annotated[list[Width], Field(min_length=2, max_length=2)] | None = None
    backend: Short


class TensorEntry(_Strict):
    shape: Shape
    dtype: Literal[TENSOR_DTYPES]  # type: ignore[valid-type]
    bytes: Count
    role: Literal[TENSOR_ROLES]  # type: ignore[valid-type]
    layer: Name | None
    coding: list[Short | StrictInt] | None = Field(default=None, max_length=5)


class FileEntry(_Strict):
    name: Literal["model.safetensors", "model.safetensors.xz"]
    compression: Literal["none", "lzma"]
    bytes: Count
    uncompressed_bytes: Count
    sha256: Sha256


class Totals(_Strict):
    parameters: Count
    stored_bytes: Count
    bits_per_param: Annotated[Finite, Field(ge=0)]


class Manifest(_Strict):
    lowbit_artifact: Literal[1, 2, 3, 4]
    lowbit_version: Short
    torch_version: Short
    created: Short | None = None  # written by version 1 and 2 only
    model_class: Name
    recipe: dict[Short, Any] | None  # checked by Recipe.from_dict
    layers: dict[Name, LayerEntry] = Field(max_length=1 << 16)
    tensors: dict[Name, TensorEntry] = Field(max_length=1 << 18)
    aliases: dict[Name, Name] = Field(max_length=1 << 16)
    folded_batchnorm: dict[Name, Name] = Field(default_factory=dict, max_length=1 << 16)  # bn -> conv
    totals: Totals
    file: FileEntry
    metrics: dict[Name, Any]


def _where(error: dict[str, Any]) -> str:
    return ".".join(str(p) for p in error["loc"] if not str(p).startswith("function-"))


def _clean(message: str) -> str:
    return message.removeprefix("Value error, ")


def validate_manifest(manifest: Any, path: Any) -> dict[str, Any]:
    """Check ``manifest`` (a parsed ``lowbit.json``) against the schema; returns it unchanged.

    Raises ``ArtifactError`` naming the file and the first offending field."""
    try:
        checked = Manifest.model_validate(manifest)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        raise ArtifactError(f"{path}: {_where(first)}: {_clean(first['msg'])}") from None
    if checked.lowbit_artifact >= 3 and checked.created is not None:
        raise ArtifactError(f"{path}: created: not part of a version {checked.lowbit_artifact} manifest")
    coded = checked.lowbit_artifact in (2, 4)
    for key, entry in checked.tensors.items():
        if (entry.coding is not None) != coded:
            raise ArtifactError(f"{path}: tensors.{key}.coding: present only in coded (lzma) artifacts")
    if (checked.file.compression == "lzma") != (checked.file.name == "model.safetensors.xz"):
        raise ArtifactError(
            f"{path}: file: name {checked.file.name!r} does not fit {checked.file.compression!r}"
        )
    return manifest
