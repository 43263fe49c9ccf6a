"""The lowbit artifact: ``model.safetensors`` (packed tensors) + ``lowbit.json`` (the manifest).

The manifest records the format version, the recipe, every quantized layer (format, granularity,
shape, stored bytes, bits per parameter, calibrated ranges), every stored tensor (shape, dtype,
bytes, role), the safetensors file's size and sha256, and provenance (lowbit / torch versions).
Loading checks all of it before touching the model and fails with a message that names the
tensor or layer at fault. Nothing is ever unpickled or executed from an artifact.

Writes are atomic: both files go to a temporary sibling directory that is renamed into place, so a
crash leaves either the previous artifact or the new one, never half of one.

``compression="lzma"`` writes a *coded* artifact (format version 2), where size on disk is the point:
``model.safetensors.xz`` and ``lowbit.json.xz``, coded and decoded by ``lowbit.export.compact``.
``read_manifest`` restores the full manifest, so readers see the same fields as in a plain artifact.

Version 1 artifacts (plain, or an older lzma-coded safetensors file) still load.

>>> import tempfile, torch, lowbit
>>> model = torch.nn.Sequential(torch.nn.Linear(16, 4))
>>> q = lowbit.quantize(model, "int4-weight-only")
>>> out = tempfile.mkdtemp() + "/art"
>>> manifest = save(q, out)
>>> reloaded = load(out, model=torch.nn.Sequential(torch.nn.Linear(16, 4)))
>>> x = torch.randn(2, 16)
>>> torch.equal(reloaded(x), q(x))
True
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

import lowbit
from lowbit.export.compact import (
    CODED_VERSION,
    COMPRESSIONS,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    ArtifactError,
    coded_files,
    decode_streams,
    expand_manifest,
    tensor_role,
)
from lowbit.nn.base import QuantizedModule
from lowbit.nn.layers import QUANTIZED_CLASSES
from lowbit.ptq.convert import set_submodule
from lowbit.ptq.plan import module_kind
from lowbit.recipes.spec import ActivationSpec, Recipe

ARTIFACT_VERSION = 1  # plain artifacts: indented lowbit.json + model.safetensors
READABLE_VERSIONS = (ARTIFACT_VERSION, CODED_VERSION)


# --- saving ----------------------------------------------------------------------------------------


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store tied tensors (same storage, e.g. tied embeddings) once; the rest become aliases."""
    seen: dict[tuple[int, int, tuple[int, ...], torch.dtype], str] = {}
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        unique[key] = t.detach().cpu().contiguous()
    return unique, aliases


def manifest_of(
    model: nn.Module, tensors: dict[str, torch.Tensor], aliases: dict[str, str]
) -> dict[str, Any]:
    """The manifest for ``model`` whose (deduplicated) state is ``tensors``."""
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedModule)}
    entries = {}
    for key, t in tensors.items():
        role, layer = tensor_role(key, quantized)
        entries[key] = {
            "shape": list(t.shape),
            "dtype": str(t.dtype).removeprefix("torch."),
            "bytes": t.numel() * t.element_size(),
            "role": role,
            "layer": layer,
        }
    stored = sum(e["bytes"] for e in entries.values())
    params = sum(m.weight_params for m in quantized.values())
    params += sum(t.numel() for k, t in tensors.items() if entries[k]["role"] == "float")
    recipe = getattr(model, "lowbit_recipe", None)
    return {
        "lowbit_artifact": ARTIFACT_VERSION,
        "lowbit_version": lowbit.__version__,
        "torch_version": torch.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_class": type(model).__name__,
        "recipe": recipe.to_dict() if isinstance(recipe, Recipe) else None,
        "layers": {name: m.manifest() for name, m in quantized.items()},
        "tensors": entries,
        "aliases": aliases,
        "totals": {
            "parameters": params,
            "stored_bytes": stored,
            "bits_per_param": round(stored * 8 / max(params, 1), 4),
        },
    }


def _write_atomically(directory: Path, files: dict[str, bytes]) -> None:
    directory = directory.expanduser().resolve()
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        for name, data in files.items():
            with open(staging / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if directory.exists():
            # Move the old artifact aside first, so the directory is never missing or half-written.
            backup = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old-"))
            os.replace(directory, backup / "old")
            os.replace(staging, directory)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save(
    model: nn.Module,
    directory: str | Path,
    metrics: dict[str, Any] | None = None,
    compression: str | None = None,
) -> dict[str, Any]:
    """Write ``directory/model.safetensors`` and ``directory/lowbit.json`` atomically; returns the manifest.

    ``metrics`` (optional, JSON-ready) is stored as provenance, e.g. the accuracy you measured.
    ``compression="lzma"`` entropy-codes the tensor file (``model.safetensors.xz``): smaller on disk
    for low-entropy codes (pruned or clustered weights), decoded on load. An existing artifact
    directory is replaced as a whole. ``None`` uses the model's own preference
    (``model.lowbit_compression``, set e.g. by the Deep Compression pipeline), else ``"none"``.
    """
    if compression is None:
        compression = getattr(model, "lowbit_compression", "none")
    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r}; choose one of {', '.join(COMPRESSIONS)}")
    tensors, aliases = _dedupe(model.state_dict())
    manifest = manifest_of(model, tensors, aliases)
    if compression == "lzma":
        manifest, files = coded_files(model, tensors, manifest, metrics or {})
        _write_atomically(Path(directory), files)
        return manifest
    # One metadata key: safetensors writes the metadata in hash-map order, which changes from one
    # process to the next, and the same model must give the same bytes (the manifest says who wrote it).
    data = save_safetensors_bytes(tensors, metadata={"format": "pt"})
    manifest["file"] = {
        "name": COMPRESSIONS[compression],
        "compression": compression,
        "bytes": len(data),
        "uncompressed_bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    manifest["metrics"] = metrics or {}
    files = {COMPRESSIONS[compression]: data, MANIFEST_FILE: (json.dumps(manifest, indent=2) + "\n").encode()}
    _write_atomically(Path(directory), files)
    return manifest


# --- loading ---------------------------------------------------------------------------------------


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Parse and sanity-check ``lowbit.json`` (or ``lowbit.json.xz`` in a compressed artifact)."""
    path = Path(directory) / MANIFEST_FILE
    if not Path(directory).is_dir():
        raise ArtifactError(f"{directory} is not a directory; give the folder lowbit.save wrote")
    packed = path.with_name(MANIFEST_FILE + ".xz")
    if not path.is_file() and not packed.is_file():
        raise ArtifactError(f"{path} is missing; this is not a lowbit artifact (expected {MANIFEST_FILE})")
    try:
        raw = path.read_bytes() if path.is_file() else lzma.decompress(packed.read_bytes())
        manifest = json.loads(raw.decode())
    except (json.JSONDecodeError, UnicodeDecodeError, lzma.LZMAError) as err:
        path = path if path.is_file() else packed
        raise ArtifactError(f"{path} is not valid JSON ({err}); the artifact is corrupt") from None
    version = manifest.get("lowbit_artifact") if isinstance(manifest, dict) else None
    if version not in READABLE_VERSIONS:
        raise ArtifactError(
            f"{path}: artifact format version {version!r} is not supported "
            f"(this lowbit reads {', '.join(map(str, READABLE_VERSIONS))})"
        )
    for key in ("layers", "tensors", "file"):
        if not isinstance(manifest.get(key), dict):
            raise ArtifactError(f"{path}: field {key!r} is missing or malformed; the manifest is corrupt")
    if version == CODED_VERSION:
        try:
            manifest = expand_manifest(manifest)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            if isinstance(err, ArtifactError):
                raise
            raise ArtifactError(f"{path}: the compact manifest is malformed ({err!r})") from None
    return manifest


def read_tensors(directory: str | Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Read ``model.safetensors`` after checking its size and sha256 against the manifest."""
    expected = manifest["file"]
    compression = expected.get("compression", "none")
    if compression not in COMPRESSIONS or expected.get("name") != COMPRESSIONS[compression]:
        raise ArtifactError(
            f"the manifest names an unknown tensor file {expected.get('name')!r} ({compression})"
        )
    path = Path(directory) / COMPRESSIONS[compression]
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; the artifact is incomplete")
    data = path.read_bytes()
    if len(data) != expected.get("bytes"):
        raise ArtifactError(
            f"{path} is {len(data)} bytes but the manifest says {expected.get('bytes')}: "
            "truncated or replaced"
        )
    if hashlib.sha256(data).hexdigest() != expected.get("sha256"):
        raise ArtifactError(f"{path} does not match the sha256 in {MANIFEST_FILE}: corrupt or modified")
    if compression == "lzma":
        try:
            data = lzma.decompress(data)
        except lzma.LZMAError as err:
            raise ArtifactError(f"{path} does not decompress: {err}") from None
    try:
        tensors = load_safetensors_bytes(data)
    except Exception as err:  # safetensors raises its own error type for malformed files
        raise ArtifactError(f"{path} is not a readable safetensors file: {err}") from None
    if manifest.get("lowbit_artifact") == CODED_VERSION:
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
    for alias, source in manifest.get("aliases", {}).items():
        if source not in tensors:
            raise ArtifactError(f"alias {alias!r} points to {source!r}, which is not stored")
        tensors[alias] = tensors[source]
    return tensors


def _rebuild_layer(model: nn.Module, name: str, entry: dict[str, Any]) -> None:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ArtifactError(
            f"the artifact quantized layer {name!r}, which the given model does not have; "
            "pass the same float architecture the artifact was made from"
        ) from None
    kind = module_kind(module)
    if kind != entry.get("kind") or kind not in QUANTIZED_CLASSES:
        raise ArtifactError(
            f"layer {name!r} is a {type(module).__name__} in the given model but a {entry.get('kind')} "
            "layer in the artifact; pass the float architecture the artifact was made from"
        )
    qmodule = QUANTIZED_CLASSES[kind].from_manifest(module, entry)
    if qmodule.float_config() != entry["config"]:
        raise ArtifactError(
            f"layer {name!r}: the model's layer is {qmodule.float_config()}, "
            f"the artifact's is {entry['config']}"
        )
    act = entry.get("activation")
    if act:
        spec = ActivationSpec(
            **{k: act[k] for k in ("mode", "format", "granularity", "symmetric", "observer")}
        )
        qmodule.set_activation(spec, name)
        if "scale" in act and qmodule.input_quant is not None:
            zp = torch.tensor(act["zero_point"]) if "zero_point" in act else None
            qmodule.input_quant.set_qparams(torch.tensor(act["scale"]), zp)
    if entry.get("input_smooth"):
        width = (
            entry["config"].get("in_features")
            or entry["config"].get("in_channels")
            or entry["config"].get("input_size")
        )
        qmodule.set_input_smooth(torch.ones(int(width)))
    set_submodule(model, name, qmodule)


def load(directory: str | Path, model: nn.Module) -> nn.Module:
    """Rebuild the quantized model from an artifact, using ``model`` (the float architecture,
    weights irrelevant) as the skeleton. ``model`` is modified in place and returned.

    Raises ``ArtifactError`` (a ``ValueError``) naming the tensor or layer at fault when the
    artifact is corrupt, truncated, tampered with, or made from a different architecture.
    """
    manifest = read_manifest(directory)
    tensors = read_tensors(directory, manifest)
    for name, entry in manifest["layers"].items():
        _rebuild_layer(model, name, entry)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ArtifactError(f"the artifact has no tensor {missing[0]!r}, which the model needs")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ArtifactError(f"the artifact holds tensor {unexpected[0]!r}, which the model does not have")
    for key, t in expected.items():
        got = tensors[key]
        if got.shape != t.shape or got.dtype != t.dtype:
            raise ArtifactError(
                f"tensor {key!r}: the artifact holds {got.dtype} {list(got.shape)}, the model expects "
                f"{t.dtype} {list(t.shape)}"
            )
    device = next((t.device for t in expected.values()), torch.device("cpu"))
    model.load_state_dict({k: v.to(device) for k, v in tensors.items()}, strict=True)
    if manifest.get("recipe"):
        model.lowbit_recipe = Recipe.from_dict(manifest["recipe"])
    return model.eval()


# The file names, the version and the error type live in compact.py (the codec raises and writes
# them too); they are part of this module's interface as well.
__all__ = [
    "ARTIFACT_VERSION",
    "CODED_VERSION",
    "COMPRESSIONS",
    "MANIFEST_FILE",
    "READABLE_VERSIONS",
    "WEIGHTS_FILE",
    "ArtifactError",
    "load",
    "manifest_of",
    "read_manifest",
    "read_tensors",
    "save",
]
