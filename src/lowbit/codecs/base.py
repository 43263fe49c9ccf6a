"""The codec protocol and its registry: one object per format family, keyed by ``Format.family``.

A codec knows everything one family does with numbers, in four groups:

- **parameters**: ``choose`` (from the tensor itself), ``from_range`` (from observed per-block
  ranges; only where ``takes_range``);
- **codes**: ``encode`` (values -> codes), ``decode`` (codes -> values), ``inside`` (where the
  straight-through gradient passes);
- **storage**: ``code_dtype`` / ``packable`` / ``storage_bits`` (what one code is),
  ``code_count`` / ``code_shape`` / ``store_codes`` / ``load_codes`` / ``code_buffer`` (the packed
  code buffer), ``param_buffers`` / ``expected_params`` / ``stored_block`` (scales, zero points,
  codebooks as stored), ``read_rows`` (a few rows without unpacking the rest);
- **checks**: ``check_weight`` (refuse a weight this family cannot store).

``lowbit.primitives`` dispatches to ``codec_for(fmt)`` and never looks at the family itself;
``lowbit.nn.qweight`` stores what the codec says. A new family is one file with one subclass and
one ``register`` call (plus its import in ``lowbit/codecs/__init__.py`` when it is built in).

This module is a leaf: it imports torch, ``granularity``, ``packing`` and ``codecs.scales`` only.
Codecs read the fields of a ``lowbit.formats.Format`` but never import ``formats`` at run time
(``formats`` asks this registry which families exist).

>>> import torch, lowbit.formats as F
>>> codec_for(F.get("nf4")).family, codec_for(F.get("int4")).code_dtype(F.get("int4"))
('grid', torch.int8)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from lowbit import packing
from lowbit.codecs.scales import scale_buffers, stored_scale_params
from lowbit.granularity import block_dims, blocked_shape, from_blocks, to_blocks

if TYPE_CHECKING:
    from lowbit.formats import Format

# Smallest scale we allow: only there so that a zero-range block (all zeros) does not divide by
# zero. It is float32's smallest normal number, not its epsilon: PyTorch's observers floor scales
# at eps (1.19e-7), which zeroes every value of a tensor whose range is below ~1.5e-5 at int8
# (small activations of a randomly initialised or a badly scaled model); scales here follow the
# data's magnitude down to 1e-38. Ranges above that floor are bit-exact with PyTorch's.
EPS = torch.finfo(torch.float32).tiny


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


class Codec:
    """One format family. Subclasses are stateless; the ``Format`` carries every number.

    The defaults here suit a family whose codes are one unsigned integer of ``fmt.bits`` bits per
    value with one scale (and optional zero point) per block; ``BlockCodec`` adds the block-wise
    encode / decode skeleton on top.
    """

    family: ClassVar[str] = ""
    # Whether parameters come from a per-block range (observers, clip search, QAT can drive it).
    takes_range: ClassVar[bool] = False

    # --- parameters ------------------------------------------------------------------------------

    def choose(
        self, x: torch.Tensor, fmt: Format, block: tuple[int, ...], symmetric: bool, clip_ratio: float
    ) -> QParams:
        """Parameters for ``x`` (finite, ``block`` already resolved from the granularity)."""
        raise NotImplementedError

    def from_range(
        self,
        min_val: torch.Tensor,
        max_val: torch.Tensor,
        fmt: Format,
        block: tuple[int, ...],
        symmetric: bool,
    ) -> QParams:
        """Parameters from per-block ranges; only families with ``takes_range``."""
        widen_range(min_val, max_val)
        raise ValueError(f"format {fmt.name} ({fmt.family}) does not take its parameters from a range")

    # --- codes -----------------------------------------------------------------------------------

    def encode(self, x: torch.Tensor, fmt: Format, qparams: QParams) -> torch.Tensor:
        """Values -> unpacked codes of ``code_dtype`` (``x`` finite)."""
        raise NotImplementedError

    def decode(self, codes: torch.Tensor, fmt: Format, qparams: QParams, dtype: torch.dtype) -> torch.Tensor:
        """Codes -> values of ``dtype``."""
        raise NotImplementedError

    def inside(self, x: torch.Tensor, fmt: Format, qparams: QParams) -> torch.Tensor:
        """Boolean mask: where the straight-through estimator passes the gradient (not clamped)."""
        return torch.ones_like(x, dtype=torch.bool)

    # --- one code ----------------------------------------------------------------------------------

    def code_dtype(self, fmt: Format) -> torch.dtype:
        """Smallest torch dtype that holds unpacked codes."""
        return torch.uint8 if fmt.bits <= 8 else torch.int16

    def packable(self, fmt: Format) -> bool:
        """Whether codes can be bit-packed."""
        return fmt.bits <= 8

    def storage_bits(self, fmt: Format) -> float:
        """Stored bits per parameter for the codes alone (no scales, no codebooks)."""
        return fmt.bits / 1

    # --- the code buffer ---------------------------------------------------------------------------

    def check_weight(self, w: torch.Tensor, fmt: Format, what: str) -> None:
        """Raise ``ValueError`` naming ``what`` if this family cannot store ``w``."""

    def code_count(self, fmt: Format, shape: tuple[int, ...]) -> int:
        """Number of stored codes for a weight of ``shape``."""
        return math.prod(shape)

    def code_shape(self, fmt: Format, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the unpacked codes ``encode`` returns for a weight of ``shape``."""
        return shape

    def to_unsigned(self, codes: torch.Tensor, fmt: Format) -> torch.Tensor:
        """Codes as unsigned ``0..2**bits-1`` uint8, ready for ``packing.pack``."""
        return codes.to(torch.uint8)

    def from_unsigned(self, flat: torch.Tensor, fmt: Format) -> torch.Tensor:
        """Inverse of ``to_unsigned`` (unpacked uint8 -> codes as ``encode`` returns them)."""
        return flat

    def store_codes(self, codes: torch.Tensor, fmt: Format) -> torch.Tensor:
        """The ``packed`` buffer for ``codes``."""
        return packing.pack(self.to_unsigned(codes, fmt), fmt.bits)

    def load_codes(self, packed: torch.Tensor, fmt: Format, shape: tuple[int, ...]) -> torch.Tensor:
        """Inverse of ``store_codes`` for a weight of ``shape``."""
        flat = packing.unpack(packed, fmt.bits, self.code_count(fmt, shape))
        return self.from_unsigned(flat, fmt).reshape(self.code_shape(fmt, shape))

    def code_buffer(self, fmt: Format, shape: tuple[int, ...]) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of the ``packed`` buffer (to validate artifacts)."""
        return (packing.packed_nbytes(self.code_count(fmt, shape), fmt.bits),), torch.uint8

    # --- parameters as stored ------------------------------------------------------------------------

    def param_buffers(self, qparams: QParams, fmt: Format, device: torch.device) -> dict[str, torch.Tensor]:
        """Name -> tensor of every parameter buffer, in storage order (``state_dict`` order)."""
        out = scale_buffers(qparams.scale.to(device), fmt)
        if qparams.zero_point is not None:
            out["zero_point"] = qparams.zero_point.to(device).to(self.code_dtype(fmt)).contiguous()
        if qparams.codebook is not None:
            out["codebook"] = qparams.codebook.float().to(device).contiguous()
        return out

    def expected_params(
        self, fmt: Format, shape: tuple[int, ...], block: tuple[int, ...], has_zero_point: bool
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of the parameter buffers a weight of ``shape`` stores."""
        bshape = blocked_shape(shape, block)
        out = stored_scale_params(fmt, bshape)
        if has_zero_point:
            out["zero_point"] = (bshape, self.code_dtype(fmt))
        return out

    def stored_block(self, fmt: Format, shape: tuple[int, ...], block: tuple[int, ...]) -> tuple[int, ...]:
        """The ``QParams.block`` that stored parameters of a weight of ``shape`` describe."""
        return block

    def read_rows(self, qw: Any, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """``dequantize()[index]`` of a 2-D stored weight ``qw`` (a ``QuantizedWeight``) from the
        rows asked for only, or ``None`` when the rows cannot be read apart (the caller then
        dequantizes everything). Possible when every row has its own parameters and a row's codes
        fill whole bytes."""
        fmt, shape, block = qw.fmt, qw.shape, qw.block
        if not (len(shape) == 2 and block[0] == 1) or 8 % fmt.bits or (shape[1] * fmt.bits) % 8:
            return None
        rows, cols = shape
        flat = index.reshape(-1)
        row_bytes = qw.packed.reshape(rows, cols * fmt.bits // 8)[flat].reshape(-1)
        codes = self.from_unsigned(packing.unpack(row_bytes, fmt.bits, flat.numel() * cols), fmt)
        qp = qw.qparams()
        pick = lambda t: None if t is None else t[flat]  # noqa: E731
        sub = QParams(pick(qp.scale), pick(qp.zero_point), block, pick(qp.codebook))
        values = self.decode(codes.reshape(flat.numel(), cols), fmt, sub, dtype)
        return values.reshape(*index.shape, cols)


class BlockCodec(Codec):
    """A family that works block by block on ``to_blocks`` views (every family with a per-block
    scale or grid). Subclasses fill in ``choose_blocks``, ``encode_blocks``, ``decode_blocks``."""

    # dtype codes are widened to before decoding (indices into a table must be int64).
    index_dtype: ClassVar[torch.dtype] = torch.long

    def choose(
        self, x: torch.Tensor, fmt: Format, block: tuple[int, ...], symmetric: bool, clip_ratio: float
    ) -> QParams:
        if x.numel() == 0:
            bshape = blocked_shape(tuple(x.shape), block)
            return QParams(torch.ones(bshape, device=x.device), None, block)
        return self.choose_blocks(x, to_blocks(x.float(), block), fmt, block, symmetric, clip_ratio)

    def choose_blocks(
        self,
        x: torch.Tensor,
        xb: torch.Tensor,
        fmt: Format,
        block: tuple[int, ...],
        symmetric: bool,
        clip_ratio: float,
    ) -> QParams:
        """Parameters from the blocked view ``xb = to_blocks(x.float(), block)`` (``x`` not empty)."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor, fmt: Format, qparams: QParams) -> torch.Tensor:
        if x.numel() == 0:
            return torch.empty(x.shape, dtype=self.code_dtype(fmt), device=x.device)
        xb = to_blocks(x.float(), qparams.block)
        codes = self.encode_blocks(xb, fmt, qparams, x.dim())
        return from_blocks(codes, tuple(x.shape)).to(self.code_dtype(fmt))

    def encode_blocks(self, xb: torch.Tensor, fmt: Format, qparams: QParams, ndim: int) -> torch.Tensor:
        """Codes of the blocked view ``xb`` (any integer or float dtype; cast afterwards)."""
        raise NotImplementedError

    def decode(self, codes: torch.Tensor, fmt: Format, qparams: QParams, dtype: torch.dtype) -> torch.Tensor:
        shape = tuple(codes.shape)
        if codes.numel() == 0:
            return torch.empty(shape, dtype=dtype, device=codes.device)
        cb = to_blocks(codes.to(self.index_dtype), qparams.block)
        return from_blocks(self.decode_blocks(cb, fmt, qparams, codes.dim()), shape).to(dtype)

    def decode_blocks(self, cb: torch.Tensor, fmt: Format, qparams: QParams, ndim: int) -> torch.Tensor:
        """Float32 values of the blocked codes ``cb``."""
        raise NotImplementedError

    def range_qparams(
        self,
        x: torch.Tensor,
        xb: torch.Tensor,
        fmt: Format,
        block: tuple[int, ...],
        symmetric: bool,
        clip_ratio: float,
    ) -> QParams:
        """``from_range`` of each block's (clipped) min and max: the usual ``choose_blocks``."""
        return self.from_range(*block_range(x, xb, clip_ratio), fmt, block, symmetric)


def block_range(x: torch.Tensor, xb: torch.Tensor, clip_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each block's min and max of ``xb = to_blocks(x, block)``, times ``clip_ratio``."""
    if x.dim() == 0:
        return x.float() * clip_ratio, x.float() * clip_ratio
    dims = block_dims(x.dim())
    return xb.amin(dim=dims) * clip_ratio, xb.amax(dim=dims) * clip_ratio


def widen_range(
    min_val: torch.Tensor, max_val: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 ``(min, max, amax)`` with the range widened to include zero (so zero is exact)."""
    min_val = torch.minimum(min_val.float(), torch.zeros_like(min_val, dtype=torch.float32))
    max_val = torch.maximum(max_val.float(), torch.zeros_like(max_val, dtype=torch.float32))
    return min_val, max_val, torch.maximum(-min_val, max_val)


# --- registry -----------------------------------------------------------------------------------------

_REGISTRY: dict[str, Codec] = {}


def register(codec: Codec) -> Codec:
    """Register ``codec`` for its ``family`` (once; a second codec for a family is refused).

    >>> class Toy(BlockCodec):
    ...     family = "doc-toy"
    >>> register(Toy()).family in families()
    True
    >>> _ = _REGISTRY.pop("doc-toy")
    """
    family = getattr(codec, "family", "")
    if not isinstance(family, str) or not family:
        raise ValueError(f"codec {type(codec).__name__} needs a non-empty string 'family'")
    if family in _REGISTRY:
        raise ValueError(
            f"format family {family!r} already has a codec ({type(_REGISTRY[family]).__name__}); "
            "pick another family name"
        )
    _REGISTRY[family] = codec
    return codec


def families() -> tuple[str, ...]:
    """Every registered family, in registration order."""
    return tuple(_REGISTRY)


def codec_for(fmt: Format | str) -> Codec:
    """The codec of a format (or of a family name).

    >>> import lowbit.formats as F
    >>> type(codec_for(F.get("kmeans_4"))).__name__
    'CodebookCodec'
    """
    family = fmt if isinstance(fmt, str) else fmt.family
    codec = _REGISTRY.get(family)
    if codec is None:
        raise ValueError(f"no codec for format family {family!r}; registered: {', '.join(_REGISTRY)}")
    return codec
