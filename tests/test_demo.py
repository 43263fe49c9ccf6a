"""lowbit demo: the matrix runs, int8 static keeps accuracy, the table's sizes are bytes on disk."""

from __future__ import annotations

import io
import json
import os
import sys
import types

import pytest

import lowbit
from lowbit import demo
from lowbit.eval.compare import FLOAT, Technique, recipe_technique


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "lowbit-report"
    stream = io.StringIO()
    techniques = [FLOAT] + [recipe_technique(r) for r in ("int8-weight-only", "int8-static", "nf4", "binary")]
    records = demo.run_demo(out=out, techniques=techniques, repeats=2, ort=False, stream=stream)
    return records, stream.getvalue(), out


def test_demo_matrix_covers_the_techniques():
    names = [t.name for t in demo.TECHNIQUES]
    for required in (
        "float",
        "fp16",
        "int8-weight-only",
        "int8-dynamic",
        "int8-static",
        "int4-weight-only",
        "nf4",
        "kmeans-4bit",
        "log2-4bit",
        "binary",
        "ternary",
    ):
        assert required in names


def test_int8_static_within_budget_and_weight_only_lossless(run):
    records, _, _ = run
    by = {r.name: r for r in records}
    assert by["int8-static"].drop <= demo.INT8_STATIC_BUDGET
    assert by["int8-weight-only"].drop <= 0.2
    assert by["binary"].bits_per_param < 2 and by["binary"].drop > by["int8-static"].drop  # reported honestly
    assert all(r.reload_identical for r in records)


def test_table_printed_and_sizes_are_bytes_on_disk(run, tmp_path):
    records, text, out = run
    header = text.split("\n\n")[1].splitlines()[0]
    for column in (
        "technique",
        "bits/param",
        "size (bytes)",
        "size reduction",
        "accuracy before -> after",
        "output MSE",
        "latency",
        "speed-up",
        "backend",
    ):
        assert column in header
    assert "check: int8 static loses" in text and "within" in text
    zm = lowbit.zoo.get("digits-cnn")
    q = lowbit.quantize(zm.model, "int8-static", calibration=zm.calibration, progress=False)
    lowbit.save(q, tmp_path / "q")
    on_disk = os.path.getsize(tmp_path / "q" / "model.safetensors")
    static = next(r for r in records if r.name == "int8-static")
    assert static.disk_bytes == on_disk and f"{on_disk:,}" in text
    doc = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in doc["records"]] == [r.name for r in records]
    assert (out / "report.html").stat().st_size > 10_000 and (out / "report.md").is_file()


def test_other_modules_can_add_rows(monkeypatch):
    fake = types.ModuleType("lowbit_fake_rows")
    fake.demo_techniques = lambda: [Technique("qat-4bit", lambda zm: zm.model)]
    monkeypatch.setitem(sys.modules, "lowbit_fake_rows", fake)
    monkeypatch.setattr(demo, "ROW_PROVIDERS", ("lowbit_fake_rows", "lowbit.no_such_module"))
    assert [t.name for t in demo.extra_techniques()] == ["qat-4bit"]


def test_speed_note_says_when_the_model_is_too_small():
    from types import SimpleNamespace as NS

    def rec(name, float_ms, quant_ms, real=True, ort=None):
        lat = NS(float_ms=float_ms, quant_ms=quant_ms, speedup=float_ms / quant_ms if real else None)
        return NS(name=name, latency=lat, ort=ort, recipe=name, drop=None, reload_identical=True)

    small = [rec("float", 0.5, 0.5, real=False), rec("int8-static", 0.5, 0.8)]
    note = demo.speed_note(small)
    assert note is not None and "too small" in note and "0.50 ms" in note and "int8-static" in note
    assert "PyTorch" in note and "ONNX" not in note
    assert note in demo.check_records(small)
    assert demo.speed_note([rec("int8-static", 0.5, 0.4)]) is None  # it did get faster
    assert demo.speed_note([rec("int8-static", 40.0, 50.0)]) is None  # slow, but not small
    assert demo.speed_note([rec("int8-static", 0.5, 0.8, real=False)]) is None  # reference only
    # ORT alone too small: PyTorch got faster, ORT's integer export did not (a float export is ignored).
    ort_slow = {"float_ms": 0.7, "quant_ms": 1.7, "speedup": 0.41, "kernels": {"QDQ": 5}}
    ort_float = {"float_ms": 0.7, "quant_ms": 0.5, "speedup": 1.4, "kernels": {"float": 2}}
    rows = [rec("int8-static", 1.5, 1.2, ort=ort_slow), rec("nf4", 1.5, 2.0, real=False, ort=ort_float)]
    note = demo.speed_note(rows)
    assert note is not None and "(ONNX Runtime: float 0.70 ms" in note and "0.41x" in note
