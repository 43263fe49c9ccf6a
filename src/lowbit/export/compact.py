"""The coded artifact (format version 4; 2 before sealing), written by ``save(..., compression="lzma")``.

A coded artifact trades the plain artifact's memory-mappable tensor file and readable manifest for
size on disk, for models whose codes have little entropy (pruned or clustered weights):

- ``model.safetensors.xz``: an LZMA-coded safetensors file holding one uint8 tensor, the byte
  streams of every state tensor. Sparse code tensors (mostly one code, e.g. pruned weights) are
  stored as run lengths of that code plus the other codes; wider tensors (floats) as byte planes,
  most significant first, with all-zero low planes left out (bfloat16-exact float32 costs 2 bytes).
- ``lowbit.json.xz``: the manifest without what can be derived again (default values, per-tensor
  roles and sizes, totals), as compact JSON, LZMA-coded. ``expand_manifest`` restores the full form,
  so readers see the same fields as in a plain artifact; ``coded_files`` checks that before writing.

This module holds the codec and what it shares with ``lowbit.export.artifact`` (file names, the
error type, tensor roles), so that it imports nothing from there; ``artifact`` does the file I/O
and the checks, and re-exports these names.
"""

from __future__ import annotations

import copy
import hashlib
import json
import lzma
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from lowbit import granularity as gran
from lowbit import packing
from lowbit.errors import ArtifactError
from lowbit.nn.base import QuantizedModule
from lowbit.nn.layers import QUANTIZED_CLASSES

# --- shared with artifact.py -----------------------------------------------------------------------

# A coded artifact's "lowbit_artifact": compact manifest + coded tensor streams. Version 4 is version
# 2 sealed (a ``lowbit.sha256`` covers both files) and without the ``created`` timestamp; the coding
# and the frozen defaults below are the same for both.
CODED_VERSION = 4
LEGACY_CODED_VERSION = 2
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "lowbit.json"
# Optional entropy coding (Deep Compression's last stage). LZMA is in the standard library, so every
# reader can decode it; "none" keeps the file memory-mappable.
COMPRESSIONS = {"none": WEIGHTS_FILE, "lzma": WEIGHTS_FILE + ".xz"}


# Here rather than in artifact.py because expanding a compact manifest derives every tensor's role
# again (a coded manifest leaves them out); artifact.py uses it to write them in the first place.
def tensor_role(key: str, quantized: dict[str, QuantizedModule]) -> tuple[str, str | None]:
    """A state_dict entry's role (``packed``, ``scale``, ``activation_scale``, ``float``...) and layer."""
    for name, _ in sorted(quantized.items(), key=lambda kv: -len(kv[0])):
        prefix = f"{name}." if name else ""
        if key.startswith(prefix):
            leaf = key[len(prefix) :]
            last = leaf.rsplit(".", 1)[-1]
            if leaf.startswith("input_quant."):
                return f"activation_{last}", name
            if leaf.startswith("input_rotation."):
                return "input_rotation", name
            if last in ("packed", "scale", "tensor_scale", "zero_point", "codebook", "input_smooth"):
                return last, name
            return "float", name
    return "float", None


# --- the format ------------------------------------------------------------------------------------
#
# Every state tensor becomes bytes in one or more *streams*; the payload is the streams one after
# the other in ``STREAM_ORDER`` (within a stream, in tensor order), so similar bytes sit together
# for the entropy coder. The manifest's tensor table says, per tensor, how it was coded:
#   ["raw"]                                 its bytes, in stream "raw";
#   ["planes", kept]                        byte planes, most significant first, in streams
#                                           "plane0".."plane<kept-1>"; the other planes are zero
#                                           (an all-zero tensor keeps none);
#   ["runs", bits, zero, count, gap_bytes]  the ``bits``-wide fields of a packed code tensor: the
#                                           ``count`` fields that differ from ``zero`` in stream
#                                           "values" (one byte each), and the number of ``zero``
#                                           fields before each in stream "gaps" (one byte each;
#                                           255 means "255 more, continued in the next byte").

STREAMS_KEY = "lowbit.streams"  # the one tensor of a coded artifact's safetensors file
STREAM_ORDER = ("gaps", "values", "raw", *(f"plane{i}" for i in range(8)))
RUNS_MIN_ZERO_FRACTION = 0.5  # sparser than this, run lengths beat the packed codes
# Defaults that a version-2 manifest leaves out. Frozen with the format: never edit them (a new
# default needs a new format version), or older artifacts would read back differently.
RECIPE_DEFAULTS_V2: dict[str, Any] = {
    "name": "custom",
    "description": "",
    "weight": {"format": "int8", "granularity": "channel", "symmetric": True, "algorithm": "rtn"},
    "activation": {
        "mode": "none", "format": "uint8", "granularity": "tensor", "symmetric": False, "observer": "minmax",
    },
    "modules": ["linear", "conv", "embedding", "rnn"],
    "include": ["*"],
    "exclude": [],
    "overrides": [],
    "smoothquant_alpha": None,
    "smoothquant_exclude": [],
    "bias_correction": False,
    "version": 1,
}  # fmt: skip
LAYER_DEFAULTS_V2: dict[str, Any] = {"activation": None, "input_smooth": False, "backend": "reference"}
WEIGHT_DEFAULTS_V2: dict[str, Any] = {
    "symmetric": True, "algorithm": "rtn", "has_zero_point": False, "info": {},
}  # fmt: skip
MANIFEST_DEFAULTS_V2: dict[str, Any] = {"recipe": None, "aliases": {}, "metrics": {}}


# --- tensor coding ---------------------------------------------------------------------------------


def _lzma(data: bytes) -> bytes:
    """LZMA in the small ``.lzma`` container (13 header bytes; ``lzma.decompress`` detects it).

    No literal context (``lc=0``) and no position bits: the byte streams and the manifest both
    came out smallest so. The dictionary is sized to the data, so decoding a small artifact never
    allocates the preset's 64 MiB.
    """
    dict_size = min(max(1 << 12, 1 << max(len(data) - 1, 1).bit_length()), 1 << 26)
    options = {"id": lzma.FILTER_LZMA1, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": dict_size}
    return lzma.compress(data, format=lzma.FORMAT_ALONE, filters=[{**options, "lc": 0, "lp": 0, "pb": 0}])


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _encode_runs(raw: torch.Tensor, bits: int) -> tuple[list[Any], torch.Tensor, torch.Tensor] | None:
    """``(coding, gaps, values)`` for a packed code tensor, or ``None`` if it is not sparse enough."""
    if not 1 <= bits <= 8 or raw.numel() == 0:
        return None
    count = raw.numel() * 8 // bits
    if packing.packed_nbytes(count, bits) != raw.numel():
        return None
    fields = packing.unpack(raw, bits, count).long()
    zero = int(torch.bincount(fields, minlength=1 << bits).argmax())
    where = (fields != zero).nonzero().flatten()
    if where.numel() > (1.0 - RUNS_MIN_ZERO_FRACTION) * count:
        return None
    gaps = torch.diff(where, prepend=torch.tensor([-1])) - 1
    lengths = gaps // 255 + 1  # bytes per gap: the escapes, then the remainder
    out = torch.full((int(lengths.sum()),), 255, dtype=torch.uint8)
    out[torch.cumsum(lengths, 0) - 1] = (gaps % 255).to(torch.uint8)
    values = fields[where].to(torch.uint8)
    return ["runs", bits, zero, int(where.numel()), int(out.numel())], out, values


def _decode_runs(coding: list[Any], numel: int, gaps: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    bits, zero, count = int(coding[1]), int(coding[2]), int(coding[3])
    fields_count = numel * 8 // bits
    ends = (gaps != 255).nonzero().flatten()
    if ends.numel() != count or (gaps.numel() and gaps[-1] == 255):
        raise ArtifactError(f"run-length stream holds {ends.numel()} runs, the manifest says {count}")
    escapes = torch.cumsum((gaps == 255).long(), 0)[ends] if count else ends
    escapes = torch.diff(escapes, prepend=torch.zeros(1, dtype=torch.long))
    where = torch.cumsum(escapes * 255 + gaps[ends].long() + 1, 0) - 1
    if count and int(where[-1]) >= fields_count:
        raise ArtifactError("run-length stream points past the end of its tensor")
    if values.numel() and int(values.max()) >= 1 << bits:
        raise ArtifactError(f"run-length stream holds a code above the {bits}-bit range")
    fields = torch.full((fields_count,), zero, dtype=torch.uint8)
    fields[where] = values
    return packing.pack(fields, bits) if bits < 8 else fields


def _encode(t: torch.Tensor, bits: int | None) -> tuple[list[Any], dict[str, torch.Tensor]]:
    """One tensor's coding and its bytes per stream."""
    raw = _as_bytes(t)
    width = t.element_size()
    if width > 1:
        planes = raw.reshape(-1, width).flip(1).t()  # little-endian: the last byte is the top one
        kept = width
        while kept > 0 and not bool(planes[kept - 1].any()):
            kept -= 1
        return ["planes", kept], {f"plane{i}": planes[i].contiguous() for i in range(kept)}
    if bits is not None:
        runs = _encode_runs(raw, bits)
        if runs is not None:
            coding, gaps, values = runs
            return coding, {"gaps": gaps, "values": values}
    return ["raw"], {"raw": raw}


def stream_sizes(entry: dict[str, Any]) -> dict[str, int]:
    """Bytes that one tensor's coding (checked by ``_tensor_entry``) takes from each stream."""
    coding = entry["coding"]
    if coding[0] == "planes":
        return {f"plane{i}": math.prod(entry["shape"]) for i in range(coding[1])}
    if coding[0] == "runs":
        return {"gaps": coding[4], "values": coding[3]}
    return {"raw": entry["bytes"]}


def _decode(entry: dict[str, Any], key: str, take: Any) -> torch.Tensor:
    """Rebuild tensor ``key`` from its manifest entry; ``take(stream, n)`` returns the next n bytes."""
    coding, shape, dtype = entry["coding"], tuple(entry["shape"]), getattr(torch, entry["dtype"])
    numel, width = math.prod(shape), torch.empty(0, dtype=dtype).element_size()
    if coding[0] == "planes":
        planes = torch.zeros(width, numel, dtype=torch.uint8)
        for i in range(coding[1]):
            planes[i] = take(f"plane{i}", numel)
        raw = planes.t().flip(1).reshape(-1)
    elif coding[0] == "runs":
        gaps = take("gaps", coding[4])
        raw = _decode_runs(coding, numel, gaps, take("values", coding[3]))
        if raw.numel() != numel:
            raise ArtifactError(f"tensor {key!r}: its run lengths decode to {raw.numel()} bytes, not {numel}")
    else:
        raw = take("raw", numel * width)
    # A copy first: a raw slice of the stream may start at an offset the dtype's width does not divide.
    return raw.clone().view(dtype).reshape(shape)


# --- manifest compaction ---------------------------------------------------------------------------


def _without_defaults(entry: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k not in defaults or defaults[k] != v}


def _weight_derived(layer: str, wname: str, spec: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """What a weight entry's ``block``, ``stored_bytes`` and ``bits_per_param`` are by default."""
    out = dict(WEIGHT_DEFAULTS_V2)
    shape = tuple(spec["shape"])
    out["block"] = list(gran.block_shape(gran.parse(spec["granularity"]), shape))
    prefix = f"{layer}.{wname}." if layer else f"{wname}."
    depth = prefix.count(".")
    stored = sum(e["bytes"] for k, e in tensors.items() if k.startswith(prefix) and k.count(".") == depth)
    out["stored_bytes"] = stored
    out["bits_per_param"] = round(stored * 8 / max(math.prod(shape), 1), 4)
    return out


def _layer_derived(entry: dict[str, Any]) -> dict[str, Any]:
    cls = QUANTIZED_CLASSES.get(str(entry.get("kind")))
    return {**LAYER_DEFAULTS_V2, **({"class": cls.__name__} if cls else {})}


def _totals(layers: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    stored = sum(e["bytes"] for e in tensors.values())
    params = sum(math.prod(w["shape"]) for e in layers.values() for w in e["weights"].values())
    params += sum(math.prod(e["shape"]) for e in tensors.values() if e["role"] == "float")
    bits = round(stored * 8 / max(params, 1), 4)
    return {"parameters": params, "stored_bytes": stored, "bits_per_param": bits}


def _tensor_entry(key: str, row: Any, layers: Any) -> dict[str, Any]:
    """A full tensor entry from a version-2 row ``[dtype, shape, *coding]``, checked."""
    bad = ArtifactError(f"tensor {key!r}: malformed manifest row {row!r}; the manifest is corrupt")
    if not (isinstance(row, list) and len(row) >= 3 and isinstance(row[0], str) and isinstance(row[1], list)):
        raise bad
    dtype, shape, coding = getattr(torch, row[0], None), row[1], row[2:]
    if not isinstance(dtype, torch.dtype) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise bad
    width = torch.empty(0, dtype=dtype).element_size()
    ints = all(isinstance(c, int) and c >= 0 for c in coding[1:])
    fits = {
        # As ``_encode`` writes them: one-byte tensors raw or as runs, wider ones as byte planes.
        "raw": len(coding) == 1 and width == 1,
        "planes": len(coding) == 2 and ints and coding[1] <= width and width > 1,
        "runs": len(coding) == 5
        and ints
        and width == 1
        and 1 <= coding[1] <= 8
        and coding[2] >> coding[1] == 0,
    }
    if not fits.get(coding[0], False):
        raise bad
    role, layer = tensor_role(key, layers)
    return {"shape": shape, "dtype": row[0], "bytes": math.prod(shape) * width, "role": role, "layer": layer,
            "coding": coding}  # fmt: skip


def compact_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """The version-2 form of a full manifest: derivable fields left out (``expand_manifest`` undoes it).

    >>> import tempfile, torch, lowbit
    >>> from lowbit.export.artifact import save
    >>> q = lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(64, 8)), "int4-weight-only")
    >>> full = save(q, tempfile.mkdtemp() + "/art", compression="lzma")
    >>> full["tensors"]["0.qweight.scale"]
    {'shape': [8, 1], 'dtype': 'float32', 'bytes': 32, 'role': 'scale', 'layer': '0', 'coding': ['planes', 4]}
    >>> compact = compact_manifest(full)
    >>> compact["tensors"]["0.qweight.scale"]  # dtype, shape and coding; the rest follows from them
    ['float32', [8, 1], 'planes', 4]
    >>> expand_manifest(compact) == full
    True
    """
    tensors = manifest["tensors"]
    out = _without_defaults(manifest, MANIFEST_DEFAULTS_V2)
    recipe = manifest.get("recipe")
    if isinstance(recipe, dict):
        out["recipe"] = {
            k: _without_defaults(v, RECIPE_DEFAULTS_V2[k]) if k in ("weight", "activation") and v else v
            for k, v in _without_defaults(recipe, RECIPE_DEFAULTS_V2).items()
        }
    layers = {}
    for name, entry in manifest["layers"].items():
        compact = _without_defaults(entry, _layer_derived(entry))
        compact["weights"] = {
            w: _without_defaults(spec, _weight_derived(name, w, spec, tensors))
            for w, spec in entry["weights"].items()
        }
        layers[name] = compact
    out["layers"] = layers
    out["tensors"] = {k: [e["dtype"], e["shape"], *e["coding"]] for k, e in tensors.items()}
    if out.get("totals") == _totals(manifest["layers"], tensors):
        del out["totals"]
    out["file"] = _without_defaults(manifest["file"], {"name": COMPRESSIONS["lzma"]})
    return out


def expand_manifest(compact: dict[str, Any]) -> dict[str, Any]:
    """The full manifest (the fields a plain artifact has) from a version-2 one."""
    out = {**MANIFEST_DEFAULTS_V2, **compact}
    recipe = compact.get("recipe")
    if isinstance(recipe, dict):
        full = {**RECIPE_DEFAULTS_V2, **recipe}
        for k in ("weight", "activation"):
            if isinstance(full[k], dict):
                full[k] = {**RECIPE_DEFAULTS_V2[k], **full[k]}
        out["recipe"] = full
    names = dict.fromkeys(compact["layers"])
    tensors = {key: _tensor_entry(key, row, names) for key, row in compact["tensors"].items()}
    out["tensors"] = tensors
    layers = {}
    for name, entry in compact["layers"].items():
        full = {**_layer_derived(entry), **entry}
        full["weights"] = {
            w: {**_weight_derived(name, w, spec, tensors), **spec}
            for w, spec in entry.get("weights", {}).items()
        }
        layers[name] = full
    out["layers"] = layers
    out.setdefault("totals", _totals(layers, tensors))
    out["file"] = {"name": COMPRESSIONS.get(compact["file"].get("compression", "")), **compact["file"]}
    return copy.deepcopy(out)  # never share the default lists and dicts with the caller


# --- the tensor file -------------------------------------------------------------------------------


def _packed_bits(model: nn.Module) -> dict[str, int]:
    """State key of every packed code tensor -> the width of its codes."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantizedModule):
            for wname, qw in m.quantized_weights().items():
                if qw.fmt.family != "float":
                    out[f"{name}.{wname}.packed" if name else f"{wname}.packed"] = qw.fmt.bits
    return out


def coded_files(
    model: nn.Module, tensors: dict[str, torch.Tensor], manifest: dict[str, Any], metrics: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The full manifest and the two files of a coded (version 2) artifact."""
    bits = _packed_bits(model)
    streams: dict[str, list[torch.Tensor]] = {name: [] for name in STREAM_ORDER}
    for key, t in tensors.items():
        coding, parts = _encode(t, bits.get(key))
        manifest["tensors"][key]["coding"] = coding
        for stream, data in parts.items():
            streams[stream].append(data)
    chunks = [c for name in STREAM_ORDER for c in streams[name]]
    payload = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.uint8)
    raw = save_safetensors_bytes({STREAMS_KEY: payload})
    data = _lzma(raw)
    manifest["lowbit_artifact"] = CODED_VERSION
    manifest["file"] = {
        "name": COMPRESSIONS["lzma"],
        "compression": "lzma",
        "bytes": len(data),
        "uncompressed_bytes": len(raw),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    manifest["metrics"] = metrics
    manifest = json.loads(json.dumps(manifest))  # the form it reads back in (lists, plain floats)
    compact = compact_manifest(manifest)
    if expand_manifest(json.loads(json.dumps(compact))) != manifest:  # a bug here must not lose data
        raise AssertionError("the compact manifest does not expand to the full one")
    text = json.dumps(compact, separators=(",", ":")).encode()
    return manifest, {COMPRESSIONS["lzma"]: data, MANIFEST_FILE + ".xz": _lzma(text)}


def decode_streams(
    path: Path, stored: dict[str, torch.Tensor], entries: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """The state tensors of a coded artifact from its one stream tensor (see ``STREAM_ORDER``)."""
    if set(stored) != {STREAMS_KEY} or stored[STREAMS_KEY].dtype != torch.uint8:
        raise ArtifactError(f"{path} should hold exactly one uint8 tensor {STREAMS_KEY!r}")
    payload = stored[STREAMS_KEY].reshape(-1)
    # Stream sizes first (tensor order within a stream), then each tensor's slice of each stream.
    sizes = dict.fromkeys(STREAM_ORDER, 0)
    for entry in entries.values():
        for stream, n in stream_sizes(entry).items():
            sizes[stream] += n
    if sum(sizes.values()) != payload.numel():
        raise ArtifactError(
            f"{path} holds {payload.numel()} stream bytes, the manifest's tensors need {sum(sizes.values())}"
        )
    cursor, start = {}, 0
    for stream in STREAM_ORDER:
        cursor[stream] = start
        start += sizes[stream]

    def take(stream: str, n: int) -> torch.Tensor:
        at = cursor[stream]
        cursor[stream] = at + n
        return payload[at : at + n]

    return {key: _decode(entry, key, take) for key, entry in entries.items()}
