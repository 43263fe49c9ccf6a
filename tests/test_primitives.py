"""choose_qparams / quantize / dequantize / fake_quantize, bit-exact against independent references:
PyTorch's own fake-quantization ops and observers for integers, ml_dtypes for the minifloats, and
torch casts for fp16 / bf16. Then the awkward inputs (degenerate, non-finite, half precision) and
the straight-through gradient.
"""

from __future__ import annotations

import doctest
import math
from dataclasses import replace

import ml_dtypes
import numpy as np
import pytest
import torch
from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver

import lowbit.formats as F
import lowbit.granularity
import lowbit.packing
import lowbit.primitives
from lowbit.formats import Format
from lowbit.granularity import PerChannel, PerGroup, PerTensor, PerToken, block_shape
from lowbit.primitives import (
    QParams,
    check_finite,
    choose_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_tensor,
    grid_table,
    qparams_from_range,
    quantize,
)

ALL_GRANULARITIES = [PerTensor(), PerChannel(0), PerChannel(-1), PerGroup(4), PerToken()]
MINIFLOATS = {
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
}


def unit_scale(x: torch.Tensor) -> QParams:
    """Scale 1, no zero point: a grid format is then exactly the plain number format."""
    return QParams(torch.ones(()), None, tuple(x.shape))


# --- integers against PyTorch ---------------------------------------------------------------------


def torch_fake_quantize(x: torch.Tensor, fmt: Format, qp: QParams, axis: int | None) -> torch.Tensor:
    """PyTorch's reference op fed with our scale and zero point (axis None: per tensor)."""
    if axis is None:
        zero_point = 0 if qp.zero_point is None else int(qp.zero_point)
        return torch.fake_quantize_per_tensor_affine(x, float(qp.scale), zero_point, fmt.qmin, fmt.qmax)
    scale = qp.scale.reshape(-1)
    zero_point = torch.zeros(scale.shape, dtype=torch.int32) if qp.zero_point is None else qp.zero_point
    return torch.fake_quantize_per_channel_affine(x, scale, zero_point.reshape(-1), axis, fmt.qmin, fmt.qmax)


def ties_and_outliers(scale: torch.Tensor, zero_point: torch.Tensor | None, fmt: Format) -> torch.Tensor:
    """Values exactly half way between codes (across the whole range and past both ends), and far
    outliers, for one block."""
    zp = 0 if zero_point is None else int(zero_point)
    codes = torch.arange(fmt.qmin - 4, fmt.qmax + 4, dtype=torch.float32)
    ties = (codes - zp + 0.5) * scale
    outliers = torch.tensor([-1e6, -3.0, 3.0, 1e6]) * (fmt.qmax - fmt.qmin) * scale
    return torch.cat([ties, outliers])


def int_test_data(kind: str, symmetric: bool, gen: torch.Generator) -> torch.Tensor:
    if kind == "power_of_two_scale":
        # Symmetric int8 on [-127/16, 127/16] and asymmetric uint8 on [-8, 127/16] both get the scale
        # 1/16 exactly, so the half-step values below are exact ties in float32, not merely close.
        low = -127 / 16 if symmetric else -8.0
        return torch.cat([torch.tensor([low, 127 / 16]), torch.rand(62, generator=gen) * 15 - 7])
    return torch.randn(64, generator=gen) * 2 + 0.3


# (format, symmetric); symmetric uint8 is the odd one out: negative values clamp to code 0.
INT_CASES = [("int8", True), ("int8", False), ("uint8", False), ("uint8", True)]
INT_CASES += [("int4", True), ("int4", False)]


@pytest.mark.parametrize("kind", ["random", "power_of_two_scale"])
@pytest.mark.parametrize(("name", "symmetric"), INT_CASES)
def test_int_per_tensor_matches_torch_fake_quantize(name: str, symmetric: bool, kind: str, gen) -> None:
    fmt = F.get(name)
    base = int_test_data(kind, symmetric, gen)
    clip_ratio = 1.0 if kind == "power_of_two_scale" else 0.8  # 0.8: part of the data is clamped
    qp = choose_qparams(base, fmt, PerTensor(), symmetric, clip_ratio=clip_ratio)
    if kind == "power_of_two_scale" and fmt.bits == 8 and symmetric == fmt.signed:
        assert float(qp.scale) == 1 / 16
    x = torch.cat([base, ties_and_outliers(qp.scale, qp.zero_point, fmt)])
    qp = replace(qp, block=tuple(x.shape))
    ours = fake_quantize(x, fmt, qp)
    torch.testing.assert_close(ours, torch_fake_quantize(x, fmt, qp, None), rtol=0, atol=0)
    codes = quantize(x, fmt, qp)
    assert int((codes == fmt.qmax).sum()) > 2 and int((codes == fmt.qmin).sum()) > 2  # clamping happened


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize(("name", "symmetric"), INT_CASES)
def test_int_per_channel_matches_torch_fake_quantize(name: str, symmetric: bool, axis: int, gen) -> None:
    fmt = F.get(name)
    channels = 5
    base = torch.randn(channels, 48, generator=gen) * torch.logspace(-2, 1, channels).unsqueeze(1)
    base[1] = base[1].abs()  # one channel all positive, one all negative: ranges widened to zero
    base[2] = -base[2].abs()
    base[3] = 0.0  # and an all-zero one (scale clamped to eps)
    qp = choose_qparams(base, fmt, PerChannel(0), symmetric, clip_ratio=0.8)
    zps = [None] * channels if qp.zero_point is None else list(qp.zero_point.reshape(-1))
    extra = torch.stack(
        [ties_and_outliers(s, zp, fmt) for s, zp in zip(qp.scale.reshape(-1), zps, strict=True)]
    )
    x = torch.cat([base, extra], dim=1)  # rows are channels here
    scale, zero_point = qp.scale, qp.zero_point
    if axis == 1:  # the same data with channels as columns
        x = x.T.contiguous()
        scale = scale.reshape(1, -1)
        zero_point = None if zero_point is None else zero_point.reshape(1, -1)
    qp = QParams(scale, zero_point, block_shape(PerChannel(axis), x.shape))
    ours = fake_quantize(x, fmt, qp)
    torch.testing.assert_close(ours, torch_fake_quantize(x, fmt, qp, axis), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["random", "all_positive", "all_negative", "huge", "power_of_two_scale"])
def test_asymmetric_qparams_match_min_max_observer(kind: str, gen: torch.Generator) -> None:
    x = {
        "random": torch.randn(256, generator=gen) * 3 + 1,
        "all_positive": torch.rand(256, generator=gen) + 0.5,
        "all_negative": -torch.rand(256, generator=gen) - 0.5,
        "huge": torch.randn(256, generator=gen) * 1e30,
        "power_of_two_scale": int_test_data("power_of_two_scale", False, gen),
    }[kind]
    observer = MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    observer(x)
    ref_scale, ref_zero_point = observer.calculate_qparams()
    qp = choose_qparams(x, F.get("uint8"), PerTensor(), symmetric=False)
    assert torch.equal(qp.scale.reshape(1), ref_scale)
    assert torch.equal(qp.zero_point.reshape(1).to(torch.int64), ref_zero_point.to(torch.int64))


@pytest.mark.parametrize("magnitude", [1e-7, 1e-12, 1e-30])
@pytest.mark.parametrize("symmetric", [True, False])
def test_scales_follow_small_data_where_pytorchs_eps_floor_zeroes_it(
    magnitude: float, symmetric: bool, gen: torch.Generator
) -> None:
    """PyTorch's observers floor the scale at float32 eps (1.19e-7): int8 of values at 1e-7 is then
    all zero codes (or one). lowbit's floor is float32's smallest normal, so scales follow the data."""
    x = torch.randn(256, generator=gen) * magnitude
    fmt = F.get("int8" if symmetric else "uint8")
    y = fake_quantize(x, fmt, choose_qparams(x, fmt, PerTensor(), symmetric))
    assert float((y - x).double().norm() / x.double().norm()) < 0.02  # double: 1e-30 squared underflows
    observer = MinMaxObserver(
        dtype=torch.qint8 if symmetric else torch.quint8,
        qscheme=torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine,
    )
    observer(x)
    ref_scale, _ = observer.calculate_qparams()
    assert float(ref_scale) == torch.finfo(torch.float32).eps  # what lowbit no longer does


def test_an_all_zero_tensor_gets_a_positive_finite_scale_and_exact_zeros() -> None:
    x = torch.zeros(64)
    for name, symmetric in (("int8", True), ("uint8", False), ("int4", True)):
        qp = choose_qparams(x, F.get(name), PerTensor(), symmetric)
        assert bool(torch.isfinite(qp.scale).all()) and float(qp.scale.min()) > 0
        assert torch.equal(fake_quantize(x, F.get(name), qp), x)


def test_asymmetric_per_channel_qparams_match_per_channel_observer(gen: torch.Generator) -> None:
    x = torch.randn(8, 32, generator=gen) * torch.logspace(-3, 3, 8).unsqueeze(1) + 0.1
    x[0] = x[0].abs()
    observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.quint8, qscheme=torch.per_channel_affine)
    observer(x)
    ref_scale, ref_zero_point = observer.calculate_qparams()
    qp = choose_qparams(x, F.get("uint8"), PerChannel(0), symmetric=False)
    assert torch.equal(qp.scale.reshape(-1), ref_scale)
    assert torch.equal(qp.zero_point.reshape(-1).to(torch.int64), ref_zero_point.to(torch.int64))


def test_symmetric_int_scale_maps_absmax_to_qmax() -> None:
    qp = choose_qparams(torch.tensor([-1.0, 0.5]), F.get("int8"))
    assert float(qp.scale) == float(torch.tensor(1.0) / 127) and qp.zero_point is None
    codes = quantize(torch.tensor([-1.0, 0.5, 0.0]), F.get("int8"), replace(qp, block=(3,)))
    assert codes.dtype == torch.int8 and codes.tolist() == [-127, 64, 0]


# --- minifloats against ml_dtypes -----------------------------------------------------------------


def minifloat_probe_values(fmt: Format, gen: torch.Generator) -> torch.Tensor:
    """Values that stress rounding: random over every binade (subnormals included), exact midpoints
    between neighbouring representable values and their float32 neighbours, values near the max."""
    grid = torch.tensor(fmt.grid_values, dtype=torch.float64)
    top, smallest = fmt.grid_max, fmt.grid[1]
    exponents = torch.empty(4000, dtype=torch.float64).uniform_(
        math.log2(smallest) - 4, math.log2(top) + 1, generator=gen
    )
    signs = torch.randint(0, 2, (4000,), generator=gen, dtype=torch.float64) * 2 - 1
    spread = (signs * 2.0**exponents).float()
    midpoints = ((grid[1:] + grid[:-1]) / 2).float()  # exact in float32: one more mantissa bit
    above = torch.nextafter(midpoints, torch.tensor(math.inf))
    below = torch.nextafter(midpoints, torch.tensor(-math.inf))
    edges = torch.tensor([0.0, -0.0, smallest / 2, -smallest / 2, smallest / 4, top, -top])
    near_top = torch.nextafter(torch.tensor([top, -top]), torch.tensor(0.0))
    x = torch.cat([spread, midpoints, above, below, edges, near_top])
    return x.clamp(-top, top)  # ml_dtypes turns overflow into NaN / inf; saturation is tested apart


@pytest.mark.parametrize("name", MINIFLOATS)
def test_minifloat_rounding_matches_ml_dtypes_bit_for_bit(name: str, gen: torch.Generator) -> None:
    fmt = F.get(name)
    x = minifloat_probe_values(fmt, gen)
    reference = x.numpy().astype(MINIFLOATS[name])
    qp = unit_scale(x)
    codes = quantize(x, fmt, qp)
    np.testing.assert_array_equal(codes.numpy(), reference.view(np.uint8))
    values = dequantize(codes, fmt, qp)
    np.testing.assert_array_equal(values.numpy().view(np.int32), reference.astype(np.float32).view(np.int32))
    torch.testing.assert_close(fake_quantize(x, fmt, qp), values, rtol=0, atol=0)


@pytest.mark.parametrize("name", MINIFLOATS)
def test_minifloat_saturates_at_max_instead_of_inf_or_nan(name: str) -> None:
    fmt = F.get(name)
    top = fmt.grid_max
    beyond = torch.tensor([top * 1.02, top * 1.5, 1e6, torch.finfo(torch.float32).max])
    x = torch.cat([beyond, -beyond])
    qp = unit_scale(x)
    codes = quantize(x, fmt, qp)
    top_code = len(fmt.grid) - 1
    assert codes.tolist() == [top_code] * 4 + [top_code | fmt.levels // 2] * 4
    assert dequantize(codes, fmt, qp).tolist() == [top] * 4 + [-top] * 4


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp4_e2m1", "nf4", "log2_4", "ternary"])
def test_scaled_grids_saturate_at_the_scaled_max(name: str, gen: torch.Generator) -> None:
    fmt = F.get(name)
    x = torch.randn(100, generator=gen)
    qp = choose_qparams(x, fmt, clip_ratio=0.5)
    y = fake_quantize(x, fmt, qp)
    limit = fmt.grid_max * float(qp.scale)
    assert float(y.abs().max()) == pytest.approx(limit, rel=1e-6)
    assert bool(torch.isfinite(y).all())


def test_grid_ties_go_to_the_even_code() -> None:
    fmt = F.get("fp4_e2m1")  # magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0])
    codes = quantize(x, fmt, unit_scale(x))
    assert codes.tolist() == [0, 2, 2, 4, 4, 6, 6, 14]


def test_grid_table_places_negatives_after_the_sign_bit() -> None:
    table = grid_table(F.get("fp4_e2m1"))
    assert table.tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    assert grid_table(F.get("nf4")).tolist() == list(F.get("nf4").grid)


# --- fp16 / bf16 against torch casts ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_half_formats_match_torch_casts(name: str, gen: torch.Generator) -> None:
    fmt = F.get(name)
    finfo = torch.finfo(fmt.torch_dtype)
    exponents = torch.empty(5000).uniform_(
        math.log2(finfo.smallest_normal) - 12, math.log2(finfo.max), generator=gen
    )
    x = torch.randn(5000, generator=gen).sign() * 2.0**exponents
    x = torch.cat([x, torch.tensor([0.0, -0.0, finfo.max, -finfo.max, finfo.tiny, 1 + finfo.eps / 2])])
    qp = choose_qparams(x, fmt, PerChannel(0))
    codes = quantize(x, fmt, qp)
    assert codes.dtype == fmt.torch_dtype
    assert torch.equal(codes.view(torch.int16), x.to(fmt.torch_dtype).view(torch.int16))
    torch.testing.assert_close(fake_quantize(x, fmt, qp), x.to(fmt.torch_dtype).float(), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_half_formats_saturate_at_max_instead_of_inf(name: str) -> None:
    fmt = F.get(name)
    top = torch.finfo(fmt.torch_dtype).max
    x = torch.tensor([torch.finfo(torch.float32).max, 1e38, 7e4, top])
    x = torch.cat([x, -x])
    qp = choose_qparams(x, fmt)
    assert torch.isinf(x.to(fmt.torch_dtype)).any()  # the plain cast overflows...
    y = fake_quantize(x, fmt, qp)
    assert bool(torch.isfinite(y).all())  # ...ours does not
    assert y.abs().max() == top and y[0] == top and y[4] == -top


# --- degenerate and non-finite input -----------------------------------------------------------------

FIXED_FORMATS = ["int2", "int4", "int8", "uint4", "uint8", "fp16", "bf16", "binary", "ternary"]
FIXED_FORMATS += ["log2_4", "nf4", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1"]
DEGENERATE_INPUTS = {
    "all_zero": lambda: torch.zeros(3, 5),
    "constant": lambda: torch.full((3, 5), -2.5),
    "single_element": lambda: torch.tensor([-2.5]),
    "single_element_2d": lambda: torch.tensor([[-2.5]]),
    "scalar": lambda: torch.tensor(-2.5),
    "scalar_zero": lambda: torch.tensor(0.0),
    "empty": lambda: torch.empty(0),
    "empty_rows": lambda: torch.empty(0, 4),
    "empty_cols": lambda: torch.empty(4, 0),
}


@pytest.mark.parametrize("input_kind", DEGENERATE_INPUTS)
@pytest.mark.parametrize("name", FIXED_FORMATS)
def test_degenerate_input_gives_finite_exact_results(name: str, input_kind: str) -> None:
    fmt = F.get(name)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = DEGENERATE_INPUTS[input_kind]().to(dtype)
        for gran in ALL_GRANULARITIES:
            for symmetric in (True, False):
                qp = choose_qparams(x, fmt, gran, symmetric)
                assert bool(torch.isfinite(qp.scale).all()) and bool((qp.scale > 0).all())
                codes = quantize(x, fmt, qp)
                assert codes.shape == x.shape and codes.dtype == fmt.code_dtype
                y = fake_quantize(x, fmt, qp)
                assert y.shape == x.shape and y.dtype == dtype
                assert not bool(torch.isnan(y).any())
                # Zeros and constants are exactly representable by every format here (binary has no
                # zero; a symmetric unsigned format cannot hold the negative constant).
                if fmt.name == "binary" and input_kind in ("all_zero", "scalar_zero"):
                    assert bool((y.abs() <= torch.finfo(torch.float32).eps).all())
                elif not (fmt.family == "int" and symmetric and not fmt.signed):
                    torch.testing.assert_close(y, x, rtol=1e-6, atol=0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", ["int8", "uint4", "fp8_e4m3", "nf4", "binary", "ternary", "fp16", "bf16"])
def test_non_finite_input_raises_a_clear_error(name: str, bad: float) -> None:
    fmt = F.get(name)
    x = torch.tensor([[1.0, bad], [0.5, -2.0]])
    problem = "1 NaN and 0 Inf" if math.isnan(bad) else "0 NaN and 1 Inf"
    message = f"tensor contains {problem} values; clean or retrain"
    with pytest.raises(ValueError, match=message):
        choose_qparams(x, fmt, PerChannel(0))
    qp = choose_qparams(torch.ones(2, 2), fmt, PerChannel(0))
    with pytest.raises(ValueError, match=message):
        quantize(x, fmt, qp)
    with pytest.raises(ValueError, match=message):
        fake_quantize(x.to(torch.bfloat16), fmt, qp)
    with pytest.raises(ValueError, match=message):
        fake_quantize_tensor(x, fmt, PerGroup(2))


def test_check_finite_names_what_it_checked() -> None:
    with pytest.raises(ValueError, match=r"^layer fc1 weight contains 2 NaN and 1 Inf values"):
        check_finite(torch.tensor([math.nan, math.nan, -math.inf, 1.0]), "layer fc1 weight")
    check_finite(torch.tensor([1, 2]))  # integers cannot be non-finite
    check_finite(torch.empty(0))


def test_bad_arguments_raise_value_errors() -> None:
    x = torch.randn(4, 4)
    for ratio in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="clip_ratio must be in"):
            choose_qparams(x, F.get("int4"), clip_ratio=ratio)
    with pytest.raises(ValueError, match="does not take its parameters from a range"):
        qparams_from_range(x.min(), x.max(), F.get("fp16"), (4, 4))
    with pytest.raises(ValueError, match="needs a codebook"):
        quantize(x, F.get("kmeans_4"), QParams(torch.ones(1, 1), None, (4, 4)))


# --- dtypes and devices ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["int8", "uint4", "fp8_e4m3", "fp4_e2m1", "nf4", "ternary", "fp16", "bf16"])
def test_half_precision_inputs_compute_in_float32_and_return_their_dtype(
    name: str, dtype: torch.dtype, gen: torch.Generator
) -> None:
    fmt = F.get(name)
    x = (torch.randn(6, 40, generator=gen) * 3).to(dtype).requires_grad_()
    qp = choose_qparams(x.detach(), fmt, PerGroup(16), symmetric=False)
    qp_float = choose_qparams(x.detach().float(), fmt, PerGroup(16), symmetric=False)
    assert torch.equal(qp.scale, qp_float.scale)
    y = fake_quantize(x, fmt, qp)
    assert y.dtype == dtype
    expected = fake_quantize(x.detach().float(), fmt, qp).to(dtype)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    y.sum().backward()
    assert x.grad is not None and x.grad.dtype == dtype
    assert dequantize(quantize(x.detach(), fmt, qp), fmt, qp, dtype=torch.float64).dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize(
    "name", ["int8", "int4", "uint8", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "nf4", "binary", "bf16"]
)
def test_cuda_matches_cpu(name: str, gen: torch.Generator) -> None:
    fmt = F.get(name)
    x = torch.randn(32, 200, generator=gen) * 4
    for dtype in (torch.float32, torch.bfloat16):
        x = x.to(dtype)
        for gran in (PerTensor(), PerChannel(0), PerGroup(64)):
            for symmetric in (True, False):
                qp = choose_qparams(x, fmt, gran, symmetric)
                # Parameters chosen on the GPU may differ in the last bit: CUDA divides by a scalar
                # through its reciprocal and sums in another order. Close is all we ask of them...
                qp_cuda = choose_qparams(x.cuda(), fmt, gran, symmetric)
                torch.testing.assert_close(qp_cuda.scale.cpu(), qp.scale, rtol=1e-6, atol=0)
                # ...but with the same parameters, codes and values must be identical.
                codes = quantize(x.cuda(), fmt, qp.to("cuda"))
                assert codes.is_cuda
                assert torch.equal(codes.cpu(), quantize(x, fmt, qp))
                y = fake_quantize(x.cuda(), fmt, qp.to("cuda"))
                assert y.is_cuda and y.dtype == dtype
                torch.testing.assert_close(y.cpu(), fake_quantize(x, fmt, qp), rtol=0, atol=0)


def test_qparams_to_moves_every_tensor() -> None:
    qp = QParams(torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.int32), (1, 4), torch.zeros(2, 1, 16))
    moved = qp.to("meta")
    assert moved.scale.is_meta and moved.zero_point.is_meta and moved.codebook.is_meta
    assert moved.block == qp.block
    assert QParams(torch.ones(()), None, ()).to("meta").zero_point is None


# --- straight-through gradient ----------------------------------------------------------------------------


def test_ste_gradient_is_one_inside_the_range_and_zero_where_clamped() -> None:
    fmt = F.get("int4")
    x = torch.linspace(-4, 3, 141, requires_grad=True)
    qp = choose_qparams(x.detach(), fmt, symmetric=False, clip_ratio=0.5)  # range about [-2, 1.5]
    fake_quantize(x, fmt, qp).sum().backward()
    assert x.grad is not None
    assert set(x.grad.tolist()) == {0.0, 1.0}
    assert x.grad[0] == 0 and x.grad[-1] == 0 and x.grad[70] == 1  # -4, 3 clamped; 0.5 inside
    # The same mask as PyTorch's own op (clamped exactly where the rounded code leaves qmin..qmax).
    x_ref = x.detach().clone().requires_grad_()
    torch_fake_quantize(x_ref, fmt, replace(qp, block=tuple(x.shape)), None).sum().backward()
    assert torch.equal(x.grad, x_ref.grad)


def test_ste_gradient_per_channel_matches_torch(gen: torch.Generator) -> None:
    fmt = F.get("int4")
    x = (torch.randn(4, 50, generator=gen) * 3).requires_grad_()
    qp = choose_qparams(x.detach(), fmt, PerChannel(0), symmetric=False, clip_ratio=0.6)
    fake_quantize(x, fmt, qp).backward(torch.arange(200.0).reshape(4, 50))
    x_ref = x.detach().clone().requires_grad_()
    torch_fake_quantize(x_ref, fmt, qp, 0).backward(torch.arange(200.0).reshape(4, 50))
    assert torch.equal(x.grad, x_ref.grad)
    assert bool((x.grad == 0).any())


def test_ste_gradient_for_grids_stops_beyond_the_grid_max() -> None:
    fmt = F.get("fp4_e2m1")
    x = torch.tensor([-9.0, -6.0, -0.3, 0.0, 2.9, 6.0, 6.5], requires_grad=True)
    fake_quantize(x, fmt, unit_scale(x)).sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 1, 0]


# --- documented examples --------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [F, lowbit.granularity, lowbit.primitives, lowbit.packing])
def test_documented_examples_run(module) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
