"""Formats as data: the registry, the integer ranges and every grid, checked against references.

The minifloat grids are compared code by code with ``ml_dtypes``: our code layout (sign bit on top,
magnitude index below) is meant to be exactly the IEEE-style bit pattern, so a code written by
lowbit can be read by anything that understands float8 / float4.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

import lowbit.formats as F
from lowbit.primitives import QParams, dequantize, grid_table, quantize

MINIFLOATS = {
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
}
GRID_NAMES = ["fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "nf4", "binary", "ternary"]
GRID_NAMES += [f"log2_{b}" for b in range(2, 9)]

# NF4 as published with QLoRA (bitsandbytes' table), rounded to float32.
NF4_REFERENCE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


def ml_dtypes_table(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Every bit pattern of a minifloat and its value as float32 (NaN / Inf included)."""
    fmt = F.get(name)
    patterns = np.arange(fmt.levels, dtype=np.uint8)
    values = patterns.view(MINIFLOATS[name]).astype(np.float32)
    return patterns, values


# --- registry -----------------------------------------------------------------------------------


def test_every_listed_name_resolves_to_a_format_of_that_name() -> None:
    for name in F.names():
        fmt = F.get(name)
        assert fmt.family in F.FAMILIES
        if name != "pq":  # "pq" is the default-size alias of "pq_8x4"
            assert fmt.name == name


def test_get_ignores_case_and_surrounding_spaces() -> None:
    assert F.get("  INT4 ") == F.get("int4")
    assert F.get("Fp8_E4M3") is F.get("fp8_e4m3")


@pytest.mark.parametrize("name", ["int9", "int0", "uint", "fp6", "log2_1", "kmeans_9", "pq_9x4", ""])
def test_unknown_names_raise_a_value_error_listing_known_formats(name: str) -> None:
    with pytest.raises(ValueError, match="unknown format .*known formats: int1"):
        F.get(name)


def test_non_string_name_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="format name must be a string"):
        F.get(4)  # type: ignore[arg-type]


def test_format_validates_family_and_bits() -> None:
    with pytest.raises(ValueError, match="family must be one of"):
        F.Format("x", "posit", 8)
    with pytest.raises(ValueError, match="bits must be in 1..16"):
        F.Format("x", "int", 0)
    with pytest.raises(ValueError, match="1..8 bits"):
        F.int_format(9)
    with pytest.raises(ValueError, match="2..8 bits"):
        F.log2_format(1)
    with pytest.raises(ValueError, match="1..8 bits"):
        F.codebook_format(0)
    with pytest.raises(ValueError, match="dim >= 1"):
        F.pq_format(8, 0)


# --- integers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
def test_integer_ranges_are_twos_complement_and_unsigned(bits: int) -> None:
    signed, unsigned = F.get(f"int{bits}"), F.get(f"uint{bits}")
    assert (signed.qmin, signed.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert (unsigned.qmin, unsigned.qmax) == (0, 2**bits - 1)
    assert signed.levels == unsigned.levels == unsigned.qmax + 1
    # The code dtype must hold the whole range.
    assert (
        torch.iinfo(signed.code_dtype).min <= signed.qmin
        and signed.qmax <= torch.iinfo(signed.code_dtype).max
    )
    assert unsigned.qmax <= torch.iinfo(unsigned.code_dtype).max
    assert signed.packable and unsigned.packable
    assert F.storage_bits(signed) == bits


def test_derived_properties_of_other_families() -> None:
    assert F.get("fp16").code_dtype == torch.float16 and not F.get("fp16").packable
    assert F.get("bf16").code_dtype == torch.bfloat16
    assert F.get("nf4").code_dtype == torch.uint8 and F.get("nf4").packable
    assert F.storage_bits(F.get("pq")) == 8 / 4
    assert F.get("pq_6x2").vector_dim == 2 and F.get("pq_6x2").bits == 6
    assert F.get("kmeans_3").learner == "kmeans" and F.get("quantile_5").levels == 32


# --- grids --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", GRID_NAMES)
def test_grid_fits_in_its_codes_and_is_symmetric_when_sign_magnitude(name: str) -> None:
    fmt = F.get(name)
    values = fmt.grid_values
    assert len(values) <= fmt.levels
    if fmt.sign_magnitude:
        assert fmt.grid[0] == 0.0 and len(fmt.grid) <= fmt.levels // 2
        assert values == tuple(-v for v in reversed(values))
    assert fmt.grid_max == max(abs(v) for v in values)


@pytest.mark.parametrize("name", MINIFLOATS)
def test_minifloat_grid_is_every_finite_non_negative_ml_dtypes_value(name: str) -> None:
    patterns, values = ml_dtypes_table(name)
    sign_bit = F.get(name).levels // 2
    positive = values[(patterns < sign_bit) & np.isfinite(values)]
    assert F.get(name).grid == tuple(float(v) for v in positive)


@pytest.mark.parametrize(("name", "largest"), [("fp8_e4m3", 448.0), ("fp8_e5m2", 57344.0), ("fp4_e2m1", 6.0)])
def test_minifloat_largest_value(name: str, largest: float) -> None:
    assert F.get(name).grid_max == largest
    assert largest == float(ml_dtypes.finfo(MINIFLOATS[name]).max)


@pytest.mark.parametrize("name", MINIFLOATS)
def test_every_finite_code_decodes_to_the_ml_dtypes_value_of_its_bit_pattern(name: str) -> None:
    fmt = F.get(name)
    patterns, values = ml_dtypes_table(name)
    finite = np.isfinite(values)
    decoded = grid_table(fmt).numpy()
    # Compare bit patterns of the float32 values so that -0.0 and 0.0 are told apart.
    np.testing.assert_array_equal(decoded[finite].view(np.int32), values[finite].view(np.int32))


@pytest.mark.parametrize("name", MINIFLOATS)
def test_every_finite_value_quantizes_to_its_ml_dtypes_bit_pattern(name: str) -> None:
    fmt = F.get(name)
    patterns, values = ml_dtypes_table(name)
    finite = np.isfinite(values)
    x = torch.from_numpy(values[finite])
    qp = QParams(torch.ones(()), None, tuple(x.shape))
    codes = quantize(x, fmt, qp)
    assert codes.dtype == torch.uint8
    assert codes.tolist() == patterns[finite].tolist()  # -0.0 included: it keeps its sign bit
    assert torch.equal(dequantize(codes, fmt, qp).view(torch.int32), x.view(torch.int32))


def test_minifloat_magnitudes_example() -> None:
    assert F.minifloat_magnitudes(2, 1, 1, 6.0) == (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def test_nf4_matches_the_published_table() -> None:
    fmt = F.get("nf4")
    assert not fmt.sign_magnitude and len(fmt.grid) == 16
    torch.testing.assert_close(torch.tensor(fmt.grid), torch.tensor(NF4_REFERENCE), rtol=0, atol=1e-6)
    assert fmt.grid[7] == 0.0 and fmt.grid[0] == -1.0 and fmt.grid[-1] == 1.0  # exact, not approximately


@pytest.mark.parametrize("bits", range(2, 9))
def test_log2_magnitudes_are_zero_then_powers_of_two_up_to_one(bits: int) -> None:
    fmt = F.get(f"log2_{bits}")
    count = 2 ** (bits - 1)
    assert fmt.grid == (0.0,) + tuple(2.0**-k for k in range(count - 2, -1, -1))
    assert fmt.sign_magnitude and fmt.levels == 2 * count


def test_binary_and_ternary_grids() -> None:
    assert F.get("binary").grid == (-1.0, 1.0) and F.get("binary").scale_rule == "mean_abs"
    assert F.get("ternary").grid == (-1.0, 0.0, 1.0) and F.get("ternary").scale_rule == "twn"
