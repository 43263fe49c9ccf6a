"""The four numeric primitives every other part of lowbit is built from.

``choose_qparams`` picks scales / zero points / codebooks for a tensor, ``quantize`` maps values to
integer codes, ``dequantize`` maps codes back, ``fake_quantize`` does both with a straight-through
gradient for training. One routine serves every granularity (see ``lowbit.granularity``) and every
format family (see ``lowbit.formats``). Arithmetic runs in float32 whatever the input dtype, on the
input's device.

>>> import torch, lowbit.formats as F
>>> from lowbit.granularity import PerChannel
>>> w = torch.randn(16, 64)
>>> qp = choose_qparams(w, F.get("int4"), PerChannel(0))
>>> codes = quantize(w, F.get("int4"), qp)
>>> codes.dtype, int(codes.min()) >= -8, dequantize(codes, F.get("int4"), qp).shape
(torch.int8, True, torch.Size([16, 64]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from lowbit.formats import Format
from lowbit.granularity import (
    Granularity,
    PerTensor,
    block_dims,
    block_shape,
    blocked_shape,
    expand_params,
    from_blocks,
    to_blocks,
)

# Smallest scale we allow: a zero-range block (all zeros) would otherwise divide by zero.
# Same value PyTorch's observers use, which keeps the int8 path bit-exact with theirs.
EPS = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class QParams:
    """Everything needed to turn codes back into values, for one tensor.

    Attributes:
        scale: float32, one per block (shape ``blocked_shape(x.shape, block)``).
        zero_point: int32 like ``scale`` for asymmetric integer formats, else ``None`` (zero).
        block: the block shape the parameters apply to.
        codebook: learned values: ``[*scale.shape, 2**bits]`` for codebook formats,
            ``[n_subspaces, 2**bits, dim]`` for product quantization; else ``None``.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor | None
    block: tuple[int, ...]
    codebook: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> QParams:
        """The same parameters on another device."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self, scale=move(self.scale), zero_point=move(self.zero_point), codebook=move(self.codebook)
        )


def check_finite(x: torch.Tensor, what: str = "tensor") -> None:
    """Raise a ``ValueError`` naming ``what`` if ``x`` holds NaN or Inf.

    >>> check_finite(torch.tensor([1.0, float("nan")]), "layer fc1 weight")
    Traceback (most recent call last):
    ...
    ValueError: layer fc1 weight contains 1 NaN and 0 Inf values; clean or retrain the model before quantizing
    """
    if not x.is_floating_point() or x.numel() == 0:
        return
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
    block's largest magnitude onto the grid's largest value.
    """
    min_val = torch.minimum(min_val.float(), torch.zeros_like(min_val, dtype=torch.float32))
    max_val = torch.maximum(max_val.float(), torch.zeros_like(max_val, dtype=torch.float32))
    amax = torch.maximum(-min_val, max_val)
    if fmt.family == "int":
        if symmetric:
            top = fmt.qmax if fmt.qmax > 0 else -fmt.qmin
            scale = torch.clamp(amax / top, min=EPS)
            return QParams(scale, None, block)
        steps = float(fmt.qmax - fmt.qmin)
        scale = (max_val - min_val) / steps
        # A range wider than the largest float32 (-3e38..3e38) overflows the subtraction; only there
        # divide first (and saturate: uint1 has one step), so the usual path stays bit-exact with
        # PyTorch's observers.
        wide = (max_val / steps - min_val / steps).clamp(max=torch.finfo(torch.float32).max)
        scale = torch.where(torch.isfinite(scale), scale, wide)
        scale = torch.clamp(scale, min=EPS)
        zp = fmt.qmin - torch.round(min_val / scale).to(torch.int32)
        return QParams(scale, torch.clamp(zp, fmt.qmin, fmt.qmax).to(torch.int32), block)
    if fmt.family == "grid":
        return QParams(torch.clamp(amax / fmt.grid_max, min=EPS), None, block)
    raise ValueError(f"format {fmt.name} ({fmt.family}) does not take its parameters from a range")


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
    bshape = blocked_shape(tuple(x.shape), block)
    if fmt.family == "float":
        return QParams(torch.ones((), device=x.device), None, tuple(x.shape))
    if fmt.family == "vector":
        from lowbit.algorithms.pq import fit_pq

        codebook = fit_pq(_as_matrix(x.float()), fmt.bits, fmt.vector_dim)
        return QParams(torch.ones((), device=x.device), None, tuple(x.shape), codebook)
    if x.numel() == 0:
        return QParams(torch.ones(bshape, device=x.device), None, block)
    xb = to_blocks(x.float(), block)
    dims = block_dims(x.dim())
    if fmt.family == "codebook":
        grid = _learn_block_grids(x, xb, block, fmt)
        return QParams(torch.ones(bshape, device=x.device), None, block, grid.reshape(*bshape, fmt.levels))
    if fmt.scale_rule == "mean_abs" or fmt.scale_rule == "twn":
        scale = _mean_abs_scale(x, xb, block, dims, twn=fmt.scale_rule == "twn")
        return QParams(torch.clamp(scale * clip_ratio, min=EPS), None, block)
    if x.dim() == 0:
        return qparams_from_range(x.float() * clip_ratio, x.float() * clip_ratio, fmt, block, symmetric)
    lo = xb.amin(dim=dims) * clip_ratio
    hi = xb.amax(dim=dims) * clip_ratio
    return qparams_from_range(lo, hi, fmt, block, symmetric)


def _learn_block_grids(
    x: torch.Tensor, xb: torch.Tensor, block: tuple[int, ...], fmt: Format
) -> torch.Tensor:
    """One learned grid per block, ``[n_blocks, levels]``, from the block's real values only.

    The zero padding of partial blocks (a group cut short at the end of a row) must not be learned:
    it would pull centroids and quantiles towards zero, and a constant block would lose exactness.
    Partial blocks are grouped by which of their entries are real and learned group by group.
    """
    from lowbit.algorithms.kmeans import learn_grid

    learner = fmt.learner or "kmeans"
    rows = _blocks_as_rows(xb)
    real = _blocks_as_rows(to_blocks(torch.ones_like(x, dtype=torch.float32), block)) > 0
    partial = ~real.all(dim=1)
    if not bool(partial.any()):
        return learn_grid(rows, fmt.levels, learner)
    grid = torch.empty(rows.shape[0], fmt.levels, device=rows.device)
    whole = ~partial
    if bool(whole.any()):
        grid[whole] = learn_grid(rows[whole], fmt.levels, learner)
    partial_rows = torch.nonzero(partial).reshape(-1)
    patterns, which = torch.unique(real[partial_rows], dim=0, return_inverse=True)
    for k, pattern in enumerate(patterns):
        members = partial_rows[which == k]
        grid[members] = learn_grid(rows[members][:, pattern], fmt.levels, learner)
    return grid


def _mean_abs_scale(
    x: torch.Tensor, xb: torch.Tensor, block: tuple[int, ...], dims: tuple[int, ...], twn: bool
) -> torch.Tensor:
    """Binary: mean |x| per block (L2-optimal for sign). Ternary: TWN's mean of |x| above 0.7 E|x|."""
    mag = xb.abs()
    count = to_blocks(torch.ones_like(x, dtype=torch.float32), block)  # padding does not count
    # Sums in float64: a float32 sum of values near 3e38 overflows although their mean does not.
    mean = (mag.sum(dim=dims, dtype=torch.float64) / count.sum(dim=dims).clamp(min=1)).float()
    if not twn:
        return mean
    delta = expand_params(0.7 * mean, x.dim())
    keep = (mag > delta).float() * count
    kept = (mag * keep).sum(dim=dims, dtype=torch.float64)
    return (kept / keep.sum(dim=dims).clamp(min=1)).float()


# --- codes ------------------------------------------------------------------------------------------


def quantize(x: torch.Tensor, fmt: Format, qparams: QParams) -> torch.Tensor:
    """Map values to codes (``fmt.code_dtype``, unpacked, same shape as ``x``).

    Integer codes are the signed/unsigned integers themselves; grid and codebook codes are indices
    into the (sign-magnitude) grid; product-quantization codes are ``[rows, n_subspaces]``.
    """
    check_finite(x)
    if fmt.family == "float":
        fmax = torch.finfo(fmt.torch_dtype).max
        return x.float().clamp(-fmax, fmax).to(fmt.torch_dtype)  # saturate instead of overflowing to inf
    if fmt.family == "vector":
        from lowbit.algorithms.pq import encode_pq

        return encode_pq(_as_matrix(x.float()), _codebook(qparams, fmt))
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=fmt.code_dtype, device=x.device)
    nd = x.dim()
    xb = to_blocks(x.float(), qparams.block)
    if fmt.family == "int":
        inv_scale = expand_params(1.0 / qparams.scale, nd)  # multiply by 1/scale as PyTorch does: bit-exact
        q = torch.round(xb * inv_scale)
        if qparams.zero_point is not None:
            q = q + expand_params(qparams.zero_point, nd)
        codes = torch.clamp(q, fmt.qmin, fmt.qmax)
    elif fmt.family == "grid":
        codes = round_to_grid(xb / expand_params(qparams.scale, nd), fmt)
    elif fmt.family == "codebook":
        codes = _nearest_in_codebook(xb, _codebook(qparams, fmt))
    else:
        raise ValueError(f"cannot quantize to format family {fmt.family!r}")
    return from_blocks(codes, tuple(x.shape)).to(fmt.code_dtype)


def dequantize(
    codes: torch.Tensor, fmt: Format, qparams: QParams, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Map codes back to values of ``dtype``."""
    if fmt.family == "float":
        return codes.to(dtype)
    if fmt.family == "vector":
        from lowbit.algorithms.pq import decode_pq

        shape = qparams.block
        cols = _as_matrix(torch.empty(shape, device="meta")).shape[1]  # the matrix view quantize used
        return decode_pq(codes, _codebook(qparams, fmt), cols).reshape(shape).to(dtype)
    shape = tuple(codes.shape)
    if codes.numel() == 0:
        return torch.empty(shape, dtype=dtype, device=codes.device)
    nd = codes.dim()
    cb = to_blocks(codes.to(torch.int32 if fmt.family == "int" else torch.long), qparams.block)
    if fmt.family == "int":
        q = cb.float()
        if qparams.zero_point is not None:
            q = q - expand_params(qparams.zero_point, nd).float()
        values = q * expand_params(qparams.scale, nd)
    elif fmt.family == "grid":
        table = grid_table(fmt, codes.device)
        values = table[cb] * expand_params(qparams.scale, nd)
    elif fmt.family == "codebook":
        values = _gather_codebook(cb, _codebook(qparams, fmt))
    else:
        raise ValueError(f"cannot dequantize format family {fmt.family!r}")
    return from_blocks(values, shape).to(dtype)


class _FakeQuantSTE(torch.autograd.Function):
    """Forward: quantize-dequantize. Backward: pass the gradient where the value was representable
    (the clipped straight-through estimator of QAT), zero where it was clamped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fmt: Format, qparams: QParams) -> torch.Tensor:  # type: ignore[override]
        out = dequantize(quantize(x, fmt, qparams), fmt, qparams, dtype=x.dtype)
        ctx.save_for_backward(_inside_range(x, fmt, qparams))
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


def _inside_range(x: torch.Tensor, fmt: Format, qparams: QParams) -> torch.Tensor:
    if fmt.family not in ("int", "grid") or x.numel() == 0:
        return torch.ones_like(x, dtype=torch.bool)
    nd = x.dim()
    xb = to_blocks(x.detach().float(), qparams.block)
    if fmt.family == "int":
        q = torch.round(xb * expand_params(1.0 / qparams.scale, nd))
        if qparams.zero_point is not None:
            q = q + expand_params(qparams.zero_point, nd)
        inside = (q >= fmt.qmin) & (q <= fmt.qmax)
    else:
        limit = fmt.grid_max * expand_params(qparams.scale, nd)
        inside = xb.abs() <= limit
    return from_blocks(inside, tuple(x.shape))


# --- grids ---------------------------------------------------------------------------------------


def grid_table(fmt: Format, device: torch.device | str = "cpu") -> torch.Tensor:
    """Value of every code of a ``grid`` format (index = code), float32."""
    mags = torch.tensor(fmt.grid, dtype=torch.float32, device=device)
    if not fmt.sign_magnitude:
        return mags
    table = torch.zeros(fmt.levels, dtype=torch.float32, device=device)
    half = fmt.levels // 2
    table[: len(mags)] = mags
    table[half : half + len(mags)] = -mags
    return table


def round_to_grid(y: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Codes of the nearest grid value; ties go to the even index (IEEE RNE for minifloats).

    Values beyond the grid saturate to its extreme value.
    """
    values = torch.tensor(fmt.grid, dtype=torch.float32, device=y.device)
    target = y.abs() if fmt.sign_magnitude else y
    idx = _nearest_index_ties_even(target, values)
    if fmt.sign_magnitude:
        # signbit, not y < 0: -0.0 keeps its sign code (the IEEE bit pattern), so that a negative value
        # that rounded to zero dequantizes to -0.0 and quantizes back to the same code.
        idx = torch.where(torch.signbit(y), idx | (fmt.levels // 2), idx)
    return idx


def _nearest_index_ties_even(y: torch.Tensor, sorted_values: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of a sorted 1-D table; exact ties go to the even index."""
    if sorted_values.numel() == 1:
        return torch.zeros_like(y, dtype=torch.long)
    mid = (sorted_values[1:] + sorted_values[:-1]) / 2
    idx = torch.bucketize(y, mid)  # mid[i-1] < y <= mid[i]  ->  i (the lower neighbour on a tie)
    on_tie = (idx < mid.numel()) & (y == mid[idx.clamp(max=mid.numel() - 1)])
    return torch.where(on_tie & (idx % 2 == 1), idx + 1, idx)


# --- learned codebooks -------------------------------------------------------------------------------


def _codebook(qparams: QParams, fmt: Format) -> torch.Tensor:
    if qparams.codebook is None:
        raise ValueError(f"format {fmt.name} needs a codebook in its QParams; call choose_qparams first")
    return qparams.codebook


def _blocks_as_rows(xb: torch.Tensor) -> torch.Tensor:
    """``[n0, b0, n1, b1, ...]`` -> ``[n0*n1*..., b0*b1*...]``: one row of values per block."""
    nd = xb.dim() // 2
    order = list(range(0, 2 * nd, 2)) + list(range(1, 2 * nd, 2))
    n = 1
    for d in range(0, 2 * nd, 2):
        n *= xb.shape[d]
    return xb.permute(order).reshape(n, -1)


def _rows_as_blocks(rows: torch.Tensor, like: torch.Size) -> torch.Tensor:
    """Inverse of ``_blocks_as_rows`` for a blocked view shaped ``like``."""
    nd = len(like) // 2
    order = list(range(0, 2 * nd, 2)) + list(range(1, 2 * nd, 2))
    permuted = rows.reshape([like[d] for d in order])
    inverse = [order.index(d) for d in range(2 * nd)]
    return permuted.permute(inverse)


def _nearest_in_codebook(xb: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    rows = _blocks_as_rows(xb)
    grid = codebook.reshape(rows.shape[0], -1).float()  # sorted per block
    mid = (grid[:, 1:] + grid[:, :-1]) / 2
    codes = torch.searchsorted(mid.contiguous(), rows.contiguous())
    return _rows_as_blocks(codes, xb.shape)


def _gather_codebook(cb: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    rows = _blocks_as_rows(cb)
    grid = codebook.reshape(rows.shape[0], -1).float()
    return _rows_as_blocks(torch.gather(grid, 1, rows), cb.shape)


def _as_matrix(x: torch.Tensor) -> torch.Tensor:
    """Weights as ``[rows, cols]`` (convolution kernels flattened per output channel)."""
    if x.dim() == 0:
        return x.reshape(1, 1)
    if x.dim() == 1:
        return x.reshape(1, -1)
    # Not reshape(rows, -1): with zero rows the column count would be ambiguous.
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))
