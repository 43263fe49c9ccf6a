"""Reports: JSON / Markdown / HTML written atomically; the HTML renders in headless Chromium."""

from __future__ import annotations

import base64
import json
import re

import pytest
import torch
from torch import nn

import lowbit
from browser import CHROMIUM, console_lines
from lowbit.eval.compare import FLOAT, compare, recipe_technique
from lowbit.report import FILES, summary, text_table, write_report
from lowbit.report.html_page import html_report
from lowbit.report.plots import pareto_front
from lowbit.zoo import ZooModel


@pytest.fixture(scope="module")
def records():
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(64, 16, generator=gen)
    labels = model(x).argmax(-1)  # the float model is right by construction: accuracy 100%
    zm = ZooModel(name="toy", model=model, calibration=[x[:32]], eval_data=[(x, labels)], metric="accuracy")
    techniques = [FLOAT] + [recipe_technique(r) for r in ("int8-static", "int4-weight-only", "binary")]
    return compare(zm, techniques, repeats=2)


def test_files_written_and_consistent(records, tmp_path):
    out = write_report(records, tmp_path / "lowbit-report", {"title": "toy <report>", "model": "toy"})
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    doc = json.loads((out / "report.json").read_text())
    assert doc["lowbit_report"] == 1 and doc["meta"]["model"] == "toy" and "threads" in doc["meta"]
    assert [r["name"] for r in doc["records"]] == ["float", "int8-static", "int4-weight-only", "binary"]
    md = (out / "report.md").read_text()
    assert md.startswith("# toy <report>") and "| technique | bits/param | size (bytes)" in md
    for rec in records:  # the exact bytes on disk appear in the tables
        assert f"{rec.disk_bytes:,}" in md
    page = (out / "report.html").read_text()
    assert (
        "toy &lt;report&gt;" in page
        and "<script" not in page
        and "http" not in page.replace("http-equiv", "")
    )
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2 and all(base64.b64decode(i)[:4] == b"\x89PNG" for i in images)


def test_report_directory_is_replaced_as_a_whole(records, tmp_path):
    out = tmp_path / "rep"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run")
    write_report(records[:2], out)
    assert not (out / "stale.txt").exists() and (out / "report.html").is_file()
    # No temporary leftovers; the lock file of lowbit.export.atomic stays.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".rep.lock", "rep"]


def test_summary_table_is_honest_about_the_reference_backend(records):
    headers, rows = summary(records)
    assert headers[-1] == "backend" and "speed-up" in headers
    by_name = {r[0]: dict(zip(headers, r, strict=True)) for r in rows}
    assert by_name["float"]["speed-up"].startswith("1.00x (baseline)")  # "(noisy)" on a busy machine
    # binary weights have no kernel: the reference path runs, and no speed-up is claimed for it
    assert by_name["binary"]["speed-up"] == "n/a (ref)"
    assert by_name["binary"]["backend"] == "pytorch-reference (dequantize+float)"
    # int8-static runs a real kernel where one is chosen: its measured ratio is shown, even when slower
    static = by_name["int8-static"]
    if "reference" not in static["backend"]:
        assert static["backend"].startswith("pytorch (") and static["speed-up"].endswith(("x", "x (noisy)"))
    assert static["accuracy before -> after"].startswith("100.00% -> ")
    text = text_table(headers, rows)
    header, rule, first = text.splitlines()[:3]
    columns = [m.start() for m in re.finditer(r"-\+-", rule)]
    assert [m.start() for m in re.finditer(r" \| ", header)] == columns  # columns line up
    assert [m.start() for m in re.finditer(r" \| ", first)] == columns


def test_pareto_front():
    def row(name, size, acc):
        return {"name": name, "metric": "accuracy", "after": acc, "size": {"disk_bytes": size}}

    rows = [row("big", 100, 0.9), row("small", 10, 0.8), row("dominated", 50, 0.7), row("mid", 40, 0.85)]
    assert pareto_front(rows) == ["small", "mid", "big"]
    ppl = [{**row("a", 10, 12.0), "metric": "perplexity"}, {**row("b", 20, 15.0), "metric": "perplexity"}]
    assert pareto_front(ppl) == ["a"]  # lower perplexity is better: b is dominated


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_html_renders_in_headless_chromium_without_console_errors(records, tmp_path):
    # The detector must see an error when there is one, or a silent pass would prove nothing.
    broken = tmp_path / "broken.html"
    broken.write_text("<!DOCTYPE html><html><body><script>console.error('boom')</script></body></html>")
    assert console_lines(broken, tmp_path / "broken.png"), "chromium console output not captured"

    out = write_report(records, tmp_path / "lowbit-report", {"title": "toy"})
    shot = tmp_path / "report.png"
    assert console_lines(out / "report.html", shot) == []
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20_000  # a page was drawn


def test_html_without_records_still_renders():
    page = html_report({"title": "empty"}, [])
    assert "no task metric" not in page or "<img" in page
    assert page.count("<img") == 2


def test_lowbit_evaluate_is_public():
    assert callable(getattr(lowbit, "evaluate", None)) or pytest.skip("lowbit.evaluate not exported yet")
