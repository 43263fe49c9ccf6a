"""Cached stage activations, one tensor per calibration batch, spilled to disk past a budget.

The sequential pipeline holds two stages' worth of activations at a time (the inputs of the
stage being calibrated and the outputs it passes on). When they would exceed the memory budget,
further tensors go to safetensors files in a temporary directory (never pickle) and come back
when read; the directory is removed with the cache.

>>> import torch
>>> budget = MemoryBudget(limit_bytes=64)
>>> cache = ActivationCache(budget)
>>> cache.put(0, torch.ones(4, 4))   # 64 bytes: fits
>>> cache.put(1, torch.zeros(4, 4))  # over the budget: written to disk
>>> cache.spilled_bytes, float(cache.get(1).sum()), float(cache.pop(0).sum())
(64, 0.0, 16.0)
>>> cache.close()
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class MemoryBudget:
    """Bytes of cached activations allowed in memory, shared by the caches of a pipeline."""

    def __init__(self, limit_bytes: int) -> None:
        if limit_bytes < 0:
            raise ValueError(f"the activation memory budget must be >= 0 bytes, got {limit_bytes}")
        self.limit = limit_bytes
        self.used = 0
        self.peak = 0
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    def take(self, nbytes: int) -> bool:
        if self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        self.peak = max(self.peak, self.used)
        return True

    def give(self, nbytes: int) -> None:
        self.used -= nbytes

    def directory(self) -> Path:
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="lowbit-calibration-")
        return Path(self._dir.name)

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


class ActivationCache:
    """Tensors by calibration batch index, in memory while the budget allows, else on disk."""

    _serial = 0  # distinct file names for every cache sharing one directory

    def __init__(self, budget: MemoryBudget) -> None:
        self.budget = budget
        self._memory: dict[int, torch.Tensor] = {}
        self._disk: dict[int, tuple[Path, torch.device]] = {}
        ActivationCache._serial += 1
        self._prefix = f"c{ActivationCache._serial}"
        self.spilled_bytes = 0

    def put(self, index: int, tensor: torch.Tensor) -> None:
        self.drop(index)
        nbytes = tensor.numel() * tensor.element_size()
        if self.budget.take(nbytes):
            self._memory[index] = tensor
            return
        path = self.budget.directory() / f"{self._prefix}-{index}.safetensors"
        save_file({"t": tensor.detach().contiguous().cpu()}, str(path))
        self._disk[index] = (path, tensor.device)
        self.spilled_bytes += nbytes

    def get(self, index: int) -> torch.Tensor:
        if index in self._memory:
            return self._memory[index]
        if index not in self._disk:
            raise KeyError(f"no cached activation for calibration batch {index}")
        path, device = self._disk[index]
        return load_file(str(path))["t"].to(device)

    def pop(self, index: int) -> torch.Tensor:
        tensor = self.get(index)
        self.drop(index)
        return tensor

    def drop(self, index: int) -> None:
        if index in self._memory:
            t = self._memory.pop(index)
            self.budget.give(t.numel() * t.element_size())
        if index in self._disk:
            self._disk.pop(index)[0].unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self._memory) + len(self._disk)

    def close(self) -> None:
        for index in list(self._memory) + list(self._disk):
            self.drop(index)
