"""``lowbit doctor``: CPU features, kernels per layer before quantizing, artifact verification."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lowbit
from lowbit.doctor import CpuFeatures, cpu_features, doctor, inspect_onnx, layer_kernels
from lowbit.export.onnx import export_onnx

pytest.importorskip("onnxruntime", reason="ONNX export tests need the onnx extra")


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()


def test_cpu_features_and_saturation_rule():
    feats = cpu_features()
    assert feats.cores >= 1
    avx2_only = CpuFeatures(arch="x86_64", model="x", cores=2, avx2=True)
    assert avx2_only.int8_saturates and not avx2_only.int8_speedup_expected
    vnni = CpuFeatures(arch="x86_64", model="x", cores=2, avx2=True, avx512=True, vnni=True)
    assert not vnni.int8_saturates and vnni.int8_speedup_expected


def test_machine_only_report_is_text_and_json():
    report = doctor()
    assert report.to_text().startswith("CPU:")
    data = json.loads(json.dumps(report.to_dict()))
    assert "onnxruntime" in data["runtimes"] and "int8_saturates" in data["cpu"]


def test_model_kernels_before_quantizing_and_storage_only_warning():
    report = doctor("digits-cnn", "int8-static")
    assert [x.kernel for x in report.layers] == ["QDQ"] * 5
    nf4 = doctor("digits-mlp", "nf4")
    assert {x.kernel for x in nf4.layers} == {"float"}
    assert any("run in float" in w for w in nf4.warnings)


def test_artifact_dir_and_exported_onnx(tmp_path):
    q = lowbit.quantize(_mlp(), "int4-weight-only", progress=False)
    lowbit.save(q, tmp_path / "art")
    export_onnx(q, tmp_path / "art" / "model.onnx", torch.randn(1, 64))
    report = doctor(str(tmp_path / "art"))
    assert [x.kernel for x in report.layers] == ["MatMulNBits"] * 2
    onnx_info = report.artifact["onnx"]
    assert onnx_info["integer_ops"] == {"MatMulNBits": 2}
    assert onnx_info["float_ops"] == {}
    # 4-bit codes + fp32 scales and packed zero points per group of 64 + fp32 biases.
    assert 4.0 < onnx_info["bits_per_param"] < 6.0
    assert "bits/param" in report.to_text()


def test_float_onnx_warns_no_integer_ops(tmp_path):
    export_onnx(_mlp(), tmp_path / "f.onnx", torch.randn(1, 64))
    report = doctor(str(tmp_path / "f.onnx"))
    assert any("no integer op" in w for w in report.warnings)
    assert inspect_onnx(tmp_path / "f.onnx")["float_ops"]


def test_layer_kernels_of_quantized_model_and_missing_file():
    q = lowbit.quantize(_mlp(), "int8-dynamic", progress=False)
    assert [x.kernel for x in layer_kernels(q)] == ["MatMulIntegerToFloat"] * 2
    with pytest.raises(ValueError, match="does not exist"):
        doctor("/no/such/model.onnx")
