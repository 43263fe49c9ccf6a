"""Range observers: the running min / max per block, and its exponential moving average.

>>> import torch, lowbit.formats as F
>>> from lowbit.granularity import PerChannel
>>> obs = MinMaxObserver(PerChannel(1))
>>> obs.observe(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))
>>> obs.max_val.tolist()
[[3.0, 0.5]]
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.formats import Format
from lowbit.granularity import (
    Granularity,
    PerChannel,
    PerTensor,
    block_dims,
    block_shape,
    blocked_shape,
    parse,
    to_blocks,
)
from lowbit.observers.base import Observer


class MinMaxObserver(Observer):
    """Running minimum and maximum of every block (one block for per tensor, one per channel, ...).

    Accumulates two tensors shaped like the scale (``blocked_shape``), set up from the first batch.
    Per tensor accepts batches of any shape; per channel needs the same rank and channel count;
    per group / per token need the first batch's exact block layout. Merging takes the elementwise
    min / max, which is exact and order independent.

    >>> import torch, lowbit.formats as F
    >>> obs = MinMaxObserver()
    >>> for batch in (torch.tensor([0.0, 2.0]), torch.tensor([-1.0])):
    ...     obs.observe(batch)
    >>> qp = obs.qparams(F.get("uint8"), symmetric=False)
    >>> round(float(qp.scale) * 255, 6), int(qp.zero_point)
    (3.0, 85)
    """

    name = "minmax"

    def __init__(self, granularity: Granularity | str = PerTensor()) -> None:
        super().__init__()
        self.granularity = parse(granularity)
        # Empty until the first batch fixes the block layout (and the device).
        self.min_val = torch.empty(0)
        self.max_val = torch.empty(0)

    def config(self) -> dict[str, Any]:
        return {"granularity": self.granularity}

    def _observe(self, x: torch.Tensor) -> None:
        if self.block is None:
            self.block = block_shape(self.granularity, x.shape)
            self.min_val, self.max_val = self._block_min_max(x, blocked_shape(tuple(x.shape), self.block))
        else:
            self._update(*self._block_min_max(x, tuple(self.min_val.shape)))

    def _update(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Fold one batch's per-block range into the running state."""
        self.min_val = torch.minimum(self.min_val, lo)
        self.max_val = torch.maximum(self.max_val, hi)

    def _range(self, fmt: Format, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min_val, self.max_val

    def _absorb(self, other: MinMaxObserver) -> None:  # type: ignore[override]
        if other.min_val.shape != self.min_val.shape:
            raise ValueError(
                f"cannot merge {self.name} observers with different block layouts "
                f"({tuple(self.min_val.shape)} vs {tuple(other.min_val.shape)} blocks); "
                "calibrate both on tensors of the same shape"
            )
        device = self.min_val.device
        self._update(other.min_val.to(device), other.max_val.to(device))

    def _block_min_max(
        self, x: torch.Tensor, state_shape: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-block min and max of one batch, shaped ``state_shape`` (the scale's shape)."""
        block = self.block or ()
        if isinstance(self.granularity, PerTensor) or x.dim() == 0:
            lo, hi = torch.aminmax(x)
            return lo.reshape(state_shape), hi.reshape(state_shape)
        if isinstance(self.granularity, PerChannel):
            axis = self.granularity.axis % x.dim()
            if x.dim() != len(block) or x.shape[axis] != state_shape[axis]:
                raise ValueError(
                    f"{self.granularity} observer keeps ranges of shape {state_shape} (set by the first "
                    f"batch); got a batch of shape {tuple(x.shape)}; keep the rank and channel count "
                    "the same across calibration batches"
                )
            channels = state_shape[axis]
            lo, hi = torch.aminmax(x.movedim(axis, 0).reshape(channels, -1), dim=1)
            return lo.reshape(state_shape), hi.reshape(state_shape)
        if (
            block_shape(self.granularity, x.shape) != block
            or blocked_shape(tuple(x.shape), block) != state_shape
        ):
            raise ValueError(
                f"{self.granularity} observer was set up for blocks {block} laid out as {state_shape}; "
                f"a tensor of shape {tuple(x.shape)} has a different layout; feed batches of the same shape"
            )
        # Zero padding inside to_blocks is harmless: quantization ranges always include zero.
        xb = to_blocks(x, block)
        dims = block_dims(x.dim())
        return xb.amin(dim=dims), xb.amax(dim=dims)


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of each batch's per-block min / max (like PyTorch's observer).

    ``min <- min + averaging_constant * (batch_min - min)``, starting from the first batch's range,
    so a few outlier batches move the range less than with ``MinMaxObserver``. Accumulates the two
    averages and the number of batches.

    The average depends on batch order, so ``merge`` is an approximation: the two averages are
    combined weighted by how many batches each observer saw.

    >>> import torch
    >>> obs = MovingAverageMinMaxObserver(averaging_constant=0.5)
    >>> obs.observe(torch.tensor([0.0, 1.0])); obs.observe(torch.tensor([0.0, 3.0]))
    >>> float(obs.max_val)
    2.0
    """

    name = "moving_average"

    def __init__(
        self, averaging_constant: float = 0.01, granularity: Granularity | str = PerTensor()
    ) -> None:
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        super().__init__(granularity)
        self.averaging_constant = averaging_constant
        self.batches = 0

    def config(self) -> dict[str, Any]:
        return {"averaging_constant": self.averaging_constant, "granularity": self.granularity}

    def _observe(self, x: torch.Tensor) -> None:
        super()._observe(x)
        self.batches += 1

    def _update(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        c = self.averaging_constant
        self.min_val = self.min_val + c * (lo - self.min_val)
        self.max_val = self.max_val + c * (hi - self.max_val)

    def _absorb(self, other: MovingAverageMinMaxObserver) -> None:  # type: ignore[override]
        if other.min_val.shape != self.min_val.shape:
            raise ValueError(
                f"cannot merge {self.name} observers with different block layouts; "
                "calibrate both on tensors of the same shape"
            )
        device = self.min_val.device
        total = self.batches + other.batches
        w_self, w_other = self.batches / total, other.batches / total
        self.min_val = w_self * self.min_val + w_other * other.min_val.to(device)
        self.max_val = w_self * self.max_val + w_other * other.max_val.to(device)
        self.batches = total
