"""SmoothQuant math: migrating outliers lowers static W8A8 error, and the float output is unchanged."""

from __future__ import annotations

import pytest
import torch

import lowbit.formats as F
from lowbit.algorithms.smoothquant import channel_absmax, smoothquant_scales
from lowbit.granularity import PerChannel, PerTensor
from lowbit.primitives import choose_qparams, dequantize, quantize


def outlier_inputs(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, d, generator=gen)
    x[:, [3, 50, 91]] = x[:, [3, 50, 91]] * 40 + 20  # a few large, shifted channels, as in transformers
    return x


def w8a8_error(x_cal: torch.Tensor, x_test: torch.Tensor, w: torch.Tensor, symmetric_act: bool) -> float:
    """Static W8A8: activation range from calibration (per tensor), weights per output channel."""
    int8 = F.get("int8") if symmetric_act else F.get("uint8")
    act_qp = choose_qparams(x_cal, int8, PerTensor(), symmetric=symmetric_act)
    w_qp = choose_qparams(w, F.get("int8"), PerChannel(0), symmetric=True)
    xq = dequantize(quantize(x_test, int8, act_qp), int8, act_qp)
    wq = dequantize(quantize(w, F.get("int8"), w_qp), F.get("int8"), w_qp)
    return float(((x_test @ w.T - xq @ wq.T) ** 2).mean())


@pytest.mark.parametrize("symmetric_act", [True, False])
@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_smoothing_lowers_static_w8a8_error(symmetric_act: bool, alpha: float, gen) -> None:
    d = 128
    x_cal, x_test = outlier_inputs(512, d, gen), outlier_inputs(2048, d, gen)
    w = torch.randn(64, d, generator=gen) * 0.1
    s = smoothquant_scales(channel_absmax(x_cal), w, alpha)
    assert s.dtype == torch.float32 and s.shape == (d,)
    plain = w8a8_error(x_cal, x_test, w, symmetric_act)
    smoothed = w8a8_error(x_cal / s, x_test / s, w * s, symmetric_act)
    assert smoothed < 0.4 * plain  # measured 0.11-0.21


def test_float_output_is_unchanged(gen) -> None:
    x, w = outlier_inputs(64, 128, gen), torch.randn(8, 128, generator=gen)
    s = smoothquant_scales(channel_absmax(x), w)
    torch.testing.assert_close((x / s) @ (w * s).T, x @ w.T, rtol=1e-5, atol=1e-3)


def test_formula_and_shared_weights() -> None:
    act = torch.tensor([4.0, 9.0, 1.0])
    q = torch.tensor([[1.0, -1.0, 2.0]])
    k = torch.tensor([[4.0, 0.5, -1.0]])
    # Column maxima over both weights: [4, 1, 2].
    s = smoothquant_scales(act, [q, k], alpha=0.5)
    torch.testing.assert_close(s, torch.tensor([4.0**0.5 / 4**0.5, 9**0.5 / 1.0, 1.0 / 2**0.5]))
    # alpha = 0 puts everything on the activations: s = 1 / max|W_j|.
    torch.testing.assert_close(smoothquant_scales(act, [q, k], alpha=0.0), torch.tensor([0.25, 1.0, 0.5]))


def test_idle_channels_get_unit_scale() -> None:
    act = torch.tensor([0.0, 5.0, 3.0])
    w = torch.tensor([[1.0, 2.0, 0.0]])
    s = smoothquant_scales(act, w, alpha=0.5)
    assert s[0] == 1.0 and s[2] == 1.0 and s[1] == pytest.approx((5 / 2) ** 0.5)


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match="alpha"):
        smoothquant_scales(torch.ones(3), torch.ones(2, 3), alpha=1.5)
    with pytest.raises(ValueError, match="in=3"):
        smoothquant_scales(torch.ones(3), torch.ones(2, 4))
