"""lowbit.evaluate: record fields, sizes equal bytes on disk, per-layer error, honest latency, data files."""

from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
import lowbit.backends
from lowbit.eval.artifact_info import inspect_artifact
from lowbit.eval.datafile import load_data
from lowbit.eval.evaluate import Baseline, evaluate, measure_disk
from lowbit.eval.latency import REFERENCE_BACKEND, backend_of, compare_latency, is_real_kernel
from lowbit.eval.layers import layer_errors
from lowbit.export.compact import ArtifactError
from lowbit.nn.base import QuantizedModule
from sealing import reseal


@pytest.fixture(scope="module")
def digits():
    return lowbit.zoo.get("digits-cnn")


@pytest.fixture(scope="module")
def static_record(digits):
    q = lowbit.quantize(digits.model, "int8-static", calibration=digits.calibration, progress=False)
    return q, evaluate(digits.model, q, digits.eval_data, metric="accuracy", repeats=3)


def test_record_fields_and_int8_static_budget(digits, static_record):
    q, rec = static_record
    assert rec.metric == "accuracy" and rec.name == "int8-static" and rec.recipe == "int8-static"
    assert 0.9 <= rec.before <= 1.0 and 0.9 <= rec.after <= 1.0
    assert rec.drop <= 0.5  # the acceptance budget for int8 static on digits-cnn, in points
    assert rec.output_mse > 0 and 25 < rec.output_sqnr_db < 80
    assert 8.0 < rec.bits_per_param < 8.6  # int8 codes plus per-channel scales and float biases
    assert rec.size_reduction == pytest.approx(rec.float_disk_bytes / rec.disk_bytes)
    assert rec.reload_identical is True
    d = rec.to_dict()
    json.dumps(d, allow_nan=False)  # JSON-ready: no NaN / inf
    assert d["size"]["disk_bytes"] == rec.disk_bytes and d["drop"] == rec.drop


def test_sizes_equal_bytes_on_disk(digits, static_record, tmp_path):
    q, rec = static_record
    manifest = lowbit.save(q, tmp_path / "q")
    assert rec.disk_bytes == os.path.getsize(tmp_path / "q" / manifest["file"]["name"])
    lowbit.save(digits.model, tmp_path / "f")
    assert rec.float_disk_bytes == os.path.getsize(tmp_path / "f" / "model.safetensors")
    assert rec.stored_bytes == lowbit.size_report(q).stored_bytes == manifest["totals"]["stored_bytes"]


def test_per_layer_table(digits, static_record):
    q, rec = static_record
    names = [n for n, m in q.named_modules() if isinstance(m, QuantizedModule)]
    assert [r.name for r in rec.layers] == names
    first = rec.layers[0]
    # The first layer sees the same input in both models, so isolated == accumulated error.
    assert first.sqnr_db == pytest.approx(first.accumulated_sqnr_db)
    assert all(r.sqnr_db > 35 and r.cosine > 0.999 for r in rec.layers)


def test_per_layer_error_points_at_the_damaged_layer(gen):
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    recipe = {
        "weight": {"format": "int8"},
        "overrides": [{"pattern": "2", "weight": {"format": "binary"}}],
    }
    q = lowbit.quantize(model, recipe, progress=False)
    rows = {r.name: r for r in layer_errors(model, q, [torch.randn(16, 32, generator=gen)])}
    assert rows["2"].format == "binary" and rows["0"].format == "int8"
    assert rows["2"].sqnr_db < 20 < 35 < rows["0"].sqnr_db
    assert rows["2"].accumulated_sqnr_db <= rows["2"].sqnr_db + 0.5


def test_cosine_metric_and_no_metric(gen):
    model = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 8)).eval()
    q = lowbit.quantize(model, "int4-weight-only", progress=False)
    data = [torch.randn(8, 16, generator=gen) for _ in range(2)]
    rec = evaluate(model, q, data, metric="cosine", latency=False, check_reload=False)
    assert rec.before == pytest.approx(1.0) and 0.9 < rec.after < 1.0 and rec.latency is None
    none = evaluate(model, q, data, metric=None, latency=False, per_layer=False)
    assert none.before is None and none.drop is None and none.layers == []
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate(model, q, data, metric="bleu")


def test_latency_labels_reference_and_never_claims_speedup(gen):
    model = nn.Sequential(nn.Linear(32, 32)).eval()
    q = lowbit.quantize(model, "int8-weight-only", progress=False, kernels="reference")
    r = compare_latency(model, q, torch.randn(4, 32, generator=gen), repeats=3, warmup=1)
    assert r.backend == REFERENCE_BACKEND and r.float_backend == "pytorch-float32"
    assert r.float_ms > 0 and r.quant_ms > 0 and r.speedup is None and r.ratio > 0
    assert not is_real_kernel(REFERENCE_BACKEND) and not is_real_kernel("pytorch-float32")

    lowbit.backends.use_kernels(q, "torch-int-mm")  # not applicable to a weight-only layer
    assert backend_of(q) == REFERENCE_BACKEND
    if lowbit.backends.use_kernels(q, "torch-int8pack-bf16")[0].backend != "reference":
        # a layer on a real kernel gets its speed-up reported, named by its backend
        assert backend_of(q) == "pytorch (torch-int8pack-bf16)"
        assert compare_latency(model, q, torch.randn(4, 32), repeats=2).speedup is not None


def test_measure_disk_and_baseline_reuse(digits):
    disk = measure_disk(digits.model)
    assert disk.disk_bytes > disk.size.stored_bytes  # the safetensors header is real bytes too
    base = Baseline.measure(digits.model, digits.eval_data[:2], "accuracy")
    q = lowbit.quantize(digits.model, "fp16", progress=False)
    rec = evaluate(digits.model, q, digits.eval_data[:2], "accuracy", baseline=base, latency=False)
    assert rec.before == base.score and rec.float_disk_bytes == disk.disk_bytes
    assert rec.bits_per_param == pytest.approx(16.0, abs=0.2)


# --- data files ----------------------------------------------------------------------------------


def test_data_files(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((70, 1, 8, 8)))
    data = load_data(tmp_path / "x.npy", batch_size=32)
    assert [len(b) for b in data.batches] == [32, 32, 6] and data.batches[0].dtype == torch.float32
    torch.save({"inputs": torch.zeros(10, 4), "labels": torch.arange(10)}, tmp_path / "d.pt")
    labelled = load_data(tmp_path / "d.pt", batch_size=4)
    assert labelled.labelled and labelled.samples == 10 and labelled.batches[-1][1].tolist() == [8, 9]
    from safetensors.torch import save_file

    ids = torch.ones(6, 5, dtype=torch.long)
    save_file({"input_ids": ids, "attention_mask": ids.clone()}, str(tmp_path / "t.safetensors"))
    tok = load_data(tmp_path / "t.safetensors", batch_size=4)
    assert sorted(tok.batches[0]) == ["attention_mask", "input_ids"] and tok.samples == 6


class Opaque:  # a pickled custom object: weights_only loading must refuse it
    pass


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.npy", None, "does not exist"),
        ("garbage.pt", b"not a tensor file", "cannot read data file"),
        ("data.csv", b"1,2,3", "unsupported type"),
        ("empty.npy", "empty", "no samples"),
        ("lines.txt", b"hello\n", "needs a model with a tokenizer"),
        ("object.pt", "pickle", "cannot read data file"),
    ],
)
def test_bad_data_files(tmp_path, name, content, message):
    path = tmp_path / name
    if content == "empty":
        np.save(path, np.zeros((0, 3)))
    elif content == "pickle":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.save({"x": Opaque()}, path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_data(path)


def test_inspect_detects_a_lying_manifest(tmp_path):
    q = lowbit.quantize(nn.Sequential(nn.Linear(64, 64)), "int4-weight-only", progress=False)
    lowbit.save(q, tmp_path / "a")
    info = inspect_artifact(tmp_path / "a")
    assert info.verified and math.isclose(info.bits_per_param, info.manifest_bits_per_param, rel_tol=0.01)
    manifest = json.loads((tmp_path / "a" / "lowbit.json").read_text())
    manifest["totals"]["bits_per_param"] *= 0.5  # claims half the bits actually stored
    (tmp_path / "a" / "lowbit.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="sha256"):
        inspect_artifact(tmp_path / "a")
    reseal(tmp_path / "a")
    bad = inspect_artifact(tmp_path / "a")
    assert not bad.verified and "bits/param" in bad.problems[0]


def test_ort_latency_column_when_onnx_is_installed(gen):
    from lowbit.eval.ort import available, ort_latency

    if not available():
        pytest.skip("ONNX extras not installed")
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    q = lowbit.quantize(model, "int8-dynamic", progress=False)
    r = ort_latency(model, q, torch.randn(8, 64, generator=gen), repeats=3)
    assert r["float_ms"] > 0 and r["quant_ms"] > 0 and r["repeats"] >= 3
    assert sum(r["kernels"].values()) == 2 and r["backend"].startswith("onnxruntime")
    assert r["speedup"] == pytest.approx(r["float_ms"] / r["quant_ms"])
