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
