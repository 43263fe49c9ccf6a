"""``QuantizedWeight``: one weight tensor stored as packed codes plus its scales / codebook.

This is the storage half of a quantized module: what was quantized (format, granularity, symmetry)
lives in plain attributes, how it is stored lives in buffers, so ``state_dict()`` is exactly what
goes to disk and ``.to(device)`` moves everything. A 4-bit weight takes half a byte per value in
memory as on disk; ``dequantize()`` rebuilds the float tensor on demand (the reference path).

Buffers (the ``state_dict`` keys under the module's name):

==============  ======================================================================
``packed``      uint8 bit-packed codes (``lowbit.packing``), or the fp16 / bf16 tensor itself
``scale``       float32, one per block (absent for float casts and product quantization)
``zero_point``  asymmetric integer formats: zero points in the code dtype, one per block
``codebook``    codebook formats: ``[*blocks, 2**bits]``; product quantization: ``[subspaces, 2**bits, dim]``
==============  ======================================================================

>>> import torch
>>> w = torch.randn(64, 128)
>>> qw = QuantizedWeight.from_float(w, "int4", "group:32", symmetric=False)
>>> qw.stored_bytes, round(qw.bits_per_param, 3)
(5376, 5.25)
>>> float((qw.dequantize() - w).abs().max()) < 0.5
True
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lowbit import formats, packing
from lowbit import granularity as gran
from lowbit.formats import Format
from lowbit.granularity import Granularity, blocked_shape
from lowbit.primitives import QParams, check_finite, dequantize, quantize


def _as_format(fmt: Format | str) -> Format:
    return formats.get(fmt) if isinstance(fmt, str) else fmt


class QuantizedWeight(nn.Module):
    """A packed quantized weight. Build it with ``from_float`` (quantize now) or ``from_codes``
    (codes and parameters chosen elsewhere: GPTQ, QAT, k-means), or ``empty`` (shapes only, to be
    filled by ``load_state_dict`` when loading an artifact)."""

    def __init__(
        self,
        fmt: Format | str,
        granularity: Granularity | str,
        symmetric: bool,
        shape: tuple[int, ...],
        block: tuple[int, ...],
    ) -> None:
        super().__init__()
        self.fmt = _as_format(fmt)
        self.granularity = gran.parse(granularity)
        self.symmetric = bool(symmetric)
        self.shape = tuple(int(s) for s in shape)
        self.block = tuple(int(b) for b in block)
        self.algorithm = "rtn"  # how codes were chosen; recorded in the manifest
        self.info: dict[str, float] = {}  # what the algorithm measured (e.g. reconstruction error)

    # --- construction ------------------------------------------------------------------------------

    @classmethod
    def from_float(
        cls,
        w: torch.Tensor,
        fmt: Format | str,
        granularity: Granularity | str = "channel",
        symmetric: bool = True,
        qparams: QParams | None = None,
        what: str = "weight",
    ) -> QuantizedWeight:
        """Quantize ``w`` (parameters chosen from ``w`` unless ``qparams`` is given).

        >>> QuantizedWeight.from_float(torch.ones(2, 8), "nf4", "tensor").fmt.name
        'nf4'
        """
        from lowbit.primitives import choose_qparams

        fmt = _as_format(fmt)
        g = gran.parse(granularity)
        w = w.detach()
        check_finite(w, what)
        if fmt.family == "vector" and w.dim() < 2:
            raise ValueError(
                f"{what}: product quantization needs a 2-D (or conv) weight, got {tuple(w.shape)}"
            )
        qp = qparams if qparams is not None else choose_qparams(w, fmt, g, symmetric)
        codes = quantize(w, fmt, qp)
        return cls.from_codes(codes, fmt, qp, g, symmetric, tuple(w.shape))

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        fmt: Format | str,
        qparams: QParams,
        granularity: Granularity | str,
        symmetric: bool,
        shape: tuple[int, ...],
    ) -> QuantizedWeight:
        """Wrap codes already produced by ``lowbit.primitives.quantize`` (or an algorithm) and pack them."""
        fmt = _as_format(fmt)
        qw = cls(fmt, granularity, symmetric, shape, qparams.block)
        device = codes.device
        if fmt.family == "float":
            qw.register_buffer("packed", codes.to(fmt.torch_dtype).contiguous())
            return qw
        unsigned = packing.to_unsigned(codes, fmt.qmin) if fmt.family == "int" else codes.to(torch.uint8)
        qw.register_buffer("packed", packing.pack(unsigned, fmt.bits))
        if fmt.family != "vector":
            qw.register_buffer("scale", qparams.scale.float().to(device).contiguous())
        if qparams.zero_point is not None:
            zp = qparams.zero_point.to(device)
            qw.register_buffer("zero_point", zp.to(fmt.code_dtype).contiguous())
        if qparams.codebook is not None:
            qw.register_buffer("codebook", qparams.codebook.float().to(device).contiguous())
        return qw

    @classmethod
    def empty(cls, spec: dict[str, Any], device: torch.device | str = "cpu") -> QuantizedWeight:
        """Zero-filled buffers shaped as ``spec`` (a ``manifest()`` entry) says; for loading artifacts."""
        fmt = formats.get(spec["format"])
        shape = tuple(spec["shape"])
        block = tuple(spec["block"])
        qw = cls(fmt, spec["granularity"], spec["symmetric"], shape, block)
        qw.algorithm = spec.get("algorithm", "rtn")
        for name, (tshape, dtype) in qw.expected_buffers(spec.get("has_zero_point", False)).items():
            qw.register_buffer(name, torch.zeros(tshape, dtype=dtype, device=device))
        return qw

    def expected_buffers(self, has_zero_point: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every buffer this weight stores; used to validate artifacts."""
        fmt, shape = self.fmt, self.shape
        if fmt.family == "float":
            assert fmt.torch_dtype is not None
            return {"packed": (shape, fmt.torch_dtype)}
        numel = self.code_count
        out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            "packed": ((packing.packed_nbytes(numel, fmt.bits),), torch.uint8)
        }
        if fmt.family == "vector":
            rows, cols = _matrix_shape(shape)
            out["codebook"] = ((math.ceil(cols / fmt.vector_dim), fmt.levels, fmt.vector_dim), torch.float32)
            return out
        bshape = blocked_shape(shape, self.block)
        out["scale"] = (bshape, torch.float32)
        if has_zero_point:
            out["zero_point"] = (bshape, fmt.code_dtype)
        if fmt.family == "codebook":
            out["codebook"] = ((*bshape, fmt.levels), torch.float32)
        return out

    # --- reading ------------------------------------------------------------------------------------

    @property
    def code_count(self) -> int:
        """Number of stored codes (values, or sub-vectors for product quantization)."""
        if self.fmt.family == "vector":
            rows, cols = _matrix_shape(self.shape)
            return rows * math.ceil(cols / self.fmt.vector_dim)
        return math.prod(self.shape)

    def qparams(self) -> QParams:
        """The ``QParams`` these buffers describe (for ``lowbit.primitives.dequantize``)."""
        scale = getattr(self, "scale", None)
        if scale is None:
            scale = torch.ones((), device=self.packed.device)
        zp = getattr(self, "zero_point", None)
        block = self.shape if self.fmt.family == "vector" else self.block
        return QParams(
            scale, None if zp is None else zp.to(torch.int32), block, getattr(self, "codebook", None)
        )

    def codes(self) -> torch.Tensor:
        """Unpacked codes, as ``lowbit.primitives.quantize`` returned them."""
        fmt = self.fmt
        if fmt.family == "float":
            return self.packed
        flat = packing.unpack(self.packed, fmt.bits, self.code_count)
        if fmt.family == "int":
            flat = packing.from_unsigned(flat, fmt.qmin, fmt.code_dtype)
        if fmt.family == "vector":
            rows, cols = _matrix_shape(self.shape)
            return flat.reshape(rows, -1)
        return flat.reshape(self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight these codes stand for (shape ``self.shape``)."""
        return dequantize(self.codes(), self.fmt, self.qparams(), dtype=dtype).reshape(self.shape)

    def dequantize_rows(self, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``dequantize()[index]`` for a 2-D weight, unpacking only the rows asked for when every row
        has its own parameters (an embedding lookup touches a few rows of a large table).

        >>> qw = QuantizedWeight.from_float(torch.randn(100, 16), "int4", "group:8")
        >>> idx = torch.tensor([[3, 99]])
        >>> torch.equal(qw.dequantize_rows(idx), qw.dequantize()[idx])
        True
        """
        fmt = self.fmt
        rows_own_params = (
            len(self.shape) == 2 and self.block[0] == 1 and fmt.family in ("int", "grid", "codebook")
        )
        if fmt.family == "float":
            return self.packed[index].to(dtype)
        if not rows_own_params or 8 % fmt.bits or (self.shape[1] * fmt.bits) % 8:
            return self.dequantize(dtype)[index]
        rows, cols = self.shape
        flat = index.reshape(-1)
        row_bytes = self.packed.reshape(rows, cols * fmt.bits // 8)[flat].reshape(-1)
        codes = packing.unpack(row_bytes, fmt.bits, flat.numel() * cols)
        if fmt.family == "int":
            codes = packing.from_unsigned(codes, fmt.qmin, fmt.code_dtype)
        qp = self.qparams()
        pick = lambda t: None if t is None else t[flat]  # noqa: E731
        sub = QParams(pick(qp.scale), pick(qp.zero_point), self.block, pick(qp.codebook))
        values = dequantize(codes.reshape(flat.numel(), cols), fmt, sub, dtype=dtype)
        return values.reshape(*index.shape, cols)

    @property
    def stored_bytes(self) -> int:
        """Bytes of every buffer: codes, scales, zero points and codebooks."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bits_per_param(self) -> float:
        """Stored bits per weight value, scales and codebooks included."""
        return self.stored_bytes * 8 / max(self.numel, 1)

    def manifest(self) -> dict[str, Any]:
        """What was quantized and how it is stored (JSON-ready)."""
        return {
            "format": self.fmt.name,
            "granularity": _granularity_text(self.granularity),
            "symmetric": self.symmetric,
            "algorithm": self.algorithm,
            "shape": list(self.shape),
            "block": list(self.block),
            "has_zero_point": hasattr(self, "zero_point"),
            "stored_bytes": self.stored_bytes,
            "bits_per_param": round(self.bits_per_param, 4),
            "info": dict(self.info),
        }

    def extra_repr(self) -> str:
        return (
            f"{self.fmt.name}, {self.granularity}, shape={self.shape}, {self.bits_per_param:.2f} bits/param"
        )


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """Rows and columns of a weight seen as a matrix (conv kernels flattened per output channel)."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


def _granularity_text(g: Granularity) -> str:
    """Inverse of ``lowbit.granularity.parse``."""
    if isinstance(g, gran.PerChannel):
        return f"channel:{g.axis}"
    if isinstance(g, gran.PerGroup):
        return f"group:{g.size}"
    if isinstance(g, gran.PerToken):
        return "token"
    return "tensor"
