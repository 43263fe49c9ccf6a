"""The lowbit artifact: ``model.safetensors`` (packed tensors) + ``lowbit.json`` (the manifest).

The manifest records the format version, the recipe, every quantized layer (format, granularity,
shape, stored bytes, bits per parameter, calibrated ranges), every stored tensor (shape, dtype,
bytes, role), the safetensors file's size and sha256, and provenance (lowbit / torch versions).
A third file, ``lowbit.sha256`` (the seal, ``sha256sum`` format), covers both, so any edit of any
byte is detected before anything is interpreted. Loading checks all of it (``lowbit.export.verify``:
seal, strict schema, bounded reads, shapes against the model before allocating) and fails with an
``ArtifactError`` that names the file, tensor or layer at fault. Nothing is ever unpickled or
executed from an artifact. The same model saved twice gives the same bytes (no timestamps).

Writes are atomic and locked (``lowbit.export.atomic``): the files go to a staging directory beside the
target that is swapped in, so at every instant the path holds the previous artifact or the new one.

``compression="lzma"`` writes a *coded* artifact (format version 4), where size on disk is the point:
``model.safetensors.xz`` and ``lowbit.json.xz``, coded and decoded by ``lowbit.export.compact``.
``read_manifest`` restores the full manifest, so readers see the same fields as in a plain artifact.

Artifacts of lowbit 0.1 (versions 1 and 2, unsealed) load with ``allow_unsealed=True``.

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
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors_bytes
from safetensors.torch import save_file as save_safetensors_file
from torch import nn

import lowbit
from lowbit.export.atomic import write_directory
from lowbit.export.compact import (
    CODED_VERSION,
    COMPRESSIONS,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    ArtifactError,
    coded_files,
    tensor_role,
)
from lowbit.export.seal import SEAL_FILE, seal_from_digests, seal_text
from lowbit.export.verify import (
    ARTIFACT_VERSION,
    READABLE_VERSIONS,
    SealCheck,
    check_layers,
    check_state,
    manifest_recipe,
    read_manifest,
    read_tensors,
)
from lowbit.modelcheck import require_module
from lowbit.nn.base import QuantizedModule
from lowbit.nn.layers import QUANTIZED_CLASSES
from lowbit.ptq.convert import set_submodule
from lowbit.ptq.distributed import is_writer
from lowbit.recipes.spec import ActivationSpec, Recipe

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
    folded = getattr(model, "lowbit_folded", None)
    # Written only when something was folded: other artifacts keep exactly their old bytes.
    extra = {"folded_batchnorm": dict(sorted(folded.items()))} if folded else {}
    return {
        "lowbit_artifact": ARTIFACT_VERSION,
        "lowbit_version": lowbit.__version__,
        "torch_version": torch.__version__,
        "model_class": type(model).__name__,
        "recipe": recipe.to_dict() if isinstance(recipe, Recipe) else None,
        "layers": {name: m.manifest() for name, m in quantized.items()},
        "tensors": entries,
        "aliases": aliases,
        **extra,
        "totals": {
            "parameters": params,
            "stored_bytes": stored,
            "bits_per_param": round(stored * 8 / max(params, 1), 4),
        },
    }


def _write_atomically(directory: Path, files: dict[str, bytes], force: bool = False) -> None:
    # Under torch.distributed every rank holds the same quantized model: rank 0 alone writes it.
    if is_writer():
        write_directory(directory, files, force=force)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _save_streamed(
    directory: Path, tensors: dict[str, torch.Tensor], manifest: dict[str, Any], metrics: dict, force: bool
) -> None:
    """``save``'s plain artifact, the tensor file streamed to disk (``safetensors.torch.save_file``
    writes the bytes ``save`` would, from the tensors themselves) and hashed back from disk."""

    def write(staging: Path) -> None:
        path = staging / COMPRESSIONS["none"]
        save_safetensors_file(tensors, str(path), metadata={"format": "pt"})
        digests = {path.name: _sha256_file(path)}
        manifest["file"] = {
            "name": path.name,
            "compression": "none",
            "bytes": path.stat().st_size,
            "uncompressed_bytes": path.stat().st_size,
            "sha256": digests[path.name],
        }
        manifest["metrics"] = metrics
        text = (json.dumps(manifest, indent=2) + "\n").encode()
        (staging / MANIFEST_FILE).write_bytes(text)
        digests[MANIFEST_FILE] = hashlib.sha256(text).hexdigest()
        (staging / SEAL_FILE).write_text(seal_from_digests(digests))

    if is_writer():
        write_directory(directory, {}, force=force, writer=write)


def save(
    model: nn.Module,
    directory: str | Path,
    metrics: dict[str, Any] | None = None,
    compression: str | None = None,
    *,
    force: bool = False,
    stream: bool = False,
) -> dict[str, Any]:
    """Write ``directory/model.safetensors`` and ``directory/lowbit.json`` atomically; returns the manifest.

    ``metrics`` (optional, JSON-ready) is stored as provenance, e.g. the accuracy you measured.
    ``compression="lzma"`` entropy-codes the tensor file (``model.safetensors.xz``): smaller on disk
    for low-entropy codes (pruned or clustered weights), decoded on load. ``None`` uses the model's
    own preference (``model.lowbit_compression``, set e.g. by the Deep Compression pipeline), else
    ``"none"``. An existing artifact directory is replaced as a whole; any other non-empty
    directory is refused with ``ArtifactError`` unless ``force=True``. Under a
    ``torch.distributed`` process group only rank 0 writes (every rank gets the manifest).
    ``stream=True`` writes the same bytes without holding the serialised tensor file in memory
    (it goes straight to disk and is hashed back from there): what onloading uses, where the
    file would otherwise double the memory the quantized model takes. Plain artifacts only.
    """
    require_module(model, "save")
    if compression is None:
        compression = getattr(model, "lowbit_compression", "none")
    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r}; choose one of {', '.join(COMPRESSIONS)}")
    tensors, aliases = _dedupe(model.state_dict())
    manifest = manifest_of(model, tensors, aliases)
    if compression == "lzma":
        manifest, files = coded_files(model, tensors, manifest, metrics or {})
        _write_atomically(Path(directory), _sealed(files), force)
        return manifest
    if stream:
        if compression != "none":
            raise ValueError(
                f"stream=True writes plain artifacts; compression={compression!r} codes in memory"
            )
        _save_streamed(Path(directory), tensors, manifest, metrics or {}, force)
        return manifest
    # One metadata key: safetensors writes its metadata map in hash order, so two keys could be
    # written in either order and the same model would not always give the same bytes.
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
    _write_atomically(Path(directory), _sealed(files), force)
    return manifest


def _sealed(files: dict[str, bytes]) -> dict[str, bytes]:
    """``files`` plus ``lowbit.sha256`` covering them all."""
    return {**files, SEAL_FILE: seal_text(files).encode()}


# --- loading ---------------------------------------------------------------------------------------


def _rebuild_layer(model: nn.Module, name: str, entry: dict[str, Any]) -> None:
    """Swap the float layer ``name`` for an empty quantized one shaped as ``entry`` (checked by
    ``check_layers`` first, so every allocation here is the size of the model's own layer)."""
    module = model.get_submodule(name)
    qmodule = QUANTIZED_CLASSES[entry["kind"]].from_manifest(module, entry)
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
        if act.get("scale") is not None and qmodule.input_quant is not None:
            zp = torch.tensor(act["zero_point"]) if act.get("zero_point") is not None else None
            qmodule.input_quant.set_qparams(torch.tensor(act["scale"]), zp)
    if entry.get("input_smooth"):
        width = (
            entry["config"].get("in_features")
            or entry["config"].get("in_channels")
            or entry["config"].get("input_size")
        )
        qmodule.set_input_smooth(torch.ones(int(width)))
    if entry.get("input_rotation"):
        _empty_rotation(qmodule, name, entry)
    set_submodule(model, name, qmodule)


def _empty_rotation(qmodule: nn.Module, name: str, entry: dict[str, Any]) -> None:
    """Shapes of the layer's input rotation, checked against its width before allocating."""
    from lowbit.algorithms.rotation import HadamardRotation

    size, odd = entry["input_rotation"]
    width = entry["config"].get("in_features") or entry["config"].get("nx")
    if size != width:
        raise ArtifactError(f"layer {name!r}: input rotation of width {size} for a layer of width {width}")
    try:
        qmodule.set_input_rotation(HadamardRotation.empty(size, odd))
    except ValueError as err:
        raise ArtifactError(f"layer {name!r}: {err}") from None


def _check_rotations(model: nn.Module, directory: Any) -> None:
    """The loaded rotations are rotations (signs +-1, an orthogonal odd factor), or refuse."""
    for name, module in model.named_modules():
        rotation = getattr(module, "input_rotation", None)
        if isinstance(module, QuantizedModule) and rotation is not None:
            try:
                rotation.check(f"layer {name!r}")
            except ValueError as err:
                raise ArtifactError(f"{directory}: {err}") from None


def _fold_like(model: nn.Module, manifest: dict[str, Any], directory: Any) -> None:
    """Drop the BatchNorms the artifact folded into its convs (their effect is in the stored
    weights and biases); the skeleton must have a BatchNorm (or an Identity) at each name."""
    for bn_name, conv_name in manifest.get("folded_batchnorm", {}).items():
        try:
            module = model.get_submodule(bn_name)
        except AttributeError:
            module = None
        if not isinstance(module, nn.modules.batchnorm._BatchNorm | nn.Identity):
            raise ArtifactError(
                f"{directory}: the artifact folded BatchNorm {bn_name!r} into a conv, but the model has "
                f"{type(module).__name__ if module is not None else 'nothing'} there: pass the same "
                "architecture it was made from"
            )
        set_submodule(model, bn_name, nn.Identity())
        try:
            layer = model.get_submodule(conv_name)
        except AttributeError:
            continue  # check_state names what is missing
        # A folded layer left float (excluded from the recipe) gained a bias; quantized layers
        # take theirs from the manifest.
        if conv_name not in manifest["layers"] and getattr(layer, "bias", 0) is None:
            w = layer.weight
            layer.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))


def load(
    directory: str | Path,
    model: nn.Module,
    *,
    allow_unsealed: bool = False,
    verify_seal: SealCheck | None = None,
    kernels: str = "auto",
) -> nn.Module:
    """Rebuild the quantized model from an artifact, using ``model`` (the float architecture,
    weights irrelevant) as the skeleton. ``model`` is modified in place and returned.

    Everything is verified before it is used (``lowbit.export.verify``): the seal, the manifest
    against its schema, every layer's shapes against ``model`` before allocating, then the tensor
    file's digest and every tensor. ``verify_seal(path)`` (optional) is called with the path of
    ``lowbit.sha256`` first, e.g. to check your own signature of it; raise to refuse.
    ``allow_unsealed=True`` reads artifacts of lowbit 0.1, which have no seal.

    Raises ``ArtifactError`` (a ``ValueError``) naming the file, tensor or layer at fault when the
    artifact is corrupt, truncated, tampered with, or made from a different architecture.

    ``kernels`` picks what runs each layer on this machine, as for ``lowbit.quantize``
    (``lowbit.backends.use_kernels``: ``"auto"``, ``"reference"`` or a backend name).
    """
    require_module(model, "load")
    manifest = read_manifest(directory, allow_unsealed=allow_unsealed, verify_seal=verify_seal)
    recipe = manifest_recipe(manifest)
    params = list(model.parameters()) + list(model.buffers())
    if any(p.is_meta for p in params):
        raise ArtifactError(
            f"the model given to load {directory} has tensors on the meta device; build it on the CPU "
            "(or the device to load to): its layers are filled in place"
        )
    check_layers(model, manifest)
    _fold_like(model, manifest, directory)
    for name, entry in manifest["layers"].items():
        _rebuild_layer(model, name, entry)
    check_state(model, manifest)  # before the tensor file is read: nothing larger than the model
    tensors = read_tensors(directory, manifest, max_decoded_bytes=1 << 62)
    device = next((t.device for t in model.state_dict().values()), torch.device("cpu"))
    model.load_state_dict({k: v.to(device) for k, v in tensors.items()}, strict=True)
    _check_rotations(model, directory)
    if recipe is not None:
        model.lowbit_recipe = recipe
    if manifest.get("folded_batchnorm"):
        model.lowbit_folded = dict(manifest["folded_batchnorm"])
    from lowbit.backends import use_kernels  # the backends import the layers this module builds

    use_kernels(model, kernels)
    return model.eval()


# The file names, the version and the error type live in compact.py (the codec raises and writes
# them too); they are part of this module's interface as well.
__all__ = [
    "ARTIFACT_VERSION",
    "CODED_VERSION",
    "COMPRESSIONS",
    "MANIFEST_FILE",
    "READABLE_VERSIONS",
    "SEAL_FILE",
    "WEIGHTS_FILE",
    "ArtifactError",
    "load",
    "manifest_of",
    "read_manifest",
    "read_tensors",
    "save",
]
