"""Loss you can see: silent large losses become named warnings; small activations keep their scale."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lowbit
from lowbit.ptq.fidelity import LAYER_COSINE


class _SmallActivations(nn.Module):
    """A CNN whose activations sit near 1e-7 (as a randomly initialised deep net's can): under the old
    absolute scale floor (float32 eps) int8-static zeroed every output without a word."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)
        with torch.no_grad():
            self.conv.weight.mul_(1e-6)
            self.conv.bias.mul_(1e-6)
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_small_activations_keep_their_scale_under_int8_static():
    torch.manual_seed(0)
    model = _SmallActivations().eval()
    calib = [torch.randn(16, 3, 8, 8) for _ in range(8)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sample-count advice
        q = lowbit.quantize(model, "int8-static", calibration=calib, progress=False)
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        out, ref = q(x), model(x)
    assert ref.abs().max() < 1e-5  # the activations really are tiny
    assert out.abs().max() > 0
    assert nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99
    assert q.lowbit_fidelity.output > 0.99


def test_a_layer_that_loses_its_output_is_named_with_what_to_try():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    calib = [torch.randn(32, 64) for _ in range(4)]
    with pytest.warns(UserWarning, match=r"cosine below 0\.98.*: 0 \(binary: 0\.\d+\).*8 bits") as caught:
        q = lowbit.quantize(model, {"weight": {"format": "binary"}, "exclude": ["2"]}, calibration=calib,
                            progress=False)  # fmt: skip
    assert q.lowbit_fidelity.layers["0"] < LAYER_COSINE
    assert "2" not in q.lowbit_fidelity.layers  # excluded: float, not checked
    assert any("lowbit.sensitivity" in str(w.message) for w in caught) == (q.lowbit_fidelity.output < 0.95)


def test_no_warning_where_quantization_is_faithful():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    calib = [torch.randn(32, 64) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = lowbit.quantize(model, "int8-weight-only", calibration=calib, progress=False)
    assert min(q.lowbit_fidelity.layers.values()) > 0.999
