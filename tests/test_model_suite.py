"""The outside model suite (issue 15 acceptance) on small configs: every model through every verb.

Every model runs ``int8-dynamic`` and ``int4-weight-only``; each other preset runs on a few models
(the full matrix is ``bench/model_suite.py``, its table ``docs/models.md``). A cell passes when
quantize, forward, save / load (bit-identical), ``export_onnx`` run by ONNX Runtime (same output
shapes, matching PyTorch) and ``evaluate`` all work and the fidelity floor of its preset is met
(floors and their reasons: ``bench/model_suite.py``). Deselect with ``-m "not suite"``.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import model_suite as suite  # noqa: E402
import outside_models  # noqa: E402

pytestmark = pytest.mark.suite

BASE = ("int8-dynamic", "int4-weight-only")
# Every other preset on a few models of different kinds (token / vision / ours).
EXTRA = {
    "int8-static": ("bert", "resnet", "crnn"),
    "int4-gptq": ("gpt2", "audio"),
    "int4-awq": ("llama", "tagger"),
    "fp8": ("distilbert", "vit"),
    "nf4": ("whisper", "audio"),
    "qat": ("gpt2", "vit", "tagger"),
}
CELLS = [(m, p) for m in outside_models.BUILDERS for p in BASE] + [
    (m, p) for p, models in EXTRA.items() for m in models
]


@functools.cache
def _built(name: str) -> outside_models.Built:
    return outside_models.build(name, "small")


@pytest.mark.parametrize(("model", "preset"), CELLS, ids=[f"{m}-{p}" for m, p in CELLS])
def test_cell_runs_every_verb(tmp_path, model, preset):
    if model in outside_models.HF_MODELS:
        pytest.importorskip("transformers")
    built = _built(model)
    cell = suite.run_cell(built, model, preset, tmp_path)
    assert cell.status == "ok", cell.error
    assert cell.verbs == list(suite.VERBS)
    assert cell.reload_identical and cell.ort_shapes_equal
    assert cell.ort_cosine >= suite.ORT_COSINE or cell.ort_rel_diff <= suite.ORT_REL_DIFF
    assert cell.cosine >= cell.floor()
    assert abs(cell.eval_cosine - cell.cosine) < 1e-4
    if built.classifier:
        assert cell.top1 is not None and 0.0 <= cell.top1 <= 1.0


def test_every_preset_and_model_is_covered():
    presets = {p for _m, p in CELLS}
    assert presets == set(suite.PRESETS)
    for name in outside_models.BUILDERS:
        assert {p for m, p in CELLS if m == name} >= set(BASE)
    for preset in suite.PRESETS:
        assert sum(p == preset for _m, p in CELLS) >= 2


def test_a_cell_records_a_lowbit_refusal_and_a_crash_apart(tmp_path):
    """The runner tells a documented refusal (a lowbit error type) from a crash (a bug)."""
    built = _built("tagger")
    refused = suite.run_cell(built, "tagger", "no-such-preset", tmp_path)
    assert refused.status == "refused" and "RecipeError" in refused.error

    class Broken(torch.nn.Module):  # model code that fails: not lowbit's error, so a crash
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not torch.is_grad_enabled():
                raise RuntimeError("boom")
            return self.fc(x)

    broken = outside_models.Built(Broken(), [torch.randn(2, 3)], [torch.randn(2, 3)])
    crashed = suite.run_cell(broken, "broken", "int8-dynamic", tmp_path)
    assert crashed.status == "crash" and "RuntimeError: boom" in crashed.error


def test_the_crnn_exports_static_and_says_so(tmp_path):
    """Adaptive pooling to (None, 1) cannot have free ONNX axes: a warned static export."""
    cell = suite.run_cell(_built("crnn"), "crnn", "int8-dynamic", tmp_path)
    assert cell.status == "ok", cell.error
    assert any("static shapes" in w for w in cell.export_warnings)
