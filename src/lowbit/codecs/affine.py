"""Affine integers ``intN`` / ``uintN``: ``code = clamp(round(x / scale) + zero_point, qmin, qmax)``.

Parameters follow PyTorch's observers bit for bit: symmetric ``amax / qmax``, asymmetric
``(max - min) / (qmax - qmin)`` with an integer zero point, ``1 / scale`` multiplied (not divided).
Signed codes are stored shifted to ``0..qmax-qmin`` so every width packs alike.

>>> import torch, lowbit.formats as F
>>> from lowbit.primitives import choose_qparams, quantize
>>> x = torch.tensor([-1.0, 0.3])
>>> quantize(x, F.get("int4"), choose_qparams(x, F.get("int4")))
tensor([-7,  2], dtype=torch.int8)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from lowbit import packing
from lowbit.codecs.base import EPS, BlockCodec, QParams, register, widen_range
from lowbit.codecs.scales import round_scale
from lowbit.granularity import expand_params, from_blocks, to_blocks

if TYPE_CHECKING:
    from lowbit.formats import Format


class AffineCodec(BlockCodec):
    """The ``int`` family."""

    family = "int"
    takes_range = True
    index_dtype: ClassVar[torch.dtype] = torch.int32

    def choose_blocks(self, x, xb, fmt, block, symmetric, clip_ratio):  # type: ignore[no-untyped-def]
        return self.range_qparams(x, xb, fmt, block, symmetric, clip_ratio)

    def from_range(
        self,
        min_val: torch.Tensor,
        max_val: torch.Tensor,
        fmt: Format,
        block: tuple[int, ...],
        symmetric: bool,
    ) -> QParams:
        min_val, max_val, amax = widen_range(min_val, max_val)
        if symmetric and fmt.scale_rule == "signed_absmax":
            # The extreme value lands exactly on qmin (the code with the extra level): a negative
            # scale when the extreme is positive. All-zero blocks keep a tiny positive scale.
            extreme = torch.where(max_val >= -min_val, max_val, min_val)
            scale = extreme / fmt.qmin
            scale = torch.where(scale.abs() < EPS, torch.full_like(scale, EPS), scale)
            return QParams(round_scale(scale, fmt), None, block)
        if symmetric:
            top = fmt.qmax if fmt.qmax > 0 else -fmt.qmin
            scale = round_scale(torch.clamp(amax / top, min=EPS), fmt)
            return QParams(scale, None, block)
        steps = float(fmt.qmax - fmt.qmin)
        scale = (max_val - min_val) / steps
        # A range wider than the largest float32 (-3e38..3e38) overflows the subtraction; only there
        # divide first (and saturate: uint1 has one step), so the usual path stays bit-exact with
        # PyTorch's observers.
        wide = (max_val / steps - min_val / steps).clamp(max=torch.finfo(torch.float32).max)
        scale = torch.where(torch.isfinite(scale), scale, wide)
        scale = round_scale(torch.clamp(scale, min=EPS), fmt)
        zp = fmt.qmin - torch.round(min_val / scale).to(torch.int32)
        return QParams(scale, torch.clamp(zp, fmt.qmin, fmt.qmax).to(torch.int32), block)

    def _rounded(self, xb: torch.Tensor, qparams: QParams, ndim: int) -> torch.Tensor:
        inv_scale = expand_params(1.0 / qparams.scale, ndim)  # multiply by 1/scale as PyTorch does: bit-exact
        q = torch.round(xb * inv_scale)
        if qparams.zero_point is not None:
            q = q + expand_params(qparams.zero_point, ndim)
        return q

    def encode_blocks(self, xb: torch.Tensor, fmt: Format, qparams: QParams, ndim: int) -> torch.Tensor:
        return torch.clamp(self._rounded(xb, qparams, ndim), fmt.qmin, fmt.qmax)

    def decode_blocks(self, cb: torch.Tensor, fmt: Format, qparams: QParams, ndim: int) -> torch.Tensor:
        q = cb.float()
        if qparams.zero_point is not None:
            q = q - expand_params(qparams.zero_point, ndim).float()
        return q * expand_params(qparams.scale, ndim)

    def inside(self, x: torch.Tensor, fmt: Format, qparams: QParams) -> torch.Tensor:
        if x.numel() == 0:
            return torch.ones_like(x, dtype=torch.bool)
        q = self._rounded(to_blocks(x.detach().float(), qparams.block), qparams, x.dim())
        return from_blocks((q >= fmt.qmin) & (q <= fmt.qmax), tuple(x.shape))

    def code_dtype(self, fmt: Format) -> torch.dtype:
        return torch.int8 if fmt.signed else super().code_dtype(fmt)

    def to_unsigned(self, codes: torch.Tensor, fmt: Format) -> torch.Tensor:
        return packing.to_unsigned(codes, fmt.qmin)

    def from_unsigned(self, flat: torch.Tensor, fmt: Format) -> torch.Tensor:
        return packing.from_unsigned(flat, fmt.qmin, self.code_dtype(fmt))


register(AffineCodec())
