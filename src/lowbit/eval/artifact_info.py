"""What an artifact stores, verified: ``lowbit inspect DIR``.

Reads the artifact as ``lowbit.load`` does (``lowbit.export.verify``: the seal over every file, the
strict manifest schema and its consistency, the tensor file's size and sha256, every tensor's shape
and dtype), then recomputes per layer and in total the stored bytes from the tensors actually in the
file and the parameter count from the manifest's shapes. The reported bits/param is ``stored bytes
* 8 / parameters`` of what is really in the file, and it is compared with the figure the manifest
claims. ``checks`` says what was verified, ``not_checked`` what was not (authenticity, unless a
``verify_seal`` was given; the fit to a model, which only ``lowbit.load`` with the model can check;
files in the directory that the seal does not cover).

>>> import tempfile, torch, lowbit
>>> d = tempfile.mkdtemp() + "/a"
>>> _ = lowbit.save(lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(64, 64)), "int8-weight-only"), d)
>>> info = inspect_artifact(d)
>>> info.layers[0].format, round(info.bits_per_param, 2), info.verified
('int8', 8.86, True)
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lowbit.export.artifact import SEAL_FILE, read_manifest, read_tensors
from lowbit.export.verify import SealCheck

TOLERANCE = 0.01  # relative difference allowed between the manifest's bits/param and the recount


@dataclass
class LayerInfo:
    """One quantized layer (or the float leftovers) as stored."""

    name: str
    kind: str
    format: str
    granularity: str
    parameters: int
    stored_bytes: int
    activation: str

    @property
    def bits_per_param(self) -> float:
        return self.stored_bytes * 8 / max(self.parameters, 1)


@dataclass
class ArtifactInfo:
    """The inspection result; ``verified`` is True when every check passed (see ``problems``)."""

    path: str
    recipe: str | None
    file_name: str
    file_bytes: int  # the tensor file on disk (safetensors header included)
    manifest_bytes: int
    parameters: int
    stored_bytes: int  # tensor bytes recounted from the file
    manifest_bits_per_param: float | None
    formats: dict[str, int] = field(default_factory=dict)  # format -> parameters stored in it
    layers: list[LayerInfo] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)  # what was verified
    not_checked: list[str] = field(default_factory=list)  # what was not, and why

    @property
    def bits_per_param(self) -> float:
        return self.stored_bytes * 8 / max(self.parameters, 1)

    @property
    def verified(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bits_per_param"] = self.bits_per_param
        d["verified"] = self.verified
        for row, layer in zip(d["layers"], self.layers, strict=True):
            row["bits_per_param"] = layer.bits_per_param
        return d


def _activation_text(act: dict[str, Any] | None) -> str:
    if not act:
        return "float"
    return f"{act.get('format')} {act.get('mode')} per {act.get('granularity')}"


def _manifest_bytes(path: Path) -> int:
    # Compressed artifacts keep the manifest as lowbit.json.xz.
    for name in ("lowbit.json", "lowbit.json.xz"):
        if (path / name).is_file():
            return os.path.getsize(path / name)
    return 0


def inspect_artifact(
    directory: str | Path, *, allow_unsealed: bool = False, verify_seal: SealCheck | None = None
) -> ArtifactInfo:
    """Inspect and verify the artifact in ``directory``; raises ``ArtifactError`` if it is unreadable,
    corrupt or edited (see ``lowbit.export.verify``); ``problems`` lists figures that do not add up."""
    manifest = read_manifest(directory, allow_unsealed=allow_unsealed, verify_seal=verify_seal)
    tensors = read_tensors(directory, manifest)  # checks size, sha256, shapes and dtypes
    entries = manifest["tensors"]
    actual = {k: t.numel() * t.element_size() for k, t in tensors.items() if k in entries}
    problems = [
        f"tensor {k!r}: manifest says {e['bytes']} bytes, the file holds {actual[k]}"
        for k, e in entries.items()
        if actual.get(k) != e["bytes"]
    ]
    layers = []
    formats: dict[str, int] = {}
    for name, entry in manifest["layers"].items():
        weights = entry.get("weights", {})
        fmt = ",".join(sorted({w["format"] for w in weights.values()}))
        params = sum(math.prod(w["shape"]) for w in weights.values())
        # Biases and other float tensors of the layer count as its parameters too.
        params += sum(
            math.prod(e["shape"]) for e in entries.values() if e["layer"] == name and e["role"] == "float"
        )
        stored = sum(actual[k] for k, e in entries.items() if e["layer"] == name)
        gran = ",".join(sorted({w["granularity"] for w in weights.values()}))
        layers.append(
            LayerInfo(
                name,
                entry.get("kind", "?"),
                fmt,
                gran,
                params,
                stored,
                _activation_text(entry.get("activation")),
            )
        )
        for w in weights.values():
            formats[w["format"]] = formats.get(w["format"], 0) + math.prod(w["shape"])
    leftovers = [k for k, e in entries.items() if e["layer"] is None]
    if leftovers:
        params = sum(math.prod(entries[k]["shape"]) for k in leftovers)
        dtypes = ",".join(sorted({entries[k]["dtype"] for k in leftovers}))
        layers.append(
            LayerInfo("(kept float)", "float", dtypes, "-", params, sum(actual[k] for k in leftovers), "-")
        )
        formats[dtypes] = formats.get(dtypes, 0) + params
    stored = sum(actual.values())
    parameters = sum(layer.parameters for layer in layers)
    totals = manifest.get("totals", {})
    claimed = totals.get("bits_per_param")
    recount = stored * 8 / max(parameters, 1)
    if claimed is None:
        problems.append("the manifest has no totals.bits_per_param to verify against")
    elif abs(recount - claimed) > TOLERANCE * max(claimed, 1e-12):
        problems.append(f"bits/param: the file holds {recount:.4f}, the manifest claims {claimed:.4f}")
    if totals.get("parameters") not in (None, parameters):
        problems.append(f"parameters: recounted {parameters:,}, the manifest claims {totals['parameters']:,}")
    path = Path(directory)
    recipe = manifest.get("recipe") or {}
    return ArtifactInfo(
        path=str(path),
        recipe=recipe.get("name"),
        file_name=manifest["file"]["name"],
        file_bytes=os.path.getsize(path / manifest["file"]["name"]),
        manifest_bytes=_manifest_bytes(path),
        parameters=parameters,
        stored_bytes=stored,
        manifest_bits_per_param=claimed,
        formats=formats,
        layers=layers,
        problems=problems,
        provenance={
            k: manifest.get(k)
            for k in ("lowbit_version", "torch_version", "created", "model_class")
            if manifest.get(k) is not None
        },
        checks=_checks(path, manifest),
        not_checked=_not_checked(path, manifest, verify_seal is not None),
    )


def _checks(path: Path, manifest: dict[str, Any]) -> list[str]:
    file_name = manifest["file"]["name"]
    out = []
    if (path / SEAL_FILE).is_file():
        out.append(f"{SEAL_FILE} covers exactly the manifest and {file_name}, and both match it")
    out += [
        "the manifest against its strict schema (formats, shapes, types, no unknown keys) and itself "
        "(sizes, roles, quantized buffers, aliases)",
        f"{file_name}: size and sha256, and every tensor's shape, dtype and bytes",
        "the bits/param and parameter count, recounted from the file",
    ]
    return out


def _not_checked(path: Path, manifest: dict[str, Any], signature_checked: bool) -> list[str]:
    out = []
    if not (path / SEAL_FILE).is_file():
        out.append(
            f"version {manifest['lowbit_artifact']} artifact without {SEAL_FILE}: nothing covers the manifest"
        )
    elif not signature_checked:
        out.append(
            f"authenticity: anyone can write a matching {SEAL_FILE}; sign it and check the signature "
            "(verify_seal, docs/artifact.md) to know who made the artifact"
        )
    out.append("the fit to a model: lowbit.load checks every layer against the model you pass")
    covered = {manifest["file"]["name"], "lowbit.json", "lowbit.json.xz", SEAL_FILE}
    extra = sorted(p.name for p in path.iterdir() if p.name not in covered)
    if extra:
        out.append(f"files the seal does not cover (never read by lowbit): {', '.join(extra)}")
    return out
