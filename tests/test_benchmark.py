"""``lowbit bench``: structure of the report (never absolute times: those only go to bench output)."""

from __future__ import annotations

import json

import pytest

from lowbit.benchmark import BenchReport, KernelRow, bench, kernel_table, time_interleaved

pytest.importorskip("onnxruntime", reason="ONNX export tests need the onnx extra")


def test_time_interleaved_returns_a_median_per_entry():
    calls = {"a": 0, "b": 0}

    def make(name):
        def fn():
            calls[name] += 1

        return fn

    times = time_interleaved({"a": make("a"), "b": make("b")}, repeats=5, warmup=1)
    assert set(times) == {"a", "b"} and calls == {"a": 6, "b": 6}


def test_bench_digits_rows_and_markdown(tmp_path):
    report = bench("digits-mlp", batch_sizes=(4,), repeats=2, kernels=False, threads=1, out=tmp_path)
    assert (tmp_path / "digits-mlp.md").read_text() == report.to_markdown()
    names = [r.name for r in report.rows]
    assert names[:2] == ["PyTorch fp32", "ORT fp32"]
    assert any(n.startswith("lowbit int8") for n in names)
    assert any(n.startswith("ORT quantize_dynamic") for n in names)
    ort = next(r for r in report.rows if r.name == "ORT fp32")
    assert ort.speedup == 1.0 and ort.fidelity is not None and ort.fidelity > 0.9
    md = report.to_markdown()
    assert "| variant | batch |" in md and "vs ORT fp32" in md
    json.dumps(report.to_dict())
    custom = bench("digits-mlp", batch_sizes=(2,), repeats=1, kernels=False, threads=1, recipes=["fp16"])
    custom_names = [r.name for r in custom.rows]
    assert "lowbit (fp16)" in custom_names and "lowbit (fp16), PyTorch" in custom_names
    from lowbit.eval.openvino import OpenVinoModel

    if OpenVinoModel.available():  # OpenVINO runs the same ONNX files, or says why it cannot
        assert "OpenVINO fp32" in custom_names
    else:
        assert any("OpenVINO" in n for n in custom.notes)


def test_kernel_table_limits():
    rows = kernel_table(size=256, rows=(1, 64), repeats=2, threads=1)
    fp32 = [k for k in rows if k.kernel == "fp32 MatMul"]
    assert len(fp32) == 2 and all(k.limit is None for k in fp32)
    int4_1row = next(k for k in rows if k.kernel.startswith("int4") and k.rows == 1)
    # Bytes ratio at 1 row: fp32 bytes over 4-bit codes + scales + zero points (~5 bits/param).
    assert 5.0 < int4_1row.limit < 8.0
    assert KernelRow("x", 1, 1.0, 2.0, 4.0).of_limit == 0.5
    assert isinstance(BenchReport("m", 1, 1, {}).to_markdown(), str)
