"""Bit packing: exact round trips for every width, the documented byte layout, and sizes."""

from __future__ import annotations

import pytest
import torch

import lowbit.formats as F
from lowbit.packing import from_unsigned, pack, packed_nbytes, to_unsigned, unpack
from lowbit.primitives import choose_qparams, quantize

WIDTHS = range(1, 9)
EDGE_LENGTHS = [0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65]


def random_codes(shape: tuple[int, ...], bits: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 1 << bits, shape, generator=gen, dtype=torch.int64).to(torch.uint8)


@pytest.mark.parametrize("bits", WIDTHS)
def test_random_codes_round_trip(bits: int, gen: torch.Generator) -> None:
    codes = random_codes((1000,), bits, gen)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert torch.equal(unpack(packed, bits, codes.numel()), codes)


@pytest.mark.parametrize("length", EDGE_LENGTHS)
@pytest.mark.parametrize("bits", WIDTHS)
def test_edge_lengths_and_values_round_trip(bits: int, length: int, gen: torch.Generator) -> None:
    top = (1 << bits) - 1
    for codes in (
        torch.zeros(length, dtype=torch.uint8),
        torch.full((length,), top, dtype=torch.uint8),
        random_codes((length,), bits, gen),
    ):
        packed = pack(codes, bits)
        assert packed.numel() == packed_nbytes(length, bits)
        assert torch.equal(unpack(packed, bits, length), codes)


@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 7), (1, 1, 1), (5, 1, 3), (0, 4), ()])
@pytest.mark.parametrize("bits", WIDTHS)
def test_odd_shapes_round_trip_after_reshape(bits: int, shape: tuple[int, ...], gen: torch.Generator) -> None:
    codes = random_codes(shape, bits, gen)
    packed = pack(codes, bits)
    assert packed.numel() == packed_nbytes(codes.numel(), bits)
    assert torch.equal(unpack(packed, bits, codes.numel()).reshape(shape), codes)


@pytest.mark.parametrize("bits", WIDTHS)
def test_all_ones_pack_to_all_ones_bytes(bits: int) -> None:
    # 16 codes of all ones fill 2*bits bytes with no padding: every bit is set.
    packed = pack(torch.full((16,), (1 << bits) - 1, dtype=torch.uint8), bits)
    assert packed.tolist() == [0xFF] * (2 * bits)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_any_integer_dtype_with_valid_values_packs(dtype: torch.dtype) -> None:
    codes = torch.tensor([0, 5, 7, 1], dtype=dtype)
    assert unpack(pack(codes, 3), 3, 4).tolist() == [0, 5, 7, 1]


def test_packed_nbytes() -> None:
    assert packed_nbytes(0, 3) == 0
    assert packed_nbytes(1, 3) == 3  # a partial group of 8 codes still takes `bits` bytes
    assert packed_nbytes(8, 3) == 3
    assert packed_nbytes(9, 3) == 6
    assert packed_nbytes(9, 8) == 9
    assert packed_nbytes(4096 * 4096, 4) == 4096 * 4096 // 2
    assert packed_nbytes(17, 1) == 3


# --- the layout is pinned: other runtimes read it ---------------------------------------------------


def test_three_bit_layout_is_little_endian_code_i_at_bit_3i() -> None:
    # Codes 1..7, 0 at bits 0-2, 3-5, ..., 21-23 of one 24-bit word (written LSB first):
    #   bit:   23..21 20..18 17..15 14..12 11..9  8..6  5..3  2..0
    #   code:    0      7      6      5      4     3     2     1
    #   word = 000 111 110 101 100 011 010 001 = 0b0001_1111_0101_1000_1101_0001 = 0x1F58D1
    # and the word is split into bytes least significant first: D1 58 1F.
    packed = pack(torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8), 3)
    assert packed.tolist() == [0xD1, 0x58, 0x1F]


def test_three_bit_layout_pads_a_partial_group_with_zero_codes() -> None:
    # 9 codes: the first 8 as above, then code 5 alone in a second, zero-padded word.
    packed = pack(torch.tensor([1, 2, 3, 4, 5, 6, 7, 0, 5], dtype=torch.uint8), 3)
    assert packed.tolist() == [0xD1, 0x58, 0x1F, 0x05, 0x00, 0x00]


def test_four_bit_layout_puts_the_first_code_in_the_low_nibble() -> None:
    packed = pack(torch.tensor([0x1, 0x2, 0x3, 0x4, 0xA, 0xB, 0xC, 0xD], dtype=torch.uint8), 4)
    assert packed.tolist() == [0x21, 0x43, 0xBA, 0xDC]


def test_one_and_two_bit_layouts() -> None:
    assert pack(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.uint8), 1).tolist() == [0x81, 0x01]
    assert pack(torch.tensor([3, 0, 1, 2], dtype=torch.uint8), 2).tolist() == [0b10_01_00_11, 0]


def test_eight_bit_packing_is_a_copy() -> None:
    codes = torch.tensor([0, 255, 17], dtype=torch.uint8)
    packed = pack(codes, 8)
    assert torch.equal(packed, codes) and packed.data_ptr() != codes.data_ptr()


# --- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [0, 9, -1, 2.0])
def test_bad_widths_are_rejected(bits) -> None:
    with pytest.raises(ValueError, match="can pack 1..8 bits per code"):
        pack(torch.zeros(8, dtype=torch.uint8), bits)
    with pytest.raises(ValueError, match="can pack 1..8 bits per code"):
        unpack(torch.zeros(8, dtype=torch.uint8), bits, 8)


def test_codes_out_of_range_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"codes must lie in 0..7 to pack into 3 bits, got 0..8"):
        pack(torch.tensor([0, 8], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match=r"got -1..2"):
        pack(torch.tensor([-1, 2], dtype=torch.int8), 3)


def test_unpack_checks_the_buffer_size_and_dtype() -> None:
    with pytest.raises(ValueError, match="9 codes of 3 bits need 6 uint8 bytes"):
        unpack(torch.zeros(3, dtype=torch.uint8), 3, 9)
    with pytest.raises(ValueError, match="holds 3 torch.int8 values"):
        unpack(torch.zeros(3, dtype=torch.int8), 3, 8)


# --- signed codes from real formats ------------------------------------------------------------------


@pytest.mark.parametrize("bits", WIDTHS)
def test_signed_integer_codes_round_trip_through_unsigned(bits: int, gen: torch.Generator) -> None:
    fmt = F.get(f"int{bits}")
    x = torch.randn(7, 13, generator=gen)
    codes = quantize(x, fmt, choose_qparams(x, fmt))
    unsigned = to_unsigned(codes, fmt.qmin)
    assert int(unsigned.min()) >= 0 and int(unsigned.max()) <= fmt.qmax - fmt.qmin
    restored = from_unsigned(unpack(pack(unsigned, bits), bits, codes.numel()), fmt.qmin).reshape(codes.shape)
    assert restored.dtype == torch.int8 and torch.equal(restored, codes)


@pytest.mark.parametrize(
    "name", ["fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "nf4", "log2_3", "binary", "ternary", "uint5"]
)
def test_unsigned_format_codes_pack_at_their_width(name: str, gen: torch.Generator) -> None:
    fmt = F.get(name)
    x = torch.randn(3, 21, generator=gen)
    codes = quantize(x, fmt, choose_qparams(x, fmt))
    packed = pack(codes, fmt.bits)
    assert packed.numel() == packed_nbytes(codes.numel(), fmt.bits)
    assert torch.equal(unpack(packed, fmt.bits, codes.numel()).reshape(codes.shape), codes)
