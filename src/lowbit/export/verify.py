"""Reading an artifact from a stranger: every byte covered by a digest, every field checked, every
allocation bounded, before anything is interpreted.

The order, for ``read_manifest`` then ``read_tensors`` (``lowbit.load`` adds the model checks of
``check_layers`` / ``check_state`` between the two):

1. ``lowbit.sha256`` (the seal): a small regular file in ``sha256sum`` format naming exactly the
   manifest and the tensor file. A user's ``verify_seal`` (e.g. a signature check) runs on it first.
2. The manifest: a regular file of bounded size whose sha256 matches the seal, decompressed with a
   cap (coded artifacts), parsed with a depth limit, expanded (coded), then validated against the
   strict schema (``manifest_schema``), its recipe through ``Recipe.from_dict``, and its internal
   consistency: tensor sizes, roles and layers derive from shapes and names, every quantized weight
   has exactly the buffers its format and shape imply, aliases point at stored tensors.
3. The tensor file: size checked (``stat``) against the manifest before reading, sha256 streamed and
   compared with the manifest and the seal, decompression capped by the declared size, then every
   tensor's shape and dtype compared with the manifest.

Artifacts of versions 1 and 2 (lowbit 0.1) have no seal: they are read only when the caller passes
``allow_unsealed=True``, since nothing covers their manifest.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file as load_safetensors_file
from torch import nn

from lowbit import formats, observers
from lowbit.export.compact import (
    CODED_VERSION,
    COMPRESSIONS,
    LEGACY_CODED_VERSION,
    MANIFEST_FILE,
    ArtifactError,
    decode_streams,
    expand_manifest,
    stream_sizes,
    tensor_role,
)
from lowbit.export.manifest_schema import validate_manifest
from lowbit.export.safe_read import json_bounded, lzma_bounded, read_bounded, regular_file, sha256_file
from lowbit.export.seal import MAX_SEAL_BYTES, SEAL_FILE, parse_seal
from lowbit.nn.layers import QUANTIZED_CLASSES
from lowbit.nn.qweight import QuantizedWeight
from lowbit.ptq.plan import module_kind
from lowbit.recipes.spec import ActivationSpec, Recipe

ARTIFACT_VERSION = 3  # plain artifacts: lowbit.json + model.safetensors + lowbit.sha256
LEGACY_VERSION = 1
SEALED_VERSIONS = (ARTIFACT_VERSION, CODED_VERSION)
UNSEALED_VERSIONS = (LEGACY_VERSION, LEGACY_CODED_VERSION)
READABLE_VERSIONS = (*SEALED_VERSIONS, *UNSEALED_VERSIONS)
MAX_MANIFEST_BYTES = 64 << 20  # ~300k tensor entries; real manifests are kilobytes
# Without a model to bound it (inspect), a coded artifact may decode to at most this many times its
# tensor file, and at least this floor: Deep Compression codes ~5-40x, so both are generous.
MAX_DECODE_RATIO = 64
MIN_DECODE_CAP = 64 << 20
HEADER_SLACK = 1 << 16  # safetensors header of a coded file's one stream tensor, with room to spare

SealCheck = Callable[[Path], None]


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _nbytes(shape: list[int], dtype: str) -> int:
    return math.prod(shape) * _dtype(dtype).itemsize


# --- the seal and the manifest ---------------------------------------------------------------------


def _manifest_path(directory: Path) -> Path:
    plain, packed = directory / MANIFEST_FILE, directory / (MANIFEST_FILE + ".xz")
    exists = [p for p in (plain, packed) if p.is_symlink() or p.exists()]
    if not exists:
        raise ArtifactError(f"{plain} is missing; this is not a lowbit artifact (expected {MANIFEST_FILE})")
    if len(exists) == 2:
        raise ArtifactError(f"{directory} holds both {plain.name} and {packed.name}; keep one (re-save it)")
    return exists[0]


def _read_seal(directory: Path, allow_unsealed: bool, verify_seal: SealCheck | None) -> dict[str, str] | None:
    path = directory / SEAL_FILE
    if not (path.is_symlink() or path.exists()):
        if allow_unsealed:
            return None
        raise ArtifactError(
            f"{path} is missing: nothing covers this artifact's manifest (written by lowbit 0.1, or its "
            "seal was removed). Re-save it with this lowbit, or pass allow_unsealed=True "
            "(lowbit --allow-unsealed) if you trust where it came from"
        )
    regular_file(path, "seal")
    if verify_seal is not None:
        try:
            verify_seal(path)
        except ArtifactError:
            raise
        except Exception as err:  # the user's own check said no
            raise ArtifactError(f"{path}: verify_seal refused it ({type(err).__name__}: {err})") from None
    return parse_seal(read_bounded(path, MAX_SEAL_BYTES, "seal"), path)


def _parse_manifest_file(path: Path, seal: dict[str, str] | None) -> Any:
    raw = read_bounded(path, MAX_MANIFEST_BYTES, "manifest")
    if seal is not None:
        if path.name not in seal:
            raise ArtifactError(f"{path.parent / SEAL_FILE} does not cover {path.name}")
        if hashlib.sha256(raw).hexdigest() != seal[path.name]:
            raise ArtifactError(f"{path} does not match its sha256 in {SEAL_FILE}: corrupt or modified")
    if path.suffix == ".xz":
        raw = lzma_bounded(raw, MAX_MANIFEST_BYTES, path)
    return json_bounded(raw, path)


def _expand(path: Path, compact: dict[str, Any]) -> dict[str, Any]:
    for key, kind in (("layers", dict), ("tensors", dict), ("file", dict)):
        if not isinstance(compact.get(key), kind):
            raise ArtifactError(f"{path}: {key}: missing or not a mapping; the manifest is corrupt")
    for name, layer in compact["layers"].items():
        if not isinstance(layer, dict) or not isinstance(layer.get("weights", {}), dict):
            raise ArtifactError(f"{path}: layers.{name}: not a mapping; the manifest is corrupt")
        for w, spec in layer.get("weights", {}).items():
            if not isinstance(spec, dict):
                raise ArtifactError(f"{path}: layers.{name}.weights.{w}: not a mapping")
    try:
        return expand_manifest(compact)
    except ArtifactError as err:
        raise ArtifactError(f"{path}: {err}") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as err:
        raise ArtifactError(
            f"{path}: the compact manifest is malformed ({type(err).__name__}: {err})"
        ) from None


def read_manifest(
    directory: str | Path, *, allow_unsealed: bool = False, verify_seal: SealCheck | None = None
) -> dict[str, Any]:
    """The artifact's manifest, verified against the seal, the schema and itself (see module doc).

    Raises ``ArtifactError`` naming the file and field at fault."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory} is not a directory; give the folder lowbit.save wrote")
    path = _manifest_path(directory)
    seal = _read_seal(directory, allow_unsealed, verify_seal)
    manifest = _parse_manifest_file(path, seal)
    version = manifest.get("lowbit_artifact") if isinstance(manifest, dict) else None
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise ArtifactError(
            f"{path}: artifact format version {version!r} is not supported "
            f"(this lowbit reads {', '.join(map(str, READABLE_VERSIONS))})"
        )
    if seal is None and version in SEALED_VERSIONS:
        raise ArtifactError(
            f"{directory / SEAL_FILE} is missing; a version {version} artifact is always sealed"
        )
    if seal is not None and version in UNSEALED_VERSIONS:
        raise ArtifactError(f"{path}: a version {version} artifact has no seal; this one was edited")
    coded = version in (CODED_VERSION, LEGACY_CODED_VERSION)
    if version != LEGACY_VERSION and coded != (path.suffix == ".xz"):  # version 1 had both
        raise ArtifactError(f"{path}: version {version} does not fit the manifest's file name")
    if version in (CODED_VERSION, LEGACY_CODED_VERSION):
        manifest = _expand(path, manifest)
    validate_manifest(manifest, path)
    _check_consistency(path, manifest)
    _check_tensor_file(directory, manifest, seal)
    return manifest


def manifest_recipe(manifest: dict[str, Any], path: Any = MANIFEST_FILE) -> Recipe | None:
    """The manifest's recipe as a ``Recipe`` (checked as any recipe file is), or ``None``."""
    if manifest.get("recipe") is None:
        return None
    try:
        return Recipe.from_dict(manifest["recipe"])
    except (ValueError, TypeError) as err:
        raise ArtifactError(f"{path}: recipe: {err}") from None


def _check_consistency(path: Path, manifest: dict[str, Any]) -> None:
    """What the schema cannot see: sizes, roles, buffers and aliases agree with shapes and names."""
    manifest_recipe(manifest, path)
    layers, tensors = manifest["layers"], manifest["tensors"]
    names = dict.fromkeys(layers)
    for key, entry in tensors.items():
        if entry["bytes"] != _nbytes(entry["shape"], entry["dtype"]):
            raise ArtifactError(
                f"{path}: tensors.{key}.bytes: {entry['bytes']} does not fit its shape and dtype"
            )
        if (entry["role"], entry["layer"]) != tensor_role(key, names):
            raise ArtifactError(
                f"{path}: tensors.{key}: role/layer {entry['role']}/{entry['layer']} is wrong"
            )
    for name, layer in layers.items():
        for wname, spec in layer["weights"].items():
            _check_weight_buffers(path, name, wname, spec, tensors)
        act = layer["activation"]
        if act is not None and act["observer"] not in observers.names():
            raise ArtifactError(
                f"{path}: layers.{name}.activation.observer: unknown observer {act['observer']!r}"
            )
        if act is not None:
            try:
                ActivationSpec(
                    **{k: act[k] for k in ("mode", "format", "granularity", "symmetric", "observer")}
                )
            except (ValueError, TypeError) as err:
                raise ArtifactError(f"{path}: layers.{name}.activation: {err}") from None
    for alias, source in manifest["aliases"].items():
        if alias in tensors or source not in tensors:
            raise ArtifactError(
                f"{path}: aliases.{alias}: must name a tensor not stored, pointing at a stored one"
            )


def _check_weight_buffers(
    path: Path, layer: str, wname: str, spec: dict[str, Any], tensors: dict[str, Any]
) -> None:
    """The buffers a weight's format, shape and block imply are exactly the manifest's tensors."""
    where = f"{path}: layers.{layer}.weights.{wname}"
    shape, block = spec["shape"], spec["block"]
    if len(block) != len(shape) or any(not 0 < b <= s for b, s in zip(block, shape, strict=True) if s):
        raise ArtifactError(f"{where}: block {block} does not fit shape {shape}")
    fmt = formats.get(spec["format"])
    if fmt.family == "vector" and (len(shape) < 2 or fmt.vector_dim > math.prod(shape[1:])):
        raise ArtifactError(f"{where}: {fmt.name} does not fit a weight of shape {shape}")
    try:
        qw = QuantizedWeight(fmt, spec["granularity"], spec["symmetric"], tuple(shape), tuple(block))
        expected = qw.expected_buffers(spec["has_zero_point"])
    except (ValueError, TypeError, AssertionError, ZeroDivisionError) as err:
        raise ArtifactError(f"{where}: {err}") from None
    prefix = f"{layer}.{wname}." if layer else f"{wname}."
    stored = {k[len(prefix) :] for k in tensors if k.startswith(prefix) and "." not in k[len(prefix) :]}
    if stored != set(expected):
        raise ArtifactError(f"{where}: stores {sorted(stored)}, its format needs {sorted(expected)}")
    for buf, (bshape, dtype) in expected.items():
        entry = tensors[prefix + buf]
        if tuple(entry["shape"]) != tuple(bshape) or _dtype(entry["dtype"]) != dtype:
            raise ArtifactError(
                f"{where}: {buf} is {entry['dtype']} {entry['shape']}, its format needs "
                f"{str(dtype).removeprefix('torch.')} {list(bshape)}"
            )


def _check_tensor_file(directory: Path, manifest: dict[str, Any], seal: dict[str, str] | None) -> None:
    """The tensor file exists, is as large as declared, and the declared sizes bound the tensors."""
    entry = manifest["file"]
    path = directory / entry["name"]
    if seal is not None:
        expected_names = {entry["name"], _manifest_path(directory).name}
        if set(seal) != expected_names:
            raise ArtifactError(
                f"{directory / SEAL_FILE} names {sorted(seal)}, expected {sorted(expected_names)}"
            )
        if seal[entry["name"]] != entry["sha256"]:
            raise ArtifactError(
                f"{path}: the seal's and the manifest's sha256 differ; the artifact was edited"
            )
    size = regular_file(path, "tensor file").st_size
    if size != entry["bytes"]:
        raise ArtifactError(
            f"{path} is {size:,} bytes but the manifest says {entry['bytes']:,}: truncated or replaced"
        )
    tensor_bytes = sum(e["bytes"] for e in manifest["tensors"].values())
    if entry["compression"] == "none":
        if entry["uncompressed_bytes"] != entry["bytes"] or tensor_bytes > entry["bytes"]:
            raise ArtifactError(
                f"{path}: the manifest's tensors do not fit in a {entry['bytes']:,}-byte file"
            )
    elif manifest["lowbit_artifact"] in (CODED_VERSION, LEGACY_CODED_VERSION):
        streams = sum(_stream_bytes(e) for e in manifest["tensors"].values())
        if entry["uncompressed_bytes"] > streams + HEADER_SLACK:
            raise ArtifactError(
                f"{path}: declares {entry['uncompressed_bytes']:,} decoded bytes, "
                f"its tensors code to {streams:,}"
            )
    elif entry["uncompressed_bytes"] > tensor_bytes + HEADER_SLACK + sum(
        128 + len(k) for k in manifest["tensors"]
    ):
        raise ArtifactError(f"{path}: declares more decoded bytes than its tensors hold")


def _stream_bytes(entry: dict[str, Any]) -> int:
    try:
        return sum(stream_sizes(entry).values())
    except (IndexError, TypeError, KeyError) as err:
        raise ArtifactError(f"malformed tensor coding {entry.get('coding')!r} ({err})") from None


# --- the model -------------------------------------------------------------------------------------


def check_layers(model: nn.Module, manifest: dict[str, Any]) -> None:
    """Every quantized layer of the manifest fits ``model``'s float layer of that name: same kind,
    same constructor settings, same weight names and shapes (before anything is allocated)."""
    for name, entry in manifest["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ArtifactError(
                f"the artifact quantized layer {name!r}, which the given model does not have; "
                "pass the same float architecture the artifact was made from"
            ) from None
        kind = module_kind(module)
        if kind != entry["kind"] or kind not in QUANTIZED_CLASSES:
            raise ArtifactError(
                f"layer {name!r} is a {type(module).__name__} in the given model but a {entry['kind']} "
                "layer in the artifact; pass the float architecture the artifact was made from"
            )
        cls = QUANTIZED_CLASSES[kind]
        expected = cls.float_weight_shapes(module)
        stored = {w: tuple(spec["shape"]) for w, spec in entry["weights"].items()}
        if stored != expected:
            raise ArtifactError(
                f"layer {name!r}: the artifact stores weights {stored}, the model's layer has {expected}; "
                "pass the float architecture the artifact was made from"
            )


def check_state(model: nn.Module, manifest: dict[str, Any]) -> None:
    """The rebuilt model's state (names, shapes, dtypes, ties) is exactly what the manifest lists."""
    expected = model.state_dict(keep_vars=True)
    listed = {**manifest["tensors"], **{a: manifest["tensors"][s] for a, s in manifest["aliases"].items()}}
    missing = sorted(set(expected) - set(listed))
    if missing:
        raise ArtifactError(f"the artifact has no tensor {missing[0]!r}, which the model needs")
    unexpected = sorted(set(listed) - set(expected))
    if unexpected:
        raise ArtifactError(f"the artifact holds tensor {unexpected[0]!r}, which the model does not have")
    for key, t in expected.items():
        entry = listed[key]
        if tuple(entry["shape"]) != tuple(t.shape) or _dtype(entry["dtype"]) != t.dtype:
            raise ArtifactError(
                f"tensor {key!r}: the artifact holds {entry['dtype']} {entry['shape']}, the model expects "
                f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"
            )
    for alias, source in manifest["aliases"].items():
        a, s = expected[alias], expected[source]
        if (
            a.untyped_storage().data_ptr() != s.untyped_storage().data_ptr()
            or a.storage_offset() != s.storage_offset()
        ):
            raise ArtifactError(
                f"the artifact ties {alias!r} to {source!r}, which the model does not share; "
                "an alias may only join tensors the model itself ties"
            )


# --- the tensor file -------------------------------------------------------------------------------


def read_tensors(
    directory: str | Path, manifest: dict[str, Any], max_decoded_bytes: int | None = None
) -> dict[str, torch.Tensor]:
    """The stored tensors, after checking the tensor file's size and sha256 against the manifest
    (from ``read_manifest``); each tensor's shape and dtype must be what the manifest lists.
    ``max_decoded_bytes`` bounds what a coded artifact may decode to (default: 64 times the tensor
    file, at least 64 MiB; ``lowbit.load`` has already bounded it by the model)."""
    expected = manifest["file"]
    path = Path(directory) / COMPRESSIONS[expected["compression"]]
    declared = sum(e["bytes"] for e in manifest["tensors"].values())
    if max_decoded_bytes is None:
        max_decoded_bytes = max(MIN_DECODE_CAP, MAX_DECODE_RATIO * expected["bytes"])
    if declared > max_decoded_bytes:
        raise ArtifactError(
            f"{path}: the manifest declares {declared:,} bytes of tensors, more than the "
            f"{max_decoded_bytes:,} allowed here (pass max_decoded_bytes to read larger artifacts)"
        )
    try:
        if expected["compression"] == "lzma":
            data = read_bounded(path, expected["bytes"], "tensor file")
            if hashlib.sha256(data).hexdigest() != expected["sha256"]:
                raise ArtifactError(
                    f"{path} does not match the sha256 in {MANIFEST_FILE}: corrupt or modified"
                )
            raw = lzma_bounded(data, expected["uncompressed_bytes"], path)
            del data
            if len(raw) != expected["uncompressed_bytes"]:
                raise ArtifactError(f"{path} decodes to {len(raw):,} bytes, the manifest says "
                                    f"{expected['uncompressed_bytes']:,}")  # fmt: skip
            tensors = load_safetensors_bytes(raw)
        else:
            if sha256_file(path, expected["bytes"]) != expected["sha256"]:
                raise ArtifactError(
                    f"{path} does not match the sha256 in {MANIFEST_FILE}: corrupt or modified"
                )
            tensors = load_safetensors_file(path)
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        if isinstance(err, ArtifactError):
            raise
        raise ArtifactError(f"{path} is not a readable safetensors file: {err}") from None
    if manifest["lowbit_artifact"] in (CODED_VERSION, LEGACY_CODED_VERSION):
        tensors = decode_streams(path, tensors, manifest["tensors"])
    for key, entry in manifest["tensors"].items():
        if key not in tensors:
            raise ArtifactError(f"tensor {key!r} is listed in the manifest but missing from {path}")
        t = tensors[key]
        if list(t.shape) != entry["shape"] or str(t.dtype).removeprefix("torch.") != entry["dtype"]:
            raise ArtifactError(
                f"tensor {key!r}: the file holds {str(t.dtype)} {list(t.shape)}, the manifest says "
                f"{entry['dtype']} {entry['shape']}"
            )
    extra = sorted(set(tensors) - set(manifest["tensors"]))
    if extra:
        raise ArtifactError(f"{path} holds tensor {extra[0]!r} that the manifest does not list")
    for alias, source in manifest["aliases"].items():
        tensors[alias] = tensors[source]
    return tensors
