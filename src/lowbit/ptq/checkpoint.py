"""A Hugging Face checkpoint directory read one tensor at a time, every file checked before use.

A checkpoint is ``config.json`` plus the weights: one ``model.safetensors``, or shards listed in
``model.safetensors.index.json`` (``weight_map``: tensor name -> shard file). Opening it reads
only headers: each shard's safetensors header is parsed (``safetensors.safe_open``), which also
checks that the file covers every byte the header promises, so a missing shard, a truncated one
or a tensor the index names but no shard holds is a ``CheckpointError`` naming the file before
any tensor is read. ``tensor(name)`` then reads one tensor (memory-mapped by safetensors: the
file's pages, read on first touch, go with the tensor).

>>> import tempfile, torch
>>> from safetensors.torch import save_file
>>> d = Path(tempfile.mkdtemp())
>>> save_file({"w": torch.ones(2, 3)}, str(d / "model.safetensors"))
>>> _ = (d / "config.json").write_text("{}")
>>> ckpt = Checkpoint(d)
>>> ckpt.shape("w"), ckpt.nbytes("w"), float(ckpt.tensor("w").sum())
((2, 3), 24, 6.0)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from lowbit.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors dtype names (header "dtype") -> torch dtypes.
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read the {what} ({err.strerror or err})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: the {what} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: the {what} must be a JSON object, got {type(data).__name__}")
    return data


class Checkpoint:
    """The tensors of a Hugging Face checkpoint directory, by name (see the module docstring)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser()
        if not self.directory.is_dir():
            raise CheckpointError(
                f"{self.directory} is not a directory; give a Hugging Face checkpoint directory"
            )
        if not (self.directory / "config.json").is_file():
            raise CheckpointError(
                f"{self.directory} has no config.json; expected a Hugging Face checkpoint directory "
                "(the output of save_pretrained)"
            )
        self.config = _read_json(self.directory / "config.json", "model config")
        self.files = self._shard_map()
        self.headers: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for file in sorted(set(self.files.values())):
            self._check_shard(file)
        for name, file in self.files.items():
            if name not in self.headers:
                raise CheckpointError(
                    f"{self.directory / INDEX_FILE} maps tensor {name!r} to {file}, which does not hold it"
                )

    def _shard_map(self) -> dict[str, str]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            weight_map = _read_json(index, "shard index").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: expected a 'weight_map' of tensor name -> shard file")
            for file in weight_map.values():
                if Path(file).name != file:  # a shard outside the directory is never read
                    raise CheckpointError(f"{index}: shard file {file!r} must be a plain file name")
            return dict(weight_map)
        single = self.directory / SINGLE_FILE
        if not single.is_file():
            raise CheckpointError(
                f"{self.directory} has neither {SINGLE_FILE} nor {INDEX_FILE}; onloading reads safetensors "
                "checkpoints (save_pretrained(..., safe_serialization=True))"
            )
        with self._open(SINGLE_FILE) as f:
            return {name: SINGLE_FILE for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)

    def _open(self, file: str) -> Any:
        path = self.directory / file
        if not path.is_file():
            raise CheckpointError(
                f"shard {path} is missing: {INDEX_FILE} names it, but the file is not there "
                "(an interrupted download or copy?)"
            )
        try:
            return safe_open(str(path), framework="pt")
        except SafetensorError as err:
            raise CheckpointError(
                f"shard {path} is truncated or corrupt ({path.stat().st_size:,} bytes; safetensors: {err}); "
                "download or copy it again"
            ) from None

    def _check_shard(self, file: str) -> None:
        with self._open(file) as f:
            for name in f.keys():  # noqa: SIM118
                if self.files.get(name) != file:
                    continue  # a tensor the index does not route here is never read from here
                sliced = f.get_slice(name)
                dtype = _DTYPES.get(sliced.get_dtype())
                if dtype is None:
                    raise CheckpointError(
                        f"shard {self.directory / file}: tensor {name!r} has dtype {sliced.get_dtype()}, "
                        f"which lowbit does not read (one of {', '.join(_DTYPES)})"
                    )
                self.headers[name] = (dtype, tuple(sliced.get_shape()))

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def names(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.headers[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.headers[name][0]

    def nbytes(self, name: str) -> int:
        dtype, shape = self.headers[name]
        return math.prod(shape) * dtype.itemsize

    def file_of(self, name: str) -> Path:
        return self.directory / self.files[name]

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, read now (the shard is opened again: it may have changed since the check)."""
        if name not in self.files:
            raise CheckpointError(f"{self.directory}: no tensor {name!r} in the checkpoint")
        with self._open(self.files[name]) as f:
            try:
                return f.get_tensor(name)
            except SafetensorError as err:
                raise CheckpointError(
                    f"shard {self.file_of(name)}: cannot read tensor {name!r} ({err})"
                ) from None


__all__ = ["INDEX_FILE", "SINGLE_FILE", "Checkpoint", "CheckpointError"]
