"""SmoothQuant (Xiao et al., 2022): move activation outliers into the weights before W8A8.

Transformer activations have a few channels with values 10-100x the others, so a per-tensor
activation scale wastes almost all int8 levels on them. Weights are easy to quantize by
comparison. Dividing input channel ``j`` by ``s_j`` and multiplying weight column ``j`` by ``s_j``
keeps ``x W^T`` unchanged and balances the two difficulties:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

``alpha = 0.5`` splits the range evenly; larger ``alpha`` pushes more onto the weights. The
division of the activations is folded into the previous operation (a LayerNorm's affine
parameters or a preceding linear layer) by the model adapter, not here.

>>> import torch
>>> act_max = torch.tensor([1.0, 100.0])
>>> w = torch.tensor([[1.0, 1.0]])
>>> smoothquant_scales(act_max, w, alpha=0.5).tolist()
[1.0, 10.0]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lowbit.primitives import check_finite

# The paper's code floors the scales; we bound both ends so that one wild channel cannot make
# the folded LayerNorm weight or the scaled weight overflow in half precision.
MIN_SCALE = 1e-5
MAX_SCALE = 1e5


def channel_absmax(x: torch.Tensor) -> torch.Tensor:
    """Per-channel ``max |x|`` (float32 ``[in]``) over all leading dimensions of ``x`` ``[..., in]``.

    >>> channel_absmax(torch.tensor([[1.0, -3.0], [-2.0, 0.5]])).tolist()
    [2.0, 3.0]
    """
    return x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=0).float()


def smoothquant_scales(
    act_absmax: torch.Tensor,
    weight: torch.Tensor | Sequence[torch.Tensor],
    alpha: float = 0.5,
) -> torch.Tensor:
    """Smoothing scales ``s`` (float32 ``[in]``): use ``x / s`` and ``w * s``.

    Args:
        act_absmax: per-input-channel ``max |x|`` over calibration data (``channel_absmax`` or
            an observer's running max).
        weight: ``[out, in]``, or every weight that reads this input (q, k, v): their column
            maxima are combined, since one ``s`` divides the shared input.
        alpha: migration strength in ``[0, 1]``.

    Channels that never fire, or whose weights are all zero, get ``s = 1``: there is nothing to
    balance, and a zero would make the scaled input infinite.

    >>> smoothquant_scales(torch.tensor([0.0, 4.0]), torch.ones(2, 2), alpha=1.0).tolist()
    [1.0, 4.0]
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    weights = [weight] if isinstance(weight, torch.Tensor) else list(weight)
    if not weights:
        raise ValueError("SmoothQuant needs at least one weight")
    act = act_absmax.detach().float().reshape(-1)
    cols = act.shape[0]
    for w in weights:
        if w.dim() != 2 or w.shape[1] != cols:
            raise ValueError(
                f"weights must be 2-d [out, in] with in={cols} (the size of act_absmax), got {tuple(w.shape)}"
            )
        check_finite(w, "SmoothQuant weight")
    check_finite(act, "SmoothQuant activation maxima")
    w_max = torch.stack([w.detach().abs().amax(dim=0).float().to(act.device) for w in weights]).amax(dim=0)
    act = act.abs()
    s = act.pow(alpha) / w_max.pow(1.0 - alpha)
    idle = (act == 0) | (w_max == 0) | ~torch.isfinite(s)
    return torch.where(idle, torch.ones_like(s), s).clamp(MIN_SCALE, MAX_SCALE)
