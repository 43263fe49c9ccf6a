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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SUFFIXES = (".pt", ".pth", ".safetensors", ".npy", ".npz", ".txt")
_LABEL_KEYS = (("inputs", "labels"), ("x", "y"))


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
            raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, expected a tensor")
    if not tensors:
        raise ValueError(f"{path} holds no tensors")
    tensors = {k: _float32(v) for k, v in tensors.items()}
    if len(tensors) == 1:
        (only,) = tensors.values()
        return _from_tensor(only, batch_size, path)
    sizes = {k: (v.shape[0] if v.dim() else 0) for k, v in tensors.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{path}: tensors must share their first (sample) dimension, got {sizes}")
    n = next(iter(sizes.values()))
    if n == 0:
        raise ValueError(f"{path} contains no samples")
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
        raise ValueError(f"{path} contains no samples (tensor of shape {tuple(t.shape)})")
    return DataFile(_split(_float32(t), batch_size), labelled=False, samples=t.shape[0])


def _from_list(items: list[Any], path: Path) -> DataFile:
    if not items:
        raise ValueError(f"{path} contains an empty list; expected batches")
    for i, item in enumerate(items):
        ok = isinstance(item, torch.Tensor) or (
            isinstance(item, (dict, tuple, list))
            and all(isinstance(v, torch.Tensor) for v in (item.values() if isinstance(item, dict) else item))
        )
        if not ok:
            raise ValueError(f"{path}: batch {i} is a {type(item).__name__}; expected tensors")
    batches = [tuple(b) if isinstance(b, list) else b for b in items]
    samples = sum(_batch_len(b) for b in batches)
    return DataFile(batches, labelled=False, samples=samples)


def _batch_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 1
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return _batch_len(first)


def _read_text(path: Path, tokenizer: Any, batch_size: int) -> DataFile:
    if tokenizer is None:
        raise ValueError(f"{path}: text data needs a model with a tokenizer (a text model such as minilm)")
    from lowbit.zoo.text import tokenize_batches

    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path} contains no sentences (one per line expected)")
    return DataFile(tokenize_batches(tokenizer, lines, batch_size), labelled=False, samples=len(lines))


def load_data(path: str | Path, batch_size: int = 32, tokenizer: Any = None) -> DataFile:
    """Read batches from ``path`` (see the module docstring); raises ``ValueError`` with the reason."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"data file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"data file {path} is not a file")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(
            f"data file {path}: unsupported type {suffix or '(none)'}; use {', '.join(SUFFIXES)}"
        )
    try:
        if suffix == ".txt":
            return _read_text(path, tokenizer, batch_size)
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
    except ValueError:
        raise
    except Exception as err:  # each reader has its own error types; all mean "cannot read this file"
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"cannot read data file {path} as {suffix} ({type(err).__name__}: {reason}); it must hold "
            "tensors saved with torch.save / safetensors / numpy (pickled objects are refused)"
        ) from None
    if isinstance(obj, torch.Tensor):
        return _from_tensor(obj, batch_size, path)
    if isinstance(obj, dict):
        return _from_dict(obj, batch_size, path)
    if isinstance(obj, (list, tuple)):
        return _from_list(list(obj), path)
    raise ValueError(f"{path} holds a {type(obj).__name__}; expected a tensor, a dict of tensors or a list")
