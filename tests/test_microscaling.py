"""MXFP4 / MXFP6 / MXFP8 (OCP Microscaling v1.0) and NVFP4, bit-exact against a numpy reference
built from ml_dtypes' own conversions; their scales stored in 8 bits; artifacts round-trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit
import lowbit.formats as F
from lowbit.codecs.scales import E4M3_TINY, round_scale, scale_buffers
from lowbit.nn.qweight import QuantizedWeight

md = pytest.importorskip("ml_dtypes")

# element dtype in ml_dtypes, largest finite value
ELEMENTS = {
    "mxfp4": (md.float4_e2m1fn, 6.0),
    "mxfp6_e2m3": (md.float6_e2m3fn, 7.5),
    "mxfp6_e3m2": (md.float6_e3m2fn, 28.0),
    "mxfp8": (md.float8_e4m3fn, 448.0),
    "mxfp8_e5m2": (md.float8_e5m2, 57344.0),
}


def _cast(values: np.ndarray, dtype: type, top: float) -> np.ndarray:
    # The spec clamps to the largest normal before converting (ml_dtypes would give NaN / inf
    # for fp8 overflow; fp4 / fp6 saturate by themselves).
    return np.clip(values, -top, top).astype(dtype)


def mx_reference(w: np.ndarray, name: str, block: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OCP MX 6.3: X = 2**(floor(log2(max|V|)) - emax_elem), P_i = element(V_i / X).

    Returns (element bit patterns, e8m0 scale bytes, dequantized values) for rows of ``w``.
    """
    dtype, top = ELEMENTS[name]
    emax = math.floor(math.log2(top))
    v = w.reshape(w.shape[0], -1, block).astype(np.float32)
    amax = np.abs(v).max(axis=-1, keepdims=True)
    shared = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - emax, -127)
    shared = np.clip(shared, -127, 127)
    x = np.ldexp(np.float32(1.0), shared.astype(np.int32)).astype(np.float32)
    p = _cast(v / x, dtype, top)
    values = p.astype(np.float32) * x
    scale_bytes = x.astype(md.float8_e8m0fnu).view(np.uint8)[..., 0]
    return p.view(np.uint8).reshape(w.shape), scale_bytes, values.reshape(w.shape)


def nvfp4_reference(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """NVFP4: fp4 e2m1 elements, e4m3 scale per 16 values (amax / 6, rounded), float32 tensor scale.

    The tensor scale is lowbit's choice (documented): the power of two 2**k with the largest block
    scale / 2**k within e4m3's range.
    """
    v = w.reshape(w.shape[0], -1, 16).astype(np.float32)
    s = np.abs(v).max(axis=-1, keepdims=True) / np.float32(6.0)
    s = np.maximum(s, np.float32(np.finfo(np.float32).tiny))
    k = int(np.ceil(np.log2(s.max() / 448.0)))  # exact enough away from powers of two
    e4 = np.clip(s / np.float32(2.0**k), E4M3_TINY, 448.0).astype(md.float8_e4m3fn)
    scale = e4.astype(np.float32) * np.float32(2.0**k)
    p = (v / scale).astype(md.float4_e2m1fn)
    return p.view(np.uint8).reshape(w.shape), e4.view(np.uint8)[..., 0], np.float32(2.0**k)


def _weights(seed: int, rows: int = 8, cols: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 1, rows).reshape(-1, 1)
    w[0, :32] = 0.0  # an all-zero block
    w[1, 5] = 300.0  # an outlier that saturates within its block
    w[2, :32] = torch.tensor([6.0, 7.0, 0.25, 0.75, -2.5, 5.0, -0.1, 1e-6] * 4)  # ties, saturation, tiny
    return w


@pytest.mark.parametrize("name", list(ELEMENTS))
@pytest.mark.parametrize("seed", [0, 1])
def test_mx_matches_the_reference(name: str, seed: int) -> None:
    w = _weights(seed)
    qw = QuantizedWeight.from_float(w, name, "group:32")
    codes, scale_bytes, values = mx_reference(w.numpy(), name)
    assert np.array_equal(qw.codes().numpy().astype(np.uint8), codes)
    assert np.array_equal(qw.scale.numpy(), scale_bytes)
    assert np.array_equal(qw.dequantize().numpy(), values)
    bits = F.get(name).bits
    assert qw.bits_per_param == bits + 8 / 32  # 8-bit shared scale per 32 values


@given(
    st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=32, max_size=32),
    st.sampled_from(list(ELEMENTS)),
)
@settings(max_examples=60, deadline=None)
def test_mx_matches_the_reference_on_any_block(values: list[float], name: str) -> None:
    w = torch.tensor(values, dtype=torch.float32).reshape(1, 32)
    qw = QuantizedWeight.from_float(w, name, "group:32")
    codes, scale_bytes, deq = mx_reference(w.numpy(), name)
    assert np.array_equal(qw.codes().numpy().astype(np.uint8), codes)
    assert np.array_equal(qw.scale.numpy(), scale_bytes)
    assert np.array_equal(qw.dequantize().numpy(), deq)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nvfp4_matches_the_reference(seed: int) -> None:
    w = _weights(seed, cols=64)
    qw = QuantizedWeight.from_float(w, "nvfp4", "group:16")
    codes, scale_bytes, tensor_scale = nvfp4_reference(w.numpy())
    assert np.array_equal(qw.codes().numpy().astype(np.uint8), codes)
    assert np.array_equal(qw.scale.numpy(), scale_bytes)
    assert float(qw.tensor_scale) == float(tensor_scale)
    expected = md.float4_e2m1fn  # decode: element value * e4m3 scale * tensor scale
    values = codes.view(expected).astype(np.float32).reshape(8, -1, 16)
    scale = scale_bytes.view(md.float8_e4m3fn).astype(np.float32)[..., None] * tensor_scale
    assert np.array_equal(qw.dequantize().numpy(), (values * scale).reshape(w.shape))
    assert qw.bits_per_param == pytest.approx(4 + 8 / 16 + 32 / w.numel())


def test_scales_are_stored_exactly_or_refused() -> None:
    for name in ("mxfp4", "nvfp4", "int4@fp16", "nf4@bf16"):
        fmt = F.get(name)
        s = round_scale(torch.rand(6, 3) * 10 + 1e-3, fmt)
        assert torch.equal(QuantizedWeight.from_codes(
            torch.zeros(6, 96, dtype=fmt.code_dtype), fmt,
            lowbit.primitives.QParams(s, None, (1, 32)), "group:32", True, (6, 96),
        ).scale_values(), s)  # fmt: skip
    with pytest.raises(ValueError, match="not representable"):
        scale_buffers(torch.tensor([3.0]), F.get("mxfp4"))
    with pytest.raises(ValueError, match="not representable"):
        scale_buffers(torch.tensor([0.1]), F.get("int4@fp16"))


def test_clip_search_candidates_share_the_tensor_scale() -> None:
    # MSE clipping mixes blocks of different clip ratios; they all keep one power of two per tensor.
    from lowbit.algorithms.rtn import choose_weight_qparams
    from lowbit.granularity import PerGroup

    w = _weights(3, cols=64)
    qp = choose_weight_qparams(w, F.get("nvfp4"), PerGroup(16), algorithm="mse")
    qw = QuantizedWeight.from_float(w, "nvfp4", "group:16", qparams=qp)
    assert torch.equal(qw.scale_values(), qp.scale)


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4", "mxfp8"])
def test_presets_save_and_load(tmp_path, name: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32))
    x = torch.randn(4, 64)
    q = lowbit.quantize(model, f"{name}-weight-only")
    for compression in ("none", "lzma"):
        out = tmp_path / compression
        lowbit.save(q, out, compression=compression)
        back = lowbit.load(out, model=nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)))
        assert torch.equal(back(x), q(x))
    cos = torch.nn.functional.cosine_similarity(q(x).flatten(), model(x).flatten(), dim=0)
    assert cos > 0.98


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4"])
def test_onnx_export_rebuilds_the_weights(tmp_path, name: str) -> None:
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    x = torch.randn(3, 64)
    q = lowbit.quantize(model, f"{name}-weight-only")
    path = tmp_path / "m.onnx"
    lowbit.export_onnx(q, path, x)
    session = ort.InferenceSession(str(path))
    y = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(y - q(x).detach().numpy()).max() < 1e-5
