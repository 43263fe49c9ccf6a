"""Read calibration / evaluation data from a file, safely (no pickle, no code execution).

Supported files (what ``lowbit quantize --calib`` and ``lowbit eval --data`` accept):

============================  ==============================================================
``.pt`` / ``.pth``            ``torch.load(weights_only=True)``: a tensor ``[N, ...]``, a dict of
                              tensors sharing the first dimension, or a list of batches
``.safetensors``              one tensor, or several named tensors sharing the first dimension
``.npy`` / ``.npz``           ``numpy.load(allow_pickle=False)``; float64 becomes float32
``.txt``                      one sentence per line, tokenised with the model's tokenizer
============================  ==============================================================

A single tensor is one input batch stream, split into batches of ``batch_size`` along the first
dimension. Several named tensors become dict batches (``model(**batch)``, e.g. ``input_ids`` and
``attention_mask``), except that a pair named ``inputs`` / ``labels`` (or ``x`` / ``y``) becomes
labelled ``(inputs, labels)`` batches for the accuracy metric.

>>> import tempfile, numpy as np
>>> path = tempfile.mkdtemp() + "/calib.npy"
>>> np.save(path, np.zeros((70, 1, 8, 8)))
>>> data = load_data(path, batch_size=32)
>>> [tuple(b.shape) for b in data.batches], data.labelled, data.batches[0].dtype
([(32, 1, 8, 8), (32, 1, 8, 8), (6, 1, 8, 8)], False, torch.float32)
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import DataError

SUFFIXES = (".pt", ".pth", ".safetensors", ".npy", ".npz", ".txt")
_LABEL_KEYS = (("inputs", "labels"), ("x", "y"))

# Calibration and evaluation sets are megabytes; a bound keeps a wrong path or a crafted file (an
# .npz whose 2 MB of zip members declare 12 GB of arrays) from filling memory. Checked against the
# file's size and every declared array size *before* anything is read; ``load_data(max_bytes=)``.
MAX_DATA_BYTES = 2 << 30


@dataclass
class DataFile:
    """Batches read from a file; ``labelled`` when they are ``(inputs, labels)`` pairs."""

    batches: list[Any]
    labelled: bool
    samples: int

    def inputs(self) -> list[Any]:
        """The input part of every batch (labels dropped)."""
        return [b[0] for b in self.batches] if self.labelled else list(self.batches)


def _float32(t: torch.Tensor) -> torch.Tensor:
    # Files written from numpy are often float64; models run in float32.
    return t.float() if t.is_floating_point() and t.dtype == torch.float64 else t


def _split(t: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [t[i : i + batch_size] for i in range(0, t.shape[0], batch_size)]


def _from_dict(tensors: dict[str, torch.Tensor], batch_size: int, path: Path) -> DataFile:
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise DataError(f"{path}: entry {key!r} is a {type(value).__name__}, expected a tensor")
    if not tensors:
        raise DataError(f"{path} holds no tensors")
    tensors = {k: _float32(v) for k, v in tensors.items()}
    if len(tensors) == 1:
        (only,) = tensors.values()
        return _from_tensor(only, batch_size, path)
    sizes = {k: (v.shape[0] if v.dim() else 0) for k, v in tensors.items()}
    if len(set(sizes.values())) != 1:
        raise DataError(f"{path}: tensors must share their first (sample) dimension, got {sizes}")
    n = next(iter(sizes.values()))
    if n == 0:
        raise DataError(f"{path} contains no samples")
    for inputs_key, labels_key in _LABEL_KEYS:
        if set(tensors) == {inputs_key, labels_key}:
            pairs = list(
                zip(
                    _split(tensors[inputs_key], batch_size),
                    _split(tensors[labels_key], batch_size),
                    strict=True,
                )
            )
            return DataFile(pairs, labelled=True, samples=n)
    batches = [{k: v[i : i + batch_size] for k, v in tensors.items()} for i in range(0, n, batch_size)]
    return DataFile(batches, labelled=False, samples=n)


def _from_tensor(t: torch.Tensor, batch_size: int, path: Path) -> DataFile:
    if t.dim() == 0 or t.shape[0] == 0:
        raise DataError(f"{path} contains no samples (tensor of shape {tuple(t.shape)})")
    return DataFile(_split(_float32(t), batch_size), labelled=False, samples=t.shape[0])


def _from_list(items: list[Any], path: Path) -> DataFile:
    if not items:
        raise DataError(f"{path} contains an empty list; expected batches")
    for i, item in enumerate(items):
        ok = isinstance(item, torch.Tensor) or (
            isinstance(item, (dict, tuple, list))
            and all(isinstance(v, torch.Tensor) for v in (item.values() if isinstance(item, dict) else item))
        )
        if not ok:
            raise DataError(f"{path}: batch {i} is a {type(item).__name__}; expected tensors")
    batches = [tuple(b) if isinstance(b, list) else b for b in items]
    samples = sum(_batch_len(b) for b in batches)
    return DataFile(batches, labelled=False, samples=samples)


def _batch_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 1
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return _batch_len(first)


def _read_text(path: Path, tokenizer: Any, batch_size: int, max_bytes: int) -> DataFile:
    if tokenizer is None:
        raise DataError(f"{path}: text data needs a model with a tokenizer (a text model such as minilm)")
    from lowbit.zoo.text import tokenize_batches

    lines = []
    with path.open("rb") as f:
        raw = f.read(max_bytes + 1)  # the size was checked; the file may have grown since
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError as err:
            raise DataError(
                f"data file {path}, line {number}: not UTF-8 text (byte 0x{line[err.start]:02x} at "
                f"column {err.start + 1}); save the file as UTF-8, one sentence per line"
            ) from None
        if text:
            lines.append(text)
    if not lines:
        raise DataError(f"{path} contains no sentences (one per line expected)")
    return DataFile(tokenize_batches(tokenizer, lines, batch_size), labelled=False, samples=len(lines))


# --- sizes declared inside a file, checked before anything is allocated ---------------------------


def _npy_header(stream: Any, where: str) -> tuple[tuple[int, ...], Any, int]:
    """``(shape, dtype, header bytes)`` of the .npy array in ``stream``, read without loading it."""
    from numpy.lib import format as npf

    try:
        version = npf.read_magic(stream)
        if version == (1, 0):
            shape, _fortran, dtype = npf.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, _fortran, dtype = npf.read_array_header_2_0(stream)
        else:
            raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported")
    except ValueError as err:
        raise DataError(f"{where} is not a readable .npy array ({err})") from None
    if dtype.hasobject:
        raise DataError(f"{where} holds Python objects (dtype {dtype}); only numeric arrays are read")
    return tuple(shape), dtype, stream.tell()


def _check_declared(where: str, shape: tuple[int, ...], dtype: Any, stored: int, max_bytes: int) -> int:
    """The array's byte size from its header; refuse sizes past the bound or beyond what is stored."""
    count = 1
    for n in shape:
        count *= int(n)
    declared = count * dtype.itemsize
    if declared > max_bytes:
        raise DataError(
            f"{where} declares a {dtype} array of shape {list(shape)} ({declared:,} bytes), more than "
            f"the {max_bytes:,}-byte bound on data files; use a smaller sample (or raise max_bytes)"
        )
    if declared != stored:
        raise DataError(
            f"{where} declares {declared:,} bytes of array data (shape {list(shape)}, {dtype}) but "
            f"holds {stored:,}; the file is truncated or corrupt"
        )
    return declared


def _check_npy(path: Path, max_bytes: int) -> None:
    with path.open("rb") as f:
        shape, dtype, offset = _npy_header(f, f"data file {path}")
    _check_declared(f"data file {path}", shape, dtype, path.stat().st_size - offset, max_bytes)


def _check_zip(path: Path, max_bytes: int, npz: bool) -> None:
    """Zip members' declared sizes (and, for .npz, each array header) against the bound."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            total = sum(m.file_size for m in members)
            if total > max_bytes:
                raise DataError(
                    f"data file {path}: its {len(members)} zip members expand to {total:,} bytes, more "
                    f"than the {max_bytes:,}-byte bound on data files (a {path.stat().st_size:,}-byte "
                    "file); use a smaller sample (or raise max_bytes)"
                )
            if not npz:
                return
            declared = 0
            for m in members:
                where = f"data file {path}, array {m.filename!r}"
                if not m.filename.endswith(".npy"):
                    raise DataError(f"{where} is not a .npy array; an .npz holds only arrays")
                with archive.open(m) as f:
                    shape, dtype, offset = _npy_header(f, where)
                declared += _check_declared(where, shape, dtype, m.file_size - offset, max_bytes)
                if declared > max_bytes:
                    raise DataError(
                        f"data file {path}: its arrays declare {declared:,} bytes in all, more than the "
                        f"{max_bytes:,}-byte bound on data files; use a smaller sample (or raise max_bytes)"
                    )
    except zipfile.BadZipFile as err:
        if npz:
            raise DataError(f"cannot read data file {path}: not an .npz (zip) archive ({err})") from None


def _reader_failure(path: Path, suffix: str, err: Exception) -> DataError:
    """A one-sentence ``DataError`` for a file a reader refused (no library internals in the text)."""
    text = str(err)
    if "pickle" in text.lower() or "Unsupported global" in text or "WeightsUnpickler" in text:
        why = "it holds pickled Python objects, which are refused for safety (no code is run)"
    elif suffix in (".pt", ".pth"):
        why = "it is not a tensor file written by torch.save"
    elif suffix == ".safetensors":
        detail = (text.strip().splitlines() or ["unreadable"])[0][:200]
        why = f"it is not a safetensors file ({detail})"
    else:
        detail = (text.strip().splitlines() or ["unreadable"])[0][:200]
        why = f"numpy cannot read it ({detail})"
    return DataError(
        f"cannot read data file {path} as {suffix}: {why}; save tensors with torch.save, "
        "safetensors.torch.save_file or numpy.save"
    )


def load_data(
    path: str | Path, batch_size: int = 32, tokenizer: Any = None, max_bytes: int = MAX_DATA_BYTES
) -> DataFile:
    """Read batches from ``path`` (see the module docstring).

    Every problem raises ``lowbit.errors.DataError`` (a ``ValueError``) naming the file, and the line
    for text files. Sizes are checked before anything is read: the file's own size, and for .npy /
    .npz / zip-based .pt files every size declared inside it, against ``max_bytes``.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if not path.is_file():
        raise DataError(f"data file {path} is not a file")
    if batch_size < 1:
        raise DataError(f"batch size must be >= 1, got {batch_size}")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"data file {path}: unsupported type {suffix or '(none)'}; use {', '.join(SUFFIXES)}")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"data file {path} is empty (0 bytes)")
    if size > max_bytes:
        raise DataError(
            f"data file {path} is {size:,} bytes, more than the {max_bytes:,}-byte bound on data files; "
            "use a smaller sample (or raise max_bytes)"
        )
    if suffix == ".txt":
        return _read_text(path, tokenizer, batch_size, max_bytes)
    if suffix == ".npy":
        _check_npy(path, max_bytes)
    elif suffix == ".npz" or zipfile.is_zipfile(path):
        _check_zip(path, max_bytes, npz=suffix == ".npz")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return _from_dict(load_file(str(path)), batch_size, path)
        if suffix in (".npy", ".npz"):
            import numpy as np

            loaded = np.load(path, allow_pickle=False)
            if isinstance(loaded, np.ndarray):
                return _from_tensor(torch.from_numpy(loaded), batch_size, path)
            with loaded:
                return _from_dict({k: torch.from_numpy(loaded[k]) for k in loaded.files}, batch_size, path)
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except DataError:
        raise
    except Exception as err:  # each reader has its own error types; all mean "cannot read this file"
        raise _reader_failure(path, suffix, err) from None
    if isinstance(obj, torch.Tensor):
        return _from_tensor(obj, batch_size, path)
    if isinstance(obj, dict):
        return _from_dict(obj, batch_size, path)
    if isinstance(obj, (list, tuple)):
        return _from_list(list(obj), path)
    raise DataError(f"{path} holds a {type(obj).__name__}; expected a tensor, a dict of tensors or a list")
