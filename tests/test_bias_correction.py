"""Bias correction: the mean output error of a quantized layer shrinks once the shift is added back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit.formats as F
from lowbit.algorithms.bias_correction import expected_output_shift, output_shift
from lowbit.granularity import PerTensor
from lowbit.primitives import fake_quantize_tensor


def post_relu(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Non-negative inputs with a large mean, as after a ReLU: the case where the shift matters."""
    return torch.relu(torch.randn(shape, generator=gen) + 0.5)


def mean_abs_channel_error(y: torch.Tensor, y_hat: torch.Tensor, channel_dim: int) -> float:
    return float(output_shift(y, y_hat, channel_dim).abs().mean())


def test_linear_shift_from_input_mean_removes_the_mean_error(gen) -> None:
    layer = nn.Linear(64, 32)
    with torch.no_grad():
        layer.weight.normal_(generator=gen)
    x_cal, x_test = post_relu((512, 64), gen), post_relu((4096, 64), gen)
    qweight = fake_quantize_tensor(layer.weight.detach(), F.get("int3"), PerTensor())
    shift = expected_output_shift(layer.weight, qweight, x_cal.mean(0))
    assert shift.shape == (32,) and shift.dtype == torch.float32
    with torch.no_grad():
        y = layer(x_test)
        y_q = nn.functional.linear(x_test, qweight, layer.bias)
        y_corrected = nn.functional.linear(x_test, qweight, layer.bias + shift)
    before = mean_abs_channel_error(y, y_q, -1)
    after = mean_abs_channel_error(y, y_corrected, -1)
    assert after < 0.15 * before  # only sampling noise of the mean remains
    # Squared error falls too: the mean shift was part of it.
    assert float(((y - y_corrected) ** 2).mean()) < float(((y - y_q) ** 2).mean())


@pytest.mark.parametrize("groups", [1, 4])
def test_conv_shift_from_input_mean(groups: int, gen) -> None:
    conv = nn.Conv2d(8, 16, 3, padding=0, groups=groups)
    x_cal, x_test = post_relu((32, 8, 10, 10), gen), post_relu((128, 8, 10, 10), gen)
    qweight = fake_quantize_tensor(conv.weight.detach(), F.get("int3"), PerTensor())
    shift = expected_output_shift(conv.weight, qweight, x_cal.mean(dim=(0, 2, 3)), groups=groups)
    with torch.no_grad():
        y = conv(x_test)
        y_q = nn.functional.conv2d(x_test, qweight, conv.bias, groups=groups)
        y_c = nn.functional.conv2d(x_test, qweight, conv.bias + shift, groups=groups)
    assert mean_abs_channel_error(y, y_c, 1) < 0.15 * mean_abs_channel_error(y, y_q, 1)


def test_conv_shift_from_outputs_handles_padding(gen) -> None:
    """With zero padding the input-mean estimate is off at the borders; measured outputs are exact."""
    conv = nn.Conv2d(6, 12, 3, padding=1)
    x_cal, x_test = post_relu((64, 6, 6, 6), gen), post_relu((256, 6, 6, 6), gen)
    qweight = fake_quantize_tensor(conv.weight.detach(), F.get("int3"), PerTensor())
    with torch.no_grad():
        shift = output_shift(conv(x_cal), nn.functional.conv2d(x_cal, qweight, conv.bias, padding=1), 1)
        y = conv(x_test)
        y_q = nn.functional.conv2d(x_test, qweight, conv.bias, padding=1)
        y_c = nn.functional.conv2d(x_test, qweight, conv.bias + shift, padding=1)
    assert mean_abs_channel_error(y, y_c, 1) < 0.15 * mean_abs_channel_error(y, y_q, 1)


def test_zero_error_means_zero_shift(gen) -> None:
    w = torch.randn(5, 7, generator=gen)
    assert torch.equal(expected_output_shift(w, w, torch.rand(7, generator=gen)), torch.zeros(5))
    y = torch.randn(3, 5, generator=gen)
    assert torch.equal(output_shift(y, y, -1), torch.zeros(5))


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        expected_output_shift(torch.ones(2, 3), torch.ones(2, 4), torch.ones(3))
    with pytest.raises(ValueError, match="expects 3"):
        expected_output_shift(torch.ones(2, 3), torch.ones(2, 3), torch.ones(4))
    with pytest.raises(ValueError, match="groups=3"):
        expected_output_shift(torch.ones(4, 2, 1, 1), torch.ones(4, 2, 1, 1), torch.ones(6), groups=3)
