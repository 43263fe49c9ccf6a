"""Sparse storage of quantized codes: a 1-bit-per-value presence mask plus only the nonzero codes.

A pruned weight's codes are mostly the zero code. Storing ``bitmask + nonzero codes`` takes
``1 + (1 - sparsity) * bits`` bits per value instead of ``bits``: 50 % sparse int8 drops from 8 to
5 bits, 90 % sparse 4-bit from 4 to 1.4 bits. ``encode`` / ``decode`` are exact inverses (tested
bit-exact); ``sparse_report`` measures what a quantized model would store this way. The artifact
can already shrink pruned weights with ``lowbit.save(..., compression="lzma")``; this layout is the
uncompressed, random-access alternative (see docs/notes/issue-7.md for the proposed manifest entry).

>>> import torch
>>> codes = torch.tensor([0, 3, 0, 0, -2, 0, 0, 1], dtype=torch.int8)
>>> mask, values = encode(codes)
>>> mask.tolist(), values.tolist(), torch.equal(decode(mask, values, codes.shape), codes)
([146], [3, -2, 1], True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lowbit import packing
from lowbit.nn.qweight import QuantizedWeight


def zero_code(qw: QuantizedWeight) -> int:
    """The code that stands for the value 0 in ``qw`` (``-1`` if none does, e.g. binary)."""
    codes = qw.codes().flatten().long()
    values = qw.dequantize().flatten()
    hits = codes[values == 0]
    return int(hits[0]) if hits.numel() else -1


def encode(codes: torch.Tensor, zero: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, values)``: a packed presence bitmask (1 bit per code, ``lowbit.packing`` layout) and
    the codes that differ from ``zero``, in order."""
    flat = codes.flatten()
    present = flat != zero
    return packing.pack(present.to(torch.uint8), 1), flat[present].clone()


def decode(
    mask: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...] | torch.Size, zero: int = 0
) -> torch.Tensor:
    """Inverse of ``encode``."""
    numel = math.prod(shape)
    present = packing.unpack(mask, 1, numel).bool()
    out = torch.full((numel,), zero, dtype=values.dtype, device=values.device)
    out[present] = values
    return out.reshape(shape)


@dataclass
class SparseSize:
    """Dense vs sparse storage of one model's quantized codes (bytes; scales etc. not included)."""

    dense_bytes: int
    sparse_bytes: int
    sparsity: float

    @property
    def ratio(self) -> float:
        return self.sparse_bytes / max(self.dense_bytes, 1)


def sparse_report(model: nn.Module) -> SparseSize:
    """What the packed codes of every ``QuantizedWeight`` in ``model`` take dense vs as bitmask + codes."""
    dense = sparse = zeros = total = 0
    for qw in (m for m in model.modules() if isinstance(m, QuantizedWeight)):
        if qw.fmt.family in ("float", "vector"):
            continue
        codes = qw.codes()
        z = zero_code(qw)
        nonzero = int((codes != z).sum()) if z >= 0 else codes.numel()
        dense += packing.packed_nbytes(codes.numel(), qw.fmt.bits)
        sparse += packing.packed_nbytes(codes.numel(), 1) + packing.packed_nbytes(nonzero, qw.fmt.bits)
        zeros += codes.numel() - nonzero
        total += codes.numel()
    return SparseSize(dense, sparse, zeros / max(total, 1))
