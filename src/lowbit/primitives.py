"""The four numeric primitives every other part of lowbit is built from.

``choose_qparams`` picks scales / zero points / codebooks for a tensor, ``quantize`` maps values to
integer codes, ``dequantize`` maps codes back, ``fake_quantize`` does both with a straight-through
gradient for training. One routine serves every granularity (see ``lowbit.granularity``) and every
format family (see ``lowbit.formats``): each function checks its input once and hands over to the
family's codec (``lowbit.codecs.codec_for(fmt)``), so nothing here branches on the family.
Arithmetic runs in float32 whatever the input dtype, on the input's device.

>>> import torch, lowbit.formats as F
>>> from lowbit.granularity import PerChannel
>>> w = torch.randn(16, 64)
>>> qp = choose_qparams(w, F.get("int4"), PerChannel(0))
>>> codes = quantize(w, F.get("int4"), qp)
>>> codes.dtype, int(codes.min()) >= -8, dequantize(codes, F.get("int4"), qp).shape
(torch.int8, True, torch.Size([16, 64]))
"""

from __future__ import annotations

import torch

from lowbit.codecs import EPS, QParams, codec_for
from lowbit.codecs.fixedgrid import grid_table, round_to_grid
from lowbit.formats import Format
from lowbit.granularity import Granularity, PerTensor, block_shape

__all__ = [
    "EPS",
    "QParams",
    "check_finite",
    "choose_qparams",
    "dequantize",
    "fake_quantize",
    "fake_quantize_tensor",
    "grid_table",
    "qparams_from_range",
    "quantize",
    "round_to_grid",
]


def check_finite(x: torch.Tensor, what: str = "tensor") -> None:
    """Raise a ``ValueError`` naming ``what`` if ``x`` holds NaN or Inf.

    >>> check_finite(torch.tensor([1.0, float("nan")]), "layer fc1 weight")
    Traceback (most recent call last):
    ...
    ValueError: layer fc1 weight contains 1 NaN and 0 Inf values; clean or retrain the model before quantizing
    """
    if not x.is_floating_point() or x.numel() == 0:
        return
    # aminmax propagates NaN and Inf and reads x once without a boolean copy: ~25x faster than
    # isfinite(x).all() on a large weight, and this runs for every quantize / dequantize call.
    try:
        if bool(torch.isfinite(torch.stack(torch.aminmax(x))).all()):
            return
    except RuntimeError:  # a dtype without aminmax (fp8): the elementwise test below
        pass
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return
    nan = int(torch.isnan(x).sum())
    inf = int((~finite).sum()) - nan
    raise ValueError(
        f"{what} contains {nan} NaN and {inf} Inf values; clean or retrain the model before quantizing"
    )


# --- choosing parameters --------------------------------------------------------------------------


def qparams_from_range(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    fmt: Format,
    block: tuple[int, ...],
    symmetric: bool = True,
) -> QParams:
    """Scales (and zero points) from per-block ranges, as observers report them.

    Integer formats follow PyTorch's observers: the range is widened to include zero so that zero
    is exact; symmetric uses ``amax / qmax`` (every value representable, error <= step / 2),
    asymmetric ``(max - min) / (qmax - qmin)`` with an integer zero point. Grid formats map the
    block's largest magnitude onto the grid's largest value. Families whose codec does not
    ``takes_range`` (casts, learned codebooks) raise ``ValueError``.

    >>> import lowbit.formats as F
    >>> qparams_from_range(torch.tensor([-2.0]), torch.tensor([1.0]), F.get("int8"), (4,)).scale
    tensor([0.0157])
    """
    return codec_for(fmt).from_range(min_val, max_val, fmt, block, symmetric)


def choose_qparams(
    x: torch.Tensor,
    fmt: Format,
    granularity: Granularity = PerTensor(),
    symmetric: bool = True,
    clip_ratio: float = 1.0,
) -> QParams:
    """Choose quantization parameters for ``x`` from its own values (weights, dynamic activations).

    ``clip_ratio`` < 1 shrinks the range (what MSE-optimal clipping searches over).

    >>> import lowbit.formats as F
    >>> choose_qparams(torch.tensor([-1.0, 0.5]), F.get("int8")).scale
    tensor([0.0079])
    """
    check_finite(x)
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
    block = block_shape(granularity, x.shape)
    return codec_for(fmt).choose(x, fmt, block, symmetric, clip_ratio)


# --- codes ------------------------------------------------------------------------------------------


def quantize(x: torch.Tensor, fmt: Format, qparams: QParams) -> torch.Tensor:
    """Map values to codes (``fmt.code_dtype``, unpacked, same shape as ``x``).

    Integer codes are the signed/unsigned integers themselves; grid and codebook codes are indices
    into the (sign-magnitude) grid; product-quantization codes are ``[rows, n_subspaces]``.
    """
    check_finite(x)
    return codec_for(fmt).encode(x, fmt, qparams)


def dequantize(
    codes: torch.Tensor, fmt: Format, qparams: QParams, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Map codes back to values of ``dtype``."""
    return codec_for(fmt).decode(codes, fmt, qparams, dtype)


class _FakeQuantSTE(torch.autograd.Function):
    """Forward: quantize-dequantize. Backward: pass the gradient where the value was representable
    (the clipped straight-through estimator of QAT), zero where it was clamped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fmt: Format, qparams: QParams) -> torch.Tensor:  # type: ignore[override]
        out = dequantize(quantize(x, fmt, qparams), fmt, qparams, dtype=x.dtype)
        ctx.save_for_backward(codec_for(fmt).inside(x, fmt, qparams))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside.to(grad.dtype), None, None


def fake_quantize(x: torch.Tensor, fmt: Format, qparams: QParams) -> torch.Tensor:
    """Quantize then dequantize (same dtype as ``x``); gradients flow straight through.

    >>> import lowbit.formats as F
    >>> x = torch.tensor([0.1, -0.7, 0.33], requires_grad=True)
    >>> y = fake_quantize(x, F.get("int4"), choose_qparams(x.detach(), F.get("int4")))
    >>> y.sum().backward(); x.grad
    tensor([1., 1., 1.])
    """
    return _FakeQuantSTE.apply(x, fmt, qparams)


def fake_quantize_tensor(
    x: torch.Tensor, fmt: Format, granularity: Granularity = PerTensor(), symmetric: bool = True
) -> torch.Tensor:
    """``fake_quantize`` with parameters chosen from ``x`` itself (weight-only and dynamic paths).

    >>> import lowbit.formats as F
    >>> fake_quantize_tensor(torch.tensor([0.0, 1.0]), F.get("int8")).tolist()
    [0.0, 1.0]
    """
    return fake_quantize(x, fmt, choose_qparams(x.detach(), fmt, granularity, symmetric))
