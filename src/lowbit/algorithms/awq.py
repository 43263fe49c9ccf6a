"""AWQ (Lin et al., 2023): activation-aware per-input-channel scaling before weight quantization.

A few input channels carry much larger activations than the rest, and the weights that multiply
them matter most. Scaling weight column ``j`` up by ``s_j`` (and the input down by ``s_j``, folded
into the previous layer) leaves the float output unchanged but makes that column's rounding error
relatively smaller: ``x W^T = (x / s) (W * s)^T``. AWQ takes ``s = mean|x|^alpha`` and searches
``alpha`` in ``[0, 1]`` for the smallest output error of the quantized layer on calibration data;
``alpha = 0`` is plain round-to-nearest, so the search can only improve on it (on that data).
An optional second search shrinks each block's range (clipping), again by output error.

Output errors are computed from the Gram matrix ``X^T X / n``: ``||X D^T||^2 / n =
sum((D @ G) * D)`` for ``D = W - Q``, so the sample size does not enter the search cost.

>>> import torch, lowbit.formats as F
>>> from lowbit.granularity import PerGroup
>>> g = torch.Generator().manual_seed(0)
>>> x = torch.randn(256, 64, generator=g)
>>> x[:, :2] *= 30  # two salient input channels
>>> w = torch.randn(32, 64, generator=g)
>>> s = awq_search_scales(w, x, F.get("int4"), PerGroup(32))
>>> s.shape, s.dtype, bool(s[:2].min() > s[2:].max())
(torch.Size([64]), torch.float32, True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lowbit.algorithms.rtn import search_clip
from lowbit.formats import Format
from lowbit.granularity import Granularity, block_shape, to_blocks
from lowbit.primitives import QParams, check_finite, choose_qparams, dequantize, quantize

# A caller's error of candidate effective weights ``Q(W * s) / s`` (one per weight, in order),
# e.g. measured at the output of the module that encloses the layers.
Loss = Callable[[list[torch.Tensor]], float]

# Candidate clip ratios as in the paper's code: shrink each block's range by up to half, in 5% steps.
DEFAULT_CLIP_GRID = 20
DEFAULT_MAX_SHRINK = 0.5


def _as_list(weight: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    weights = [weight] if isinstance(weight, torch.Tensor) else list(weight)
    if not weights:
        raise ValueError("AWQ needs at least one weight")
    cols = weights[0].shape[-1]
    for w in weights:
        if w.dim() != 2 or w.shape[1] != cols:
            raise ValueError(
                f"AWQ weights must be 2-d [out, in] sharing in_features={cols}, got {tuple(w.shape)}"
            )
        check_finite(w, "AWQ weight")
    return weights


def gram(x: torch.Tensor) -> torch.Tensor:
    """``X^T X / n`` (float64) over the rows of ``x`` ``[..., in]``: the output-error metric.

    >>> gram(torch.tensor([[1.0, 2.0], [3.0, 0.0]])).tolist()
    [[5.0, 1.0], [1.0, 2.0]]
    """
    rows = x.detach().reshape(-1, x.shape[-1]).double()
    if rows.shape[0] == 0:
        raise ValueError("AWQ needs at least one calibration input row")
    return rows.T @ rows / rows.shape[0]


def _gram_of(x: torch.Tensor | None, gram_matrix: torch.Tensor | None, cols: int) -> torch.Tensor:
    """The Gram matrix given, or the one of the sample ``x``; either must match ``cols``."""
    if gram_matrix is not None:
        if tuple(gram_matrix.shape) != (cols, cols):
            raise ValueError(f"Gram matrix {tuple(gram_matrix.shape)} does not match in_features={cols}")
        check_finite(gram_matrix, "AWQ Gram matrix")
        return gram_matrix.double()
    if x is None:
        raise ValueError("AWQ needs calibration inputs x or their Gram matrix")
    if x.shape[-1] != cols:
        raise ValueError(f"inputs have {x.shape[-1]} channels, the weight has in_features={cols}")
    check_finite(x, "AWQ calibration inputs")
    return gram(x)


def output_mse(weight: torch.Tensor, qweight: torch.Tensor, gram_matrix: torch.Tensor) -> float:
    """Mean over calibration rows of ``||x W^T - x Q^T||^2``, from the Gram matrix ``X^T X / n``.

    >>> x = torch.randn(50, 3); w = torch.randn(2, 3)
    >>> direct = float(((x @ w.T - x @ (w / 2).T) ** 2).sum() / 50)
    >>> abs(output_mse(w, w / 2, gram(x)) - direct) < 1e-4 * direct
    True
    """
    # In the Gram matrix's dtype: the scale search passes a float32 copy (a float64 matmul per
    # candidate was most of AWQ's time; float32 ranks candidates the same), the sum in float64.
    delta = weight.to(gram_matrix.dtype) - qweight.to(gram_matrix.dtype)
    return float(((delta @ gram_matrix) * delta).sum(dtype=torch.float64))


def scales_for_alpha(act_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ's candidate scales ``mean|x|^alpha``, normalised so that ``max(s) * min(s) = 1``.

    The normalisation keeps the scaled weight's overall magnitude (and so the choice of group
    ranges) centred; channels that never fire get a small floor instead of a zero scale.

    >>> scales_for_alpha(torch.tensor([1.0, 4.0, 16.0]), 0.5).tolist()
    [0.5, 1.0, 2.0]
    """
    mean = act_mean.detach().float()
    top = float(mean.max()) if mean.numel() else 0.0
    floor = max(top * 1e-4, torch.finfo(torch.float32).tiny)
    s = mean.clamp(min=floor).pow(alpha)
    return s / torch.sqrt(s.max() * s.min())


def weight_mean(weights: Sequence[torch.Tensor], granularity: Granularity) -> torch.Tensor:
    """Mean over output rows of ``|w|`` normalised by each quantization block's max (AutoAWQ's
    ``w_mean`` for duo scaling), over the rows of every weight sharing the input.

    >>> from lowbit.granularity import PerChannel
    >>> weight_mean([torch.tensor([[1.0, 2.0], [4.0, 1.0]])], PerChannel(0)).tolist()
    [0.75, 0.625]
    """
    rows = []
    for w in weights:
        w = w.detach().float().abs()
        block = block_shape(granularity, w.shape)
        top = to_blocks(w, block).amax(dim=(1, 3), keepdim=True)  # [row blocks, 1, col blocks, 1]
        top = top.expand(-1, block[0], -1, block[1]).reshape(-1, top.shape[2] * block[1])
        rows.append(w / top[: w.shape[0], : w.shape[1]].clamp(min=torch.finfo(torch.float32).tiny))
    return torch.cat(rows).mean(0)


def duo_scales(act_mean: torch.Tensor, w_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """AutoAWQ's duo-scaling candidate ``mean|x|^alpha / w_mean^(1 - alpha)``, normalised so that
    ``max(s) * min(s) = 1`` (as ``scales_for_alpha``).

    >>> duo_scales(torch.tensor([1.0, 4.0]), torch.tensor([1.0, 1.0]), 0.5).tolist()
    [0.7071067690849304, 1.4142135381698608]
    """
    a = act_mean.detach().float().clamp(min=1e-4).pow(alpha)
    s = (a / (w_mean.float().pow(1.0 - alpha) + 1e-4)).clamp(min=1e-4)
    return s / torch.sqrt(s.max() * s.min())


def _quantized(w: torch.Tensor, fmt: Format, granularity: Granularity, symmetric: bool) -> torch.Tensor:
    qp = choose_qparams(w, fmt, granularity, symmetric)
    return dequantize(quantize(w, fmt, qp), fmt, qp)


def awq_search_scales(
    weight: torch.Tensor | Sequence[torch.Tensor],
    x: torch.Tensor | None,
    fmt: Format,
    granularity: Granularity,
    symmetric: bool = True,
    act_mean: torch.Tensor | None = None,
    n_grid: int = 20,
    gram_matrix: torch.Tensor | None = None,
    duo_scaling: bool = False,
    loss: Loss | None = None,
) -> torch.Tensor:
    """Per-input-channel scales ``s`` (float32 ``[in]``) that minimise the quantized output error.

    Args:
        weight: ``[out, in]``, or several weights that read the same input (e.g. q, k, v
            projections), whose errors are summed: they must share one ``s``.
        x: a sample of the layer's calibration inputs ``[..., in]`` (the error is measured on it).
        fmt, granularity, symmetric: how the scaled weight will be quantized (round-to-nearest).
        act_mean: per-channel mean ``|x|`` over all calibration data; defaults to the sample's.
        n_grid: ``alpha`` is searched over ``0, 1/n_grid, ..., 1``.
        gram_matrix: ``X^T X / n`` over all calibration rows (``gram``), accumulated by the
            caller; with it (and ``act_mean``) ``x`` may be ``None``.
        duo_scaling: candidates ``mean|x|^alpha / w_mean^(1-alpha)`` (AutoAWQ's default), with
            ``w_mean`` from ``weight_mean``; ``s = 1`` is tried first as well.
        loss: judge each candidate by ``loss(effective weights)`` instead of the layer-output
            error (for example at the output of the module that contains the layers); then
            neither ``x`` nor ``gram_matrix`` is needed.

    Apply as ``w * s`` (columns) for the weight and ``x / s`` for the input. ``s = 1`` (plain
    RTN) is a candidate, and is returned when nothing beats it.

    >>> import lowbit.formats as F
    >>> from lowbit.granularity import PerChannel
    >>> w, x = torch.randn(8, 16), torch.randn(100, 16)
    >>> awq_search_scales(w, x, F.get("int4"), PerChannel(0)).shape
    torch.Size([16])
    """
    weights = _as_list(weight)
    cols = weights[0].shape[1]
    if n_grid < 1:
        raise ValueError(f"n_grid must be >= 1, got {n_grid}")
    g = None if loss is not None else _gram_of(x, gram_matrix, cols).to(weights[0].device)
    if act_mean is None:
        if x is None:
            raise ValueError("AWQ needs act_mean when it is given a Gram matrix instead of inputs")
        act_mean = x.detach().reshape(-1, cols).abs().float().mean(0)
    if act_mean.shape != (cols,):
        raise ValueError(f"act_mean must have shape [{cols}], got {tuple(act_mean.shape)}")
    act_mean = act_mean.to(weights[0].device)

    floats = [w.detach().float() for w in weights]
    if duo_scaling:
        w_mean = weight_mean(floats, granularity).to(act_mean.device)
        ones = torch.ones(cols, device=weights[0].device)
        candidates = [ones] + [duo_scales(act_mean, w_mean, i / n_grid) for i in range(n_grid + 1)]
    else:  # alpha = 0 gives s = 1 exactly
        candidates = [scales_for_alpha(act_mean, i / n_grid) for i in range(n_grid + 1)]
    g32 = None if g is None else g.float()
    best_s = torch.ones(cols, device=weights[0].device)
    best_err = float("inf")
    for s in candidates:
        # The effective weights Q(W * s) / s: what multiplies the unscaled x.
        effective = [_quantized(w * s, fmt, granularity, symmetric) / s for w in floats]
        if loss is not None:
            err = float(loss(effective))
        else:
            assert g32 is not None
            err = sum(output_mse(w, e, g32) for w, e in zip(floats, effective, strict=True))
        if err < best_err:
            best_err, best_s = err, s
    return best_s.float()


def _block_errors(delta: torch.Tensor, gram_matrix: torch.Tensor, block: tuple[int, ...]) -> torch.Tensor:
    """Output error attributable to each quantization block: ``[row blocks, column blocks]``.

    A block's error counts only the interaction of its own columns (the block-diagonal part of
    the Gram matrix), so the blocks can be optimised independently, as the paper's search does.
    """
    rows, cols = delta.shape
    b_rows, b_cols = block
    n_col_blocks = -(-cols // b_cols)
    pad = n_col_blocks * b_cols - cols
    d = torch.nn.functional.pad(delta.double(), (0, pad)).reshape(rows, n_col_blocks, b_cols)
    gp = torch.nn.functional.pad(gram_matrix, (0, pad, 0, pad))
    diag_blocks = torch.stack(
        [gp[k * b_cols : (k + 1) * b_cols, k * b_cols : (k + 1) * b_cols] for k in range(n_col_blocks)]
    )
    per_row = torch.einsum("rgk,gkl,rgl->rg", d, diag_blocks, d)  # [rows, column blocks]
    n_row_blocks = -(-rows // b_rows)
    per_row = torch.nn.functional.pad(per_row, (0, 0, 0, n_row_blocks * b_rows - rows))
    return per_row.reshape(n_row_blocks, b_rows, n_col_blocks).sum(1)


def awq_search_clip(
    weight: torch.Tensor,
    x: torch.Tensor | None,
    fmt: Format,
    granularity: Granularity,
    symmetric: bool = True,
    n_grid: int = DEFAULT_CLIP_GRID,
    max_shrink: float = DEFAULT_MAX_SHRINK,
    gram_matrix: torch.Tensor | None = None,
) -> QParams:
    """Quantization parameters with each block's range shrunk to minimise its output error.

    Call it on the already scaled weight and inputs (``w * s``, ``x / s``), or give the scaled
    inputs' ``gram_matrix`` instead of ``x``. Ratios ``1, 1 - max_shrink/n_grid, ...`` down to
    ``1 - max_shrink`` (exclusive) are tried per block.

    >>> import lowbit.formats as F
    >>> from lowbit.granularity import PerGroup
    >>> w, x = torch.randn(8, 64), torch.randn(200, 64)
    >>> qp = awq_search_clip(w, x, F.get("int3"), PerGroup(32))
    >>> qp.scale.shape, qp.block
    (torch.Size([8, 2]), (1, 32))
    """
    (w,) = _as_list(weight)
    w = w.detach().float()
    if fmt.family != "int":
        raise ValueError(f"AWQ clipping searches affine integer ranges; got {fmt.name} ({fmt.family})")
    if not 0.0 <= max_shrink < 1.0 or n_grid < 1:
        raise ValueError(f"need 0 <= max_shrink < 1 and n_grid >= 1, got {max_shrink}, {n_grid}")
    g = _gram_of(x, gram_matrix, w.shape[1]).to(w.device)
    block = block_shape(granularity, w.shape)
    steps = max(1, round(max_shrink * n_grid)) if max_shrink > 0 else 1
    ratios = [1.0 - max_shrink * i / n_grid for i in range(steps)]
    # Output error of each block on the calibration inputs: (delta G delta^T) per row and column block.
    return search_clip(
        w, fmt, granularity, symmetric, ratios, lambda delta, _qp: _block_errors(delta, g, block)
    )
