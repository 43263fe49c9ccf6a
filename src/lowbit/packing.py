"""Bit packing: unsigned codes of 1..8 bits into bytes and back, exactly.

Eight codes of ``b`` bits hold exactly ``b`` bytes, so one routine serves every width: gather eight
codes into a 64-bit word (code ``i`` at bit ``i*b``, little-endian) and split the word into ``b``
bytes. Fully vectorised; the layout is fixed and documented so other runtimes can read it.

>>> import torch
>>> codes = torch.tensor([1, 2, 3, 0, 7], dtype=torch.uint8)
>>> packed = pack(codes, 3)
>>> packed.numel(), unpack(packed, 3, 5).tolist()
(3, [1, 2, 3, 0, 7])
"""

from __future__ import annotations

import math

import torch


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits occupy once packed.

    >>> packed_nbytes(4096 * 4096, 4)
    8388608
    """
    return math.ceil(numel / 8) * bits if bits < 8 else numel


def to_unsigned(codes: torch.Tensor, qmin: int) -> torch.Tensor:
    """Shift signed codes (``qmin..qmax``) to ``0..qmax-qmin`` for packing, as uint8.

    >>> to_unsigned(torch.tensor([-128, -1, 0, 127], dtype=torch.int8), -128).tolist()
    [0, 127, 128, 255]
    """
    if codes.dtype in (torch.int8, torch.uint8):
        # One-byte codes: the same bytes read as uint8, shifted with uint8 wrap-around, are exact
        # (no int16 copies: a 32000 x 768 embedding table is 25 MB per copy).
        return codes.contiguous().view(torch.uint8) + ((-qmin) % 256)
    return (codes.to(torch.int16) - qmin).to(torch.uint8)


def from_unsigned(codes: torch.Tensor, qmin: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Inverse of ``to_unsigned``."""
    return (codes.to(torch.int16) + qmin).to(dtype)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer codes (any shape, values < 2**bits) into a flat uint8 tensor."""
    _check_bits(bits)
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(
            f"codes must lie in 0..{(1 << bits) - 1} to pack into {bits} bits, "
            f"got {int(flat.min())}..{int(flat.max())}"
        )
    if bits == 8:
        return flat.to(torch.uint8).clone()
    if 8 % bits == 0:
        return _pack_within_bytes(flat.to(torch.uint8), bits)
    pad = (-flat.numel()) % 8
    words = torch.nn.functional.pad(flat.to(torch.int64), (0, pad)).reshape(-1, 8)
    shifts = torch.arange(8, device=flat.device, dtype=torch.int64) * bits
    word = (words << shifts).sum(dim=1, keepdim=True)  # disjoint bit fields: sum == bitwise or
    byte_shifts = torch.arange(bits, device=flat.device, dtype=torch.int64) * 8
    return ((word >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Unpack ``numel`` codes of ``bits`` bits from ``pack``'s output (flat uint8 result)."""
    _check_bits(bits)
    need = packed_nbytes(numel, bits)
    if packed.dtype != torch.uint8 or packed.numel() != need:
        raise ValueError(
            f"packed buffer holds {packed.numel()} {packed.dtype} values; "
            f"{numel} codes of {bits} bits need {need} uint8 bytes"
        )
    if bits == 8:
        return packed.reshape(-1).clone()
    if 8 % bits == 0:
        return _unpack_within_bytes(packed, bits, numel)
    chunks = packed.reshape(-1, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (chunks << byte_shifts).sum(dim=1, keepdim=True)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = (word >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:numel].to(torch.uint8)


# Widths that divide 8 (1, 2, 4 bits) never straddle a byte: the same little-endian layout is then
# built with uint8 shifts alone, ~50x faster than the 64-bit word path (which every width can use).


def _pack_within_bytes(flat: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    padded = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 8)).reshape(-1, per_byte)
    shifts = torch.arange(per_byte, device=flat.device, dtype=torch.uint8) * bits
    return (padded << shifts).sum(dim=1, dtype=torch.uint8)  # disjoint bit fields: sum == or


def _unpack_within_bytes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.uint8) * bits
    codes = (packed.reshape(-1, 1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:numel]


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"can pack 1..8 bits per code, got {bits!r}")
