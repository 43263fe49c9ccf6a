"""Properties that must hold for any input, checked with hypothesis: idempotence, monotonicity,
codes in range, the half-step error bound of affine integers, and packing round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

import lowbit.formats as F
from lowbit.granularity import (
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    expand_params,
    from_blocks,
    to_blocks,
)
from lowbit.packing import pack, unpack
from lowbit.primitives import QParams, choose_qparams, dequantize, quantize

# Modest example counts keep the whole file to a few seconds; no deadline, the first call is slow.
PROPERTY = settings(max_examples=60, deadline=None)

INT_NAMES = [f"int{b}" for b in range(1, 9)] + [f"uint{b}" for b in range(1, 9)]
GRID_NAMES = ["fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "nf4", "binary", "ternary"]
GRID_NAMES += [f"log2_{b}" for b in range(2, 9)]


def finite_tensors(max_dims: int = 3) -> st.SearchStrategy[torch.Tensor]:
    """Small float32 tensors of 1..max_dims dims, values over many magnitudes (subnormals included)."""
    values = st.one_of(
        st.floats(-(2.0**14), 2.0**14, width=32),
        st.floats(-(2.0**-10), 2.0**-10, width=32),
        st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5]),
    )
    shapes = array_shapes(min_dims=1, max_dims=max_dims, min_side=1, max_side=9)
    return arrays(np.float32, shapes, elements=values).map(torch.from_numpy)


granularities = st.one_of(
    st.sampled_from([PerTensor(), PerChannel(0), PerChannel(-1), PerToken()]),
    st.integers(1, 6).map(PerGroup),
)


def per_element(param: torch.Tensor, x: torch.Tensor, block: tuple[int, ...]) -> torch.Tensor:
    """A per-block parameter broadcast to one value per element of ``x``."""
    xb = to_blocks(x, block)
    return from_blocks(expand_params(param, x.dim()).expand_as(xb), tuple(x.shape))


# --- idempotence ------------------------------------------------------------------------------------


@PROPERTY
@given(
    x=finite_tensors(),
    name=st.sampled_from(INT_NAMES + GRID_NAMES),
    gran=granularities,
    symmetric=st.booleans(),
)
def test_quantizing_dequantized_values_returns_the_same_codes(
    x: torch.Tensor, name: str, gran, symmetric: bool
) -> None:
    fmt = F.get(name)
    qp = choose_qparams(x, fmt, gran, symmetric)
    codes = quantize(x, fmt, qp)
    again = quantize(dequantize(codes, fmt, qp), fmt, qp)
    assert torch.equal(again, codes)


# --- monotonicity ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", GRID_NAMES)
def test_grid_values_are_strictly_ascending(name: str) -> None:
    fmt = F.get(name)
    values = torch.tensor(fmt.grid_values, dtype=torch.float64)
    assert bool((values[1:] > values[:-1]).all())
    if fmt.sign_magnitude:  # magnitude index order is value order: codes compare like the values
        magnitudes = torch.tensor(fmt.grid, dtype=torch.float64)
        assert bool((magnitudes[1:] > magnitudes[:-1]).all())


@PROPERTY
@given(
    x=finite_tensors(max_dims=1),
    name=st.sampled_from(INT_NAMES + GRID_NAMES),
    symmetric=st.booleans(),
    scale=st.floats(1e-4, 1e3),
)
def test_quantize_is_monotone_for_a_fixed_scale(
    x: torch.Tensor, name: str, symmetric: bool, scale: float
) -> None:
    fmt = F.get(name)
    x = x.sort().values
    zero_point = None
    if fmt.family == "int" and not symmetric:
        zero_point = torch.tensor((fmt.qmin + fmt.qmax) // 2, dtype=torch.int32)
    qp = QParams(torch.tensor(scale), zero_point, tuple(x.shape))
    codes = quantize(x, fmt, qp)
    values = dequantize(codes, fmt, qp)
    assert bool((values[1:] >= values[:-1]).all())
    if fmt.family == "int":
        assert bool((codes[1:] >= codes[:-1]).all())


# --- codes in range --------------------------------------------------------------------------------


@PROPERTY
@given(
    x=finite_tensors(),
    name=st.sampled_from(INT_NAMES + GRID_NAMES),
    gran=granularities,
    symmetric=st.booleans(),
    clip_ratio=st.floats(0.1, 1.0),
)
def test_codes_stay_within_the_format(
    x: torch.Tensor, name: str, gran, symmetric: bool, clip_ratio: float
) -> None:
    fmt = F.get(name)
    qp = choose_qparams(x, fmt, gran, symmetric, clip_ratio)
    codes = quantize(x, fmt, qp).to(torch.int64)
    if fmt.family == "int":
        assert int(codes.min()) >= fmt.qmin and int(codes.max()) <= fmt.qmax
    elif fmt.sign_magnitude:  # never an unused (NaN / Inf) code
        magnitude = codes & (fmt.levels // 2 - 1)
        assert int(codes.min()) >= 0 and int(codes.max()) < fmt.levels
        assert int(magnitude.max()) < len(fmt.grid)
    else:
        assert int(codes.min()) >= 0 and int(codes.max()) < len(fmt.grid)
    values = dequantize(quantize(x, fmt, qp), fmt, qp)
    assert bool(torch.isfinite(values).all())


# --- error bound -------------------------------------------------------------------------------------


@PROPERTY
@given(
    x=finite_tensors(),
    name=st.sampled_from([f"int{b}" for b in range(2, 9)] + INT_NAMES),
    gran=granularities,
    symmetric=st.booleans(),
)
def test_affine_int_error_is_at_most_half_a_step_without_clipping(
    x: torch.Tensor, name: str, gran, symmetric: bool
) -> None:
    fmt = F.get(name)
    # A symmetric range needs a signed format with a positive qmax (int1 holds only -1 and 0).
    symmetric = symmetric and fmt.signed and fmt.qmax > 0
    qp = choose_qparams(x, fmt, gran, symmetric)
    error = (dequantize(quantize(x, fmt, qp), fmt, qp) - x).abs()
    step = per_element(qp.scale, x, qp.block)
    # Tiny float tolerance: x / scale and code * scale are each rounded once in float32.
    bound = step * (0.5 + 1e-5) + x.abs() * 1e-6
    assert bool((error <= bound).all()), float((error - bound).max())


# --- packing -------------------------------------------------------------------------------------------


@PROPERTY
@given(data=st.data(), bits=st.integers(1, 8), length=st.integers(0, 100))
def test_pack_unpack_round_trips(data: st.DataObject, bits: int, length: int) -> None:
    codes = data.draw(arrays(np.uint8, (length,), elements=st.integers(0, (1 << bits) - 1)))
    codes_t = torch.from_numpy(codes)
    assert torch.equal(unpack(pack(codes_t, bits), bits, length), codes_t)
