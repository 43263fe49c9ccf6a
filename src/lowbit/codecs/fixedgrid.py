"""Fixed grids: a sorted table of values times one scale per block (``fp8_e4m3``, ``fp8_e5m2``,
``fp4_e2m1``, ``nf4``, ``log2_<bits>``, ``binary``, ``ternary``).

Sign-magnitude grids (the minifloats, log2) store ``sign << (bits-1) | magnitude_index`` and round
ties to the even magnitude index, which is exactly IEEE round-to-nearest-even for the minifloats.
The scale maps the block's largest magnitude onto the grid's largest value (``absmax``), or is
XNOR-Net's mean |x| (``mean_abs``, binary) or TWN's mean of the values above 0.7 E|x| (``twn``).

>>> import lowbit.formats as F
>>> grid_table(F.get("fp4_e2m1"))[:8].tolist()
[0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from lowbit.codecs.base import EPS, BlockCodec, QParams, block_range, register, widen_range
from lowbit.codecs.scales import has_tensor_scale, pow2_floor, round_scale
from lowbit.granularity import block_dims, expand_params, from_blocks, to_blocks

if TYPE_CHECKING:
    from lowbit.formats import Format


class FixedGridCodec(BlockCodec):
    """The ``grid`` family."""

    family = "grid"
    takes_range = True

    def choose_blocks(self, x, xb, fmt, block, symmetric, clip_ratio):  # type: ignore[no-untyped-def]
        if fmt.scale_rule == "mean_abs" or fmt.scale_rule == "twn":
            scale = _mean_abs_scale(x, xb, block, block_dims(x.dim()), twn=fmt.scale_rule == "twn")
            return QParams(round_scale(torch.clamp(scale * clip_ratio, min=EPS), fmt), None, block)
        if has_tensor_scale(fmt):
            # The tensor's power of two from its unclipped range: every clip candidate shares it.
            largest = x.detach().abs().amax().float() / fmt.grid_max
            amax = widen_range(*block_range(x, xb, clip_ratio))[2]
            return QParams(self._scale(amax, fmt, largest), None, block)
        return self.range_qparams(x, xb, fmt, block, symmetric, clip_ratio)

    def from_range(
        self,
        min_val: torch.Tensor,
        max_val: torch.Tensor,
        fmt: Format,
        block: tuple[int, ...],
        symmetric: bool,
    ) -> QParams:
        _, _, amax = widen_range(min_val, max_val)
        return QParams(self._scale(amax, fmt), None, block)

    def _scale(self, amax: torch.Tensor, fmt: Format, largest: torch.Tensor | None = None) -> torch.Tensor:
        """The scale of blocks whose largest magnitude is ``amax``, as the format stores it."""
        if fmt.scale_rule == "pow2_floor":
            # OCP MX: the element format's largest exponent (e2m1: 6 = 1.5 * 2**2 -> 2).
            return pow2_floor(amax, int(math.floor(math.log2(fmt.grid_max))))
        return round_scale(torch.clamp(amax / fmt.grid_max, min=EPS), fmt, largest)

    def encode_blocks(self, xb: torch.Tensor, fmt: Format, qparams: QParams, ndim: int) -> torch.Tensor:
        return round_to_grid(xb / expand_params(qparams.scale, ndim), fmt)

    def decode_blocks(self, cb: torch.Tensor, fmt: Format, qparams: QParams, ndim: int) -> torch.Tensor:
        return grid_table(fmt, cb.device)[cb] * expand_params(qparams.scale, ndim)

    def inside(self, x: torch.Tensor, fmt: Format, qparams: QParams) -> torch.Tensor:
        if x.numel() == 0:
            return torch.ones_like(x, dtype=torch.bool)
        xb = to_blocks(x.detach().float(), qparams.block)
        limit = fmt.grid_max * expand_params(qparams.scale, x.dim())
        return from_blocks(xb.abs() <= limit, tuple(x.shape))


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


register(FixedGridCodec())
