"""``lowbit.runtime``: an exported model is called like the PyTorch model (same inputs, torch outputs)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.export.onnx import export_onnx
from lowbit.runtime import OrtModel, default_threads, load

pytest.importorskip("onnxruntime", reason="ONNX export tests need the onnx extra")


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * mask.unsqueeze(-1).float()


@pytest.fixture()
def exported(tmp_path):
    torch.manual_seed(0)
    q = lowbit.quantize(TwoInputs().eval(), "int8-dynamic", progress=False)
    x, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.long)
    export_onnx(q, tmp_path / "model.onnx", {"x": x, "mask": mask})
    return q, tmp_path


def test_positional_keyword_and_dict_calls_agree(exported):
    q, path = exported
    model = load(path)  # a directory holding model.onnx works too
    x, mask = torch.randn(3, 7, 16), torch.randint(0, 2, (3, 7))  # other batch and sequence sizes
    a = model(x, mask)
    b = model(x=x, mask=mask)
    c = model({"x": x, "mask": mask})
    assert isinstance(a, torch.Tensor) and a.shape == (3, 7, 8)
    assert torch.equal(a, b) and torch.equal(a, c)
    with torch.no_grad():
        ref = q(x, mask)
    # Stated tolerance: per-token int8 activations; ties may round differently (1e-4 of range).
    assert float((a - ref).abs().max()) <= 1e-4 * float(ref.abs().max()) + 1e-6


def test_backend_threads_and_layer_record(exported):
    _, path = exported
    model = OrtModel(path / "model.onnx", threads=1, spin=False)
    assert model.backend == "onnxruntime-cpu" and model.threads == 1
    assert model.input_names == ["x", "mask"]
    assert [x["kernel"] for x in model.layers] == ["MatMulIntegerToFloat"]
    assert default_threads() >= 1


def test_bad_inputs_are_clear_errors(exported):
    _, path = exported
    model = load(path / "model.onnx")
    with pytest.raises(ValueError, match="missing inputs"):
        model(torch.randn(1, 2, 16))
    with pytest.raises(ValueError, match="optimization must be"):
        OrtModel(path / "model.onnx", optimization="max")
