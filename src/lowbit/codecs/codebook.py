"""Learned codebooks ``kmeans_<bits>`` / ``quantile_<bits>``: a sorted grid of ``2**bits`` values
learned per block from the data (``lowbit.codecs.kmeans1d``); a code is the index of the nearest
grid value (float32 midpoints, a value on a midpoint goes to the lower one). The grids are stored
as ``codebook`` ``[*blocks, 2**bits]`` next to a scale of ones (kept for a uniform layout).

>>> import torch, lowbit.formats as F
>>> from lowbit.primitives import choose_qparams
>>> choose_qparams(torch.tensor([[0.0, 0.1, 5.0, 5.2]]), F.get("kmeans_1")).codebook.tolist()
[[[0.05000000074505806, 5.099999904632568]]]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lowbit.codecs.base import BlockCodec, QParams, register
from lowbit.codecs.kmeans1d import learn_grid
from lowbit.granularity import blocked_shape, to_blocks

if TYPE_CHECKING:
    from lowbit.formats import Format


class CodebookCodec(BlockCodec):
    """The ``codebook`` family."""

    family = "codebook"

    def choose_blocks(self, x, xb, fmt, block, symmetric, clip_ratio):  # type: ignore[no-untyped-def]
        bshape = blocked_shape(tuple(x.shape), block)
        grid = _learn_block_grids(x, xb, block, fmt)
        return QParams(torch.ones(bshape, device=x.device), None, block, grid.reshape(*bshape, fmt.levels))

    def encode_blocks(self, xb: torch.Tensor, fmt: Format, qparams: QParams, ndim: int) -> torch.Tensor:
        rows = _blocks_as_rows(xb)
        grid = _codebook(qparams, fmt).reshape(rows.shape[0], -1).float()  # sorted per block
        mid = (grid[:, 1:] + grid[:, :-1]) / 2
        codes = torch.searchsorted(mid.contiguous(), rows.contiguous())
        return _rows_as_blocks(codes, xb.shape)

    def decode_blocks(self, cb: torch.Tensor, fmt: Format, qparams: QParams, ndim: int) -> torch.Tensor:
        rows = _blocks_as_rows(cb)
        grid = _codebook(qparams, fmt).reshape(rows.shape[0], -1).float()
        return _rows_as_blocks(torch.gather(grid, 1, rows), cb.shape)

    def expected_params(self, fmt, shape, block, has_zero_point):  # type: ignore[no-untyped-def]
        out = super().expected_params(fmt, shape, block, has_zero_point)
        out["codebook"] = ((*blocked_shape(shape, block), fmt.levels), torch.float32)
        return out


def _codebook(qparams: QParams, fmt: Format) -> torch.Tensor:
    if qparams.codebook is None:
        raise ValueError(f"format {fmt.name} needs a codebook in its QParams; call choose_qparams first")
    return qparams.codebook


def _learn_block_grids(
    x: torch.Tensor, xb: torch.Tensor, block: tuple[int, ...], fmt: Format
) -> torch.Tensor:
    """One learned grid per block, ``[n_blocks, levels]``, from the block's real values only.

    The zero padding of partial blocks (a group cut short at the end of a row) must not be learned:
    it would pull centroids and quantiles towards zero, and a constant block would lose exactness.
    Partial blocks are grouped by which of their entries are real and learned group by group.
    """
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


register(CodebookCodec())
