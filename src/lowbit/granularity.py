"""Granularity: which values share one scale. Every granularity reduces to a block shape.

A block shape has one entry per tensor dimension; each block of that shape gets its own scale
(zero point, codebook). Per tensor is the whole shape, per channel along axis ``a`` is the shape
with a 1 at ``a``, per group of G is ``(1, ..., 1, G)``, per token is ``(1, ..., 1, D)``.
Dimensions that are not a multiple of the block are padded with zeros internally, so a group
size never has to divide the dimension exactly.

>>> block_shape(PerGroup(128), (64, 300))
(1, 128)
>>> block_shape(PerChannel(0), (64, 300))
(1, 300)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn.functional import pad


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""

    def __str__(self) -> str:
        return "per_tensor"


@dataclass(frozen=True)
class PerChannel:
    """One scale per index along ``axis`` (output channels of a weight: axis 0)."""

    axis: int = 0

    def __str__(self) -> str:
        return f"per_channel(axis={self.axis})"


@dataclass(frozen=True)
class PerGroup:
    """One scale per ``size`` consecutive values along the last (input) dimension, per row."""

    size: int = 128

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"group size must be >= 1, got {self.size}")

    def __str__(self) -> str:
        return f"per_group({self.size})"


@dataclass(frozen=True)
class PerToken:
    """One scale per row of the last dimension (dynamic activations: one per token)."""

    def __str__(self) -> str:
        return "per_token"


Granularity = PerTensor | PerChannel | PerGroup | PerToken


def parse(spec: str | Granularity) -> Granularity:
    """Parse ``"tensor"``, ``"channel"``, ``"channel:1"``, ``"group:64"``, ``"token"``.

    >>> parse("group:32")
    PerGroup(size=32)
    """
    if isinstance(spec, (PerTensor, PerChannel, PerGroup, PerToken)):
        return spec
    text = str(spec).strip().lower().replace("per_", "")
    name, _, arg = text.partition(":")
    try:
        if name == "tensor" and not arg:
            return PerTensor()
        if name == "channel":
            return PerChannel(int(arg) if arg else 0)
        if name == "group":
            return PerGroup(int(arg) if arg else 128)
        if name == "token" and not arg:
            return PerToken()
    except ValueError:
        pass
    raise ValueError(
        f"unknown granularity {spec!r}; use 'tensor', 'channel[:axis]', 'group[:size]' or 'token'"
    )


def block_shape(gran: Granularity, shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
    """The block shape that ``gran`` means for a tensor of ``shape``."""
    shape = tuple(shape)
    nd = len(shape)
    if isinstance(gran, PerTensor) or nd == 0:
        return shape
    if isinstance(gran, PerChannel):
        if not -nd <= gran.axis < nd:
            raise ValueError(f"per-channel axis {gran.axis} is out of range for a {nd}-d tensor {shape}")
        axis = gran.axis % nd
        return tuple(1 if d == axis else s for d, s in enumerate(shape))
    if isinstance(gran, PerGroup):
        return (1,) * (nd - 1) + (min(gran.size, shape[-1]) if shape[-1] else gran.size,)
    if isinstance(gran, PerToken):
        return (1,) * (nd - 1) + (shape[-1],)
    raise TypeError(f"not a granularity: {gran!r}")


def blocked_shape(shape: tuple[int, ...], block: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the scale tensor: number of blocks along each dimension."""
    return tuple(math.ceil(s / b) if b else 0 for s, b in zip(shape, block, strict=True))


def to_blocks(x: torch.Tensor, block: tuple[int, ...]) -> torch.Tensor:
    """View ``x`` as ``[n0, b0, n1, b1, ...]`` (zero-padded so every block is full)."""
    pads: list[int] = []
    for s, b in zip(reversed(x.shape), reversed(block), strict=True):
        pads += [0, (-s) % b if b else 0]
    if any(pads):
        x = pad(x, pads)
    split: list[int] = []
    for s, b in zip(x.shape, block, strict=True):
        split += [s // b if b else 0, b]
    return x.reshape(split)


def from_blocks(xb: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``to_blocks``: merge block dims and drop the padding."""
    dims = xb.shape
    merged = xb.reshape([dims[2 * i] * dims[2 * i + 1] for i in range(len(dims) // 2)])
    if tuple(merged.shape) != tuple(shape):
        merged = merged[tuple(slice(0, s) for s in shape)]
    return merged


def block_dims(ndim: int) -> tuple[int, ...]:
    """The dims of a ``to_blocks`` view that run inside a block (reduce over these)."""
    return tuple(range(1, 2 * ndim, 2))


def expand_params(p: torch.Tensor, ndim: int) -> torch.Tensor:
    """Make a per-block parameter of shape ``[n0, n1, ...]`` broadcast against a blocked view."""
    return p.reshape([d for n in p.shape for d in (n, 1)]) if ndim else p
