"""GPTQ (Frantar et al., 2022): weight quantization with second-order error compensation.

A linear layer ``y = x W^T`` is quantized one input column at a time. The output error caused by
rounding column ``j`` is cancelled as well as possible by adjusting the columns not yet quantized,
using the layer's Hessian ``H = 2/n * sum x^T x`` over calibration inputs. The update needs the
inverse Hessian restricted to the remaining columns; the upper Cholesky factor of ``H^-1`` holds
exactly those rows, so it is computed once. Columns are processed in blocks whose updates to later
columns are applied lazily (one matrix product per block), which keeps the loop memory-bound on
a block instead of the whole matrix.

Everything here is pure tensor math: the caller collects inputs (``HessianAccumulator``, with
``conv_input_rows`` for convolutions) and decides what to do with the codes.

>>> import torch, lowbit.formats as F
>>> from lowbit.granularity import PerGroup
>>> from lowbit.primitives import dequantize
>>> g = torch.Generator().manual_seed(0)
>>> x = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated inputs
>>> w = torch.randn(32, 64, generator=g)
>>> acc = HessianAccumulator(64)
>>> acc.update(x)
>>> codes, qp = gptq_quantize(w, acc.hessian(), F.get("int4"), PerGroup(32))
>>> codes.shape, qp.scale.shape
(torch.Size([32, 64]), torch.Size([32, 2]))
>>> dequantize(codes, F.get("int4"), qp).shape
torch.Size([32, 64])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.algorithms.rtn import choose_weight_qparams
from lowbit.formats import Format
from lowbit.granularity import Granularity, PerChannel, PerGroup, PerTensor, block_shape
from lowbit.primitives import QParams, check_finite

# Default weight granularity: one scale per output channel (row).
PER_ROW = PerChannel(0)

# Observers that choose each group's scale inside GPTQ, and the weight algorithm that implements them.
OBSERVERS = {"minmax": "rtn", "mse": "mse"}

# How many times the damping is multiplied by 10 when a Hessian is not numerically positive definite.
DAMP_RETRIES = 6


class HessianAccumulator:
    """Streaming ``H = 2/n * sum_i x_i^T x_i`` over the rows of a layer's inputs (constant memory).

    Inputs may have any leading shape; the last dimension is ``in_features``. Two accumulators
    over different data merge into the accumulator of all the data (``merge``), so calibration
    can be split across processes or devices.

    >>> acc, a, b = HessianAccumulator(3), HessianAccumulator(3), HessianAccumulator(3)
    >>> x = torch.arange(24.0).reshape(2, 4, 3)
    >>> acc.update(x); a.update(x[0]); b.update(x[1])
    >>> torch.equal(a.merge(b).hessian(), acc.hessian()), acc.count
    (True, 8)
    """

    def __init__(
        self, in_features: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> None:
        if in_features < 1:
            raise ValueError(f"in_features must be >= 1, got {in_features}")
        self.in_features = in_features
        # The unnormalised sum: merging is then exact addition and n is only applied on read.
        self.xtx = torch.zeros(in_features, in_features, device=device, dtype=dtype)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` (shape ``[..., in_features]``)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"input has last dimension {x.shape[-1]}, expected in_features={self.in_features}"
            )
        rows = x.detach().reshape(-1, self.in_features).to(device=self.xtx.device, dtype=self.xtx.dtype)
        self.xtx.addmm_(rows.T, rows)
        self.count += rows.shape[0]

    def merge(self, other: HessianAccumulator) -> HessianAccumulator:
        """Fold ``other``'s rows into this accumulator (in place) and return it."""
        if other.in_features != self.in_features:
            raise ValueError(f"cannot merge Hessians of {other.in_features} and {self.in_features} features")
        self.xtx += other.xtx.to(device=self.xtx.device, dtype=self.xtx.dtype)
        self.count += other.count
        return self

    def hessian(self) -> torch.Tensor:
        """``2/n * X^T X`` (float32); all zeros before any update."""
        if self.count == 0:
            return torch.zeros_like(self.xtx, dtype=torch.float32)
        return (self.xtx * (2.0 / self.count)).float()


def conv_input_rows(x: torch.Tensor, conv: nn.Conv1d | nn.Conv2d, all_groups: bool = False) -> torch.Tensor:
    """Unfold a convolution's input into rows that multiply ``conv.weight.flatten(1)``.

    A convolution is a linear layer applied to every receptive field; the returned matrix has one
    row per (sample, output position) and ``in_channels * prod(kernel_size)`` columns in the order
    of ``weight.flatten(1)``, so ``HessianAccumulator`` and ``gptq_quantize`` apply unchanged.
    For a grouped convolution, ``all_groups=True`` returns the rows of every group side by side:
    group ``g`` multiplies columns ``g * k : (g + 1) * k`` with ``k = in_channels / groups *
    prod(kernel_size)``.

    >>> conv = nn.Conv2d(3, 8, 3, padding=1)
    >>> x = torch.randn(2, 3, 5, 5)
    >>> rows = conv_input_rows(x, conv)
    >>> rows.shape
    torch.Size([50, 27])
    >>> y = (rows @ conv.weight.flatten(1).T + conv.bias).reshape(2, 25, 8).transpose(1, 2)
    >>> torch.allclose(y.reshape(2, 8, 5, 5), conv(x), atol=1e-5)
    True
    """
    if not isinstance(conv, nn.Conv1d | nn.Conv2d):
        raise TypeError(f"expected nn.Conv1d or nn.Conv2d, got {type(conv).__name__}")
    if conv.groups != 1 and not all_groups:
        raise ValueError(
            f"grouped convolution (groups={conv.groups}) mixes separate input sets per output group; "
            "collect one Hessian per group from the matching input channels instead"
        )
    one_d = isinstance(conv, nn.Conv1d)
    padding = conv.padding
    if isinstance(padding, str) or conv.padding_mode != "zeros":
        # Pad exactly as the module does ('same' may be asymmetric; reflect/replicate/circular modes).
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * len(conv.kernel_size)
    if one_d:  # a 1-d convolution is a 2-d one over a height-1 image
        x = x.unsqueeze(-2)
        padding = (0, *padding)
    kernel = (1, *conv.kernel_size) if one_d else conv.kernel_size
    stride = (1, *conv.stride) if one_d else conv.stride
    dilation = (1, *conv.dilation) if one_d else conv.dilation
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # [N, C*k, L]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def inverse_hessian_cholesky(hessian: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp*I)^-1`` (float32), ``damp = percdamp * mean(diag H)``.

    Row ``j`` of this factor, divided by its diagonal, is the optimal update of the columns after
    ``j`` when column ``j`` is rounded (the paper's Cholesky reformulation). Dead inputs (zero
    diagonal) must be fixed by the caller first. If the damped matrix is still not positive
    definite (rank-deficient calibration, rounding), the damping grows tenfold up to
    ``DAMP_RETRIES`` times.

    >>> u = inverse_hessian_cholesky(torch.eye(3) * 2, percdamp=0.0)
    >>> torch.allclose(u, torch.eye(3) / 2**0.5)
    True
    """
    h = hessian.double()  # float64: the two factorizations square the condition number
    n = h.shape[0]
    mean_diag = float(torch.diagonal(h).mean()) if n else 1.0
    damp = percdamp * mean_diag
    for attempt in range(DAMP_RETRIES + 1):
        # Damping on the diagonal of a copy (no identity matrix), and each factor dropped once the
        # next exists: a 2048-input Hessian's float64 matrices are 32 MiB each.
        damped = h.clone()
        damped.diagonal().add_(damp)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if int(info) == 0:
                return upper.float()
        damp = max(damp, 1e-8 * max(mean_diag, 1e-12)) * 10
        if attempt == DAMP_RETRIES:
            break
    raise ValueError(
        f"the Hessian is not positive definite even with damping {damp:.3g}; "
        "give more (or more varied) calibration data or raise percdamp"
    )


def reconstruction_error(weight: torch.Tensor, qweight: torch.Tensor, hessian: torch.Tensor) -> float:
    """Mean squared output error per calibration row, ``||X W^T - X Q^T||^2 / n``, from the Hessian.

    With ``H = 2/n X^T X`` this is ``trace(D H D^T) / 2`` for ``D = W - Q``: no inputs are kept.

    >>> x = torch.randn(100, 4); w = torch.randn(3, 4); q = w.round()
    >>> acc = HessianAccumulator(4); acc.update(x)
    >>> direct = float(((x @ w.T - x @ q.T) ** 2).sum() / 100)
    >>> abs(reconstruction_error(w, q, acc.hessian()) - direct) < 1e-3 * direct
    True
    """
    delta = (weight.double() - qweight.double()).reshape(weight.shape[0], -1)
    return float(((delta @ hessian.double()) * delta).sum() / 2)


def _check_inputs(weight: torch.Tensor, hessian: torch.Tensor, fmt: Format, granularity: Granularity) -> None:
    if fmt.family != "int":
        raise ValueError(
            f"GPTQ here supports affine integer formats (int2..int8, uint2..uint8), got {fmt.name} "
            f"({fmt.family}); use round-to-nearest for {fmt.family} formats"
        )
    if weight.dim() != 2:
        raise ValueError(
            f"GPTQ expects a 2-d weight [out, in], got shape {tuple(weight.shape)}; "
            "flatten convolution kernels with weight.flatten(1)"
        )
    cols = weight.shape[1]
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match in_features={cols}")
    if isinstance(granularity, PerChannel) and granularity.axis % weight.dim() != 0:
        raise ValueError(
            "GPTQ quantizes one input column at a time, so scales must be per output channel "
            f"(PerChannel(0)), per group along the input (PerGroup) or per tensor; got {granularity}"
        )
    if not isinstance(granularity, PerTensor | PerChannel | PerGroup):
        raise ValueError(f"GPTQ does not support granularity {granularity} for weights")
    check_finite(weight, "GPTQ weight")
    check_finite(hessian, "GPTQ Hessian")


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    fmt: Format,
    granularity: Granularity = PER_ROW,
    symmetric: bool = True,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    static_groups: bool | None = None,
    observer: str = "minmax",
    updated: torch.Tensor | None = None,
) -> tuple[torch.Tensor, QParams]:
    """Quantize ``weight`` ``[out, in]`` with GPTQ; returns ``(codes, qparams)`` for ``dequantize``.

    Args:
        weight: the float weight ``[out, in]`` (conv kernels: ``weight.flatten(1)``).
        hessian: ``[in, in]``, e.g. ``HessianAccumulator.hessian()``; only its shape up to scale
            matters, so any positive multiple of ``X^T X`` gives the same result.
        fmt: an affine integer format (``int2..int8``, ``uint2..uint8``).
        granularity: ``PerChannel(0)`` (one scale per row), ``PerGroup(G)`` (blocks ``(1, G)``, the
            last one may be shorter) or ``PerTensor()``.
        symmetric: symmetric (no zero point) or asymmetric ranges, as in ``choose_qparams``.
        block_size: columns per lazy-update block (speed only: the result is the same up to
            float rounding).
        percdamp: damping added to the diagonal, as a fraction of its mean.
        act_order: quantize columns in order of decreasing Hessian diagonal (the inputs with the
            most energy first, while the most columns remain to absorb their error). Groups stay
            contiguous in the original column order, so it needs static groups: the result then
            needs no column permutation (which lowbit's weight format does not store).
        static_groups: take every group's range up front from the original weight. ``None``
            (default) means ``act_order``; ``act_order=True`` with ``static_groups=False`` is
            refused (``ValueError``).
        observer: how each scale is chosen: ``minmax`` (the full range) or ``mse`` (the clip
            ratio with the smallest squared weight error, searched per group on the weights the
            scale is taken from, as AutoGPTQ's ``mse`` option).
        updated: a ``[out, in]`` float32 tensor filled with each column as it was when rounded
            (the original plus the compensation of the columns before it): rounding it to
            nearest with the returned parameters gives exactly the returned codes (AutoRound
            starts from there, ``lowbit.algorithms.autoround``).

    With dynamic groups (the default without ``act_order``), each group's range is taken when
    its first column is reached, from the weights as updated so far (the remaining columns
    already carry the compensation for the columns quantized before them). Per-channel and
    per-tensor ranges come from the original weight. Inputs that never fire (zero Hessian
    diagonal) get no compensation: their columns are rounded to nearest and do not affect the
    others. The reference implementation zeroes them
    instead; rounding keeps a sensible weight for inputs the calibration data happened not to hit.

    >>> import lowbit.formats as F
    >>> w = torch.randn(4, 8)
    >>> codes, qp = gptq_quantize(w, torch.eye(8), F.get("uint3"), PerGroup(4), symmetric=False)
    >>> codes.dtype, qp.block, int(codes.max()) <= 7
    (torch.uint8, (1, 4), True)
    """
    _check_inputs(weight, hessian, fmt, granularity)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if percdamp < 0:
        raise ValueError(f"percdamp must be >= 0, got {percdamp}")
    if static_groups is None:
        static_groups = act_order
    if act_order and not static_groups:
        raise ValueError(
            "act_order without static groups would reorder the columns inside groups and need a "
            "stored column permutation, which lowbit's weight format does not have: set static_groups"
        )
    if observer not in OBSERVERS:
        raise ValueError(f"unknown GPTQ observer {observer!r}; choose one of {', '.join(OBSERVERS)}")
    algorithm = OBSERVERS[observer]
    rows, cols = weight.shape
    device = weight.device
    w = weight.detach().float().clone()
    block = block_shape(granularity, w.shape)
    if w.numel() == 0:
        return torch.empty(w.shape, dtype=fmt.code_dtype, device=device), choose_weight_qparams(
            w, fmt, granularity, symmetric, algorithm
        )

    h = hessian.detach().to(device=device, dtype=torch.float32).clone()
    dead = torch.diagonal(h) == 0
    # An input that is always zero has a zero row and column in H; a unit diagonal decouples it.
    h[dead, dead] = 1.0

    group = block[1] if isinstance(granularity, PerGroup) else cols
    n_groups = math.ceil(cols / group)
    dynamic_groups = isinstance(granularity, PerGroup) and not static_groups and n_groups > 1
    if dynamic_groups:
        scale = torch.empty(rows, n_groups, device=device)
        zero_point = None if symmetric else torch.empty(rows, n_groups, dtype=torch.int32, device=device)
    else:
        # Shapes [1 or rows, n_groups]: per tensor [1, 1], per channel [rows, 1], groups [rows, G].
        upfront = choose_weight_qparams(w, fmt, granularity, symmetric, algorithm)
        scale, zero_point = upfront.scale, upfront.zero_point

    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else None
    if perm is not None:
        w = w[:, perm]
        h = h[perm][:, perm]
    hinv = inverse_hessian_cholesky(h, percdamp)
    del h

    # Group of each processed column, by its ORIGINAL index (static groups under act_order).
    order = perm.tolist() if perm is not None else range(cols)
    col_group = [j // group for j in order]
    codes = torch.empty(rows, cols, device=device)
    current = -1
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            g = col_group[c]
            if dynamic_groups and c % group == 0:
                members = _group_columns(w, w1, err1, hinv, i1, i2, c, min(c + group, cols))
                qp = choose_weight_qparams(members, fmt, PerChannel(0), symmetric, algorithm)
                scale[:, g] = qp.scale[:, 0]
                if zero_point is not None and qp.zero_point is not None:
                    zero_point[:, g] = qp.zero_point[:, 0]
                current = -1
            if g != current:
                # Same float32 ops as lowbit.primitives.quantize (multiply by 1/scale, add the zero
                # point, clamp), so an identity Hessian reproduces round-to-nearest bit for bit.
                current = g
                col_scale = scale[:, g]
                col_inv = 1.0 / col_scale
                col_zp = None if zero_point is None else zero_point[:, g].float()
            col = w1[:, i]
            q = torch.round(col * col_inv)
            if col_zp is not None:
                q = q + col_zp
            q = torch.clamp(q, fmt.qmin, fmt.qmax)
            codes[:, c] = q
            if updated is not None:
                updated[:, order[c]] = col
            value = (q - col_zp if col_zp is not None else q) * col_scale
            err = (col - value) / hinv1[i, i]
            # Compensate the rest of this block now; later blocks get one batched update below.
            w1[:, i + 1 :] -= err.unsqueeze(1) * hinv1[i, i + 1 :].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes.to(fmt.code_dtype), QParams(scale, zero_point, block)


def _group_columns(
    w: torch.Tensor,
    w1: torch.Tensor,
    err1: torch.Tensor,
    hinv: torch.Tensor,
    i1: int,
    i2: int,
    start: int,
    end: int,
) -> torch.Tensor:
    """The group's columns ``start:end`` as updated by every column quantized before ``start``.

    Inside the current block they are up to date in ``w1``; beyond it, ``w`` still lacks this
    block's pending lazy update, which is added here for just those columns. (The reference code
    reads the stale ``w`` for the whole group; the two agree when groups start on block boundaries.)
    """
    inside = w1[:, start - i1 : min(end, i2) - i1]
    if end <= i2:
        return inside
    done = start - i1
    beyond = w[:, i2:end] - err1[:, :done] @ hinv[i1:start, i2:end]
    return torch.cat([inside, beyond], dim=1)
