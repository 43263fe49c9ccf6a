"""The domain suite: rows from real measurements on a held-out toy domain, errors as rows, checks,
the report (Markdown, JSON, HTML in headless Chromium) and the CLI."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from torch import nn

import lowbit.domains as domains
from browser import CHROMIUM, console_lines
from lowbit.domains import report
from lowbit.domains.checks import check_rows, loss_points
from lowbit.domains.common import Shuffled
from lowbit.domains.suite import ROW_FIELDS, flat_output, run_suite
from lowbit.domains.task import DomainTask
from lowbit.domains.techniques import TECHNIQUES
from lowbit.eval.latency import is_real_kernel

TECHS = ["float", "int8-static", "int4-weight-only", "pq", "QAT 4-bit", "pruned 50% + int8"]


class TwoHeads(nn.Module):
    """A held-out model with two outputs (as a detector has): a conv trunk, class and box heads."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.cls = nn.Linear(16, 4)
        self.box = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x).relu().mean(dim=(2, 3))
        return self.cls(h), self.box(h)


def _toy_task(quick: bool) -> DomainTask:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 3, 8, 8, generator=gen)
    model = TwoHeads().eval()
    with torch.no_grad():
        y = model(x)[0].argmax(-1)  # the float model is right by construction

    def loss(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(m(batch[0])[0], batch[1])

    def score(m: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            return {"accuracy": 100.0 * float((m(x)[0].argmax(-1) == y).float().mean())}

    return DomainTask(
        domain="nlp",
        name="toy-two-heads",
        model=model,
        calibration=[x[:32], x[32:64]],
        train_data=Shuffled((x, y), 32),
        loss=loss,
        score=score,
        metrics={"accuracy": True},
        inputs=[x[64:96]],
        description="toy",
    )


def _broken(quick: bool) -> DomainTask:
    raise FileNotFoundError("toy data missing: install it")


@pytest.fixture(scope="module")
def result():
    fake = types.ModuleType("lowbit_test_fake_domain")
    fake.BUILDERS = {"toy-two-heads": _toy_task, "broken": _broken}
    sys.modules[fake.__name__] = fake
    saved = dict(domains.DOMAIN_MODULES)
    domains.DOMAIN_MODULES["nlp"] = fake.__name__
    domains.DOMAIN_MODULES["speech"] = "lowbit_test_no_such_module"
    try:
        yield run_suite(
            domains=["nlp", "speech"],
            techniques=TECHS,
            quick=True,
            repeats=2,
            onnx=False,
            stream=None,
            workers=1,
        )
    finally:
        domains.DOMAIN_MODULES.clear()
        domains.DOMAIN_MODULES.update(saved)
        del sys.modules[fake.__name__]


def test_every_technique_gives_a_measured_row(result):
    rows = [r.to_dict() for r in result.rows if r.model == "toy-two-heads"]
    assert [r["technique"] for r in rows] == TECHS
    assert all(set(r) == set(ROW_FIELDS) for r in rows)
    base = rows[0]
    assert base["value"] == 100.0 and base["mse"] == 0.0 and base["bits_per_param"] > 31.9
    for r in rows[1:]:
        assert r["error"] is None, r
        assert r["float_value"] == 100.0 and r["value"] is not None and r["delta"] == r["value"] - 100.0
        assert r["bytes"] > 0
        # PQ's codebooks can hold every sub-vector of layers this small: lossless and larger than
        # float, which the row reports as it is.
        if r["technique"] != "pq":
            assert r["bytes"] < base["bytes"] and r["mse"] > 0
        (torch_row,) = [lat for lat in r["latency"] if lat["runtime"] == "pytorch"]
        assert torch_row["backend"]
        # --quick times real kernels only: a reference-path row says so instead of a number.
        if not is_real_kernel(torch_row["backend"]):
            assert torch_row["latency_ms"] is None and "not timed" in torch_row["note"]
        else:
            assert torch_row["latency_ms"] > 0
    int8 = next(r for r in rows if r["technique"] == "int8-static")
    assert int8["value"] >= 95.0 and int8["bits_per_param"] < 10


def test_failures_are_rows_not_crashes(result):
    rows = [r.to_dict() for r in result.rows]
    broken = next(r for r in rows if r["model"] == "broken")
    assert "toy data missing" in broken["error"] and broken["value"] is None
    missing = next(r for r in rows if r["domain"] == "speech")
    assert "lowbit_test_no_such_module" in missing["error"]


def test_flat_output_counts_every_head():
    out = flat_output({"logits": torch.ones(2, 3), "boxes": (torch.zeros(2, 4), torch.arange(3))})
    assert out.shape == (14,)  # integer tensors (indices) are not outputs to compare


def test_checks_use_points_per_metric():
    assert loss_points("wer", 10.0, 11.5, False) == 1.5
    assert loss_points("spearman", 0.81, 0.80, True) == pytest.approx(1.0)
    rows = [
        {"domain": "detection", "model": "d", "technique": "float", "metric": "map50", "value": 0.55,
         "float_value": 0.55, "higher_is_better": True},
        {"domain": "detection", "model": "d", "technique": "int8-static", "metric": "map50", "value": 0.53,
         "float_value": 0.55, "higher_is_better": True, "error": None},
        {"domain": "detection", "model": "d", "technique": "int4-weight-only", "metric": "map50",
         "value": None, "float_value": 0.55, "higher_is_better": True, "error": "boom"},
    ]  # fmt: skip
    assert [c.ok for c in check_rows(rows)] == [False, False, False]  # baseline < 0.6, 2 points, error


def test_report_files(result, tmp_path):
    out = report.write(result, tmp_path / "rep")
    doc = json.loads((out / "report.json").read_text())
    assert {r["technique"] for r in doc["rows"]} >= set(TECHS) and doc["meta"]["quick"] is True
    md = (out / "report.md").read_text()
    assert "## nlp" in md and "| toy-two-heads | int8-static | accuracy |" in md and "toy data missing" in md
    page = (out / "report.html").read_text()
    assert "<script" not in page and page.count("<img") == 1


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(result, tmp_path):
    out = report.write(result, tmp_path / "rep")
    shot = tmp_path / "domains.png"
    assert console_lines(out / "report.html", shot) == []
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20_000


def test_cli_writes_json_rows(monkeypatch, tmp_path, capsys, result):
    import lowbit.domains.suite as suite
    from lowbit.cli import main

    seen = {}

    def fake_run_suite(**kwargs):
        seen.update(kwargs)
        return result

    monkeypatch.setattr(suite, "run_suite", fake_run_suite)
    out = tmp_path / "rows.json"
    rc = main(["bench", "--suite", "domains", "--quick", "--domains", "nlp", "--json", str(out), "--no-onnx"])
    assert rc == 0 and seen["quick"] is True and seen["domains"] == ["nlp"] and seen["onnx"] is False
    rows = json.loads(out.read_text())
    assert rows and all(set(r) == set(ROW_FIELDS) for r in rows)
    assert "## nlp" in capsys.readouterr().out


def test_technique_names_are_unique_and_float_first():
    names = [t.name for t in TECHNIQUES]
    assert names[0] == "float" and len(names) == len(set(names))
    with pytest.raises(ValueError, match="unknown domain"):
        domains.builders("audio")


@pytest.mark.parametrize("name", ["task", "common", "checks", "report", "suite", "techniques"])
def test_module_examples_run(name):
    import doctest
    import importlib

    module = importlib.import_module(f"lowbit.domains.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("name", ["QAT 4-bit", "pruned 50% + int8"])
def test_training_rows_do_not_depend_on_what_ran_before(name):
    """A cold cache trains the float model on the same batches first; a warm one does not. The
    fine-tuning rows must give one result either way (and within a --quick share of each pass)."""
    from lowbit.domains.common import FirstBatches
    from lowbit.domains.techniques import technique

    task = _toy_task(quick=True)
    task.train_data = FirstBatches(task.train_data, 2)
    first = technique(name).build(task)
    for _ in range(3):  # advance the shuffling and the global RNG, as training the model would
        list(task.train_data)
        torch.rand(7)
    again = technique(name).build(task)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(first(x)[0], again(x)[0])


def test_prebuild_trains_in_workers_and_tolerates_failures(tmp_path, monkeypatch):
    import os
    import textwrap

    from lowbit.domains.prebuild import Job, prebuild

    marker = tmp_path / "marker"
    (tmp_path / "lowbit_test_prebuild_domain.py").write_text(
        textwrap.dedent(
            f"""
            import os, torch

            def _ok(quick):
                with open({str(marker)!r}, "w") as f:
                    f.write(f"{{quick}} {{torch.get_num_threads()}} {{os.getpid()}}")

            def _broken(quick):
                raise FileNotFoundError("no data here")

            BUILDERS = {{"ok": _ok, "broken": _broken}}
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers get the parent's sys.path
    module = "lowbit_test_prebuild_domain"
    seconds = prebuild([Job(module, ("ok",)), Job(module, ("broken",))], quick=True, workers=2, kernel=False)
    quick, threads, pid = marker.read_text().split()
    assert quick == "True" and int(pid) != os.getpid()
    assert int(threads) == max(1, torch.get_num_threads() // 2)  # the cores shared between workers
    assert seconds[f"{module}: ok"] >= 0 and seconds[f"{module}: broken"] is None
