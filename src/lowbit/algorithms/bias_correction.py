"""Bias correction (Nagel et al., 2019, "Data-free quantization"): remove the mean output shift.

Rounding errors of a weight channel rarely cancel exactly, so the quantized layer's output is
shifted on average: ``E[y_float] - E[y_quant] = (W - Q) E[x]`` for a linear layer. That shift
passes through every following layer (and ReLUs turn it into real errors); adding it to the
bias removes the mean error for free at inference time. Two ways to estimate it:

- ``expected_output_shift``: from the mean of the calibration inputs per input channel
  (exact for linear layers; for convolutions it ignores zero padding at the borders);
- ``output_shift``: from float and quantized outputs on the same calibration batch (exact for
  any layer, at the price of running both).

>>> import torch
>>> w = torch.tensor([[0.26, 0.74]]); q = torch.tensor([[0.25, 0.75]])
>>> round(float(expected_output_shift(w, q, torch.tensor([2.0, 1.0]))), 6)  # 0.01*2 - 0.01*1
0.01
"""

from __future__ import annotations

import torch

from lowbit.primitives import check_finite


def expected_output_shift(
    weight: torch.Tensor, qweight: torch.Tensor, input_mean: torch.Tensor, groups: int = 1
) -> torch.Tensor:
    """``E[y_float] - E[y_quant]`` per output channel (float32 ``[out]``); add it to the bias.

    Args:
        weight, qweight: float and dequantized weights, ``[out, in]`` (linear) or
            ``[out, in / groups, *kernel]`` (convolution).
        input_mean: mean input per input channel ``[in]`` (over batch and spatial positions).
        groups: the convolution's ``groups``.

    >>> w = torch.ones(2, 3, 3, 3); q = w * 0.9
    >>> [round(v, 4) for v in expected_output_shift(w, q, torch.ones(3)).tolist()]  # 27 taps x 0.1
    [2.7, 2.7]
    """
    if weight.shape != qweight.shape:
        raise ValueError(f"weight {tuple(weight.shape)} and qweight {tuple(qweight.shape)} differ in shape")
    if weight.dim() < 2:
        raise ValueError(f"expected a weight [out, in, ...], got shape {tuple(weight.shape)}")
    out, in_per_group = weight.shape[:2]
    if groups < 1 or out % groups:
        raise ValueError(f"groups={groups} must divide the {out} output channels")
    mean = input_mean.detach().float().reshape(-1).to(weight.device)
    if mean.numel() != in_per_group * groups:
        raise ValueError(
            f"input_mean has {mean.numel()} channels, the weight expects {in_per_group * groups}"
        )
    check_finite(mean, "bias-correction input mean")
    # Each kernel tap sees the same channel mean, so the taps' errors add up per input channel.
    delta = (weight.detach().float() - qweight.detach().float()).reshape(out, in_per_group, -1).sum(-1)
    delta = delta.reshape(groups, out // groups, in_per_group)
    shift = torch.einsum("goi,gi->go", delta, mean.reshape(groups, in_per_group))
    return shift.reshape(out)


def output_shift(y_float: torch.Tensor, y_quant: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
    """Mean of ``y_float - y_quant`` over every dimension but ``channel_dim`` (float32 ``[C]``).

    Use ``channel_dim=1`` for convolution outputs ``[N, C, ...]`` and ``-1`` for linear outputs.

    >>> output_shift(torch.ones(4, 3, 5, 5), torch.zeros(4, 3, 5, 5)).tolist()
    [1.0, 1.0, 1.0]
    """
    if y_float.shape != y_quant.shape:
        raise ValueError(f"outputs differ in shape: {tuple(y_float.shape)} vs {tuple(y_quant.shape)}")
    diff = (y_float.detach().float() - y_quant.detach().float()).movedim(channel_dim, 0)
    return diff.reshape(diff.shape[0], -1).mean(dim=1)
