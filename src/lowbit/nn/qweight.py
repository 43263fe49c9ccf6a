"""``QuantizedWeight``: one weight tensor stored as packed codes plus its scales / codebook.

This is the storage half of a quantized module: what was quantized (format, granularity, symmetry)
lives in plain attributes, how it is stored lives in buffers, so ``state_dict()`` is exactly what
goes to disk and ``.to(device)`` moves everything. A 4-bit weight takes half a byte per value in
memory as on disk; ``dequantize()`` rebuilds the float tensor on demand (the reference path).

Buffers (the ``state_dict`` keys under the module's name):

==============  ======================================================================
``packed``      uint8 bit-packed codes (``lowbit.packing``), or the fp16 / bf16 tensor itself
``scale``       one per block (absent for float casts and product quantization): float32, or the
                format's ``scale_dtype`` (fp16 / bf16; MX e8m0 and NVFP4 e4m3 as their bytes)
``tensor_scale``  NVFP4: the float32 power of two the e4m3 block scales are multiplied by
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

from lowbit import formats
from lowbit import granularity as gran
from lowbit.codecs import codec_for
from lowbit.codecs.scales import scale_from_buffers
from lowbit.formats import Format
from lowbit.granularity import Granularity
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
        codec_for(fmt).check_weight(w, fmt, what)
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
        codec = codec_for(fmt)
        qw = cls(fmt, granularity, symmetric, shape, qparams.block)
        # Registration order is state_dict order, which is the artifact's tensor order.
        qw.register_buffer("packed", codec.store_codes(codes, fmt))
        for name, tensor in codec.param_buffers(qparams, fmt, codes.device).items():
            qw.register_buffer(name, tensor)
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
        codec = codec_for(self.fmt)
        out = {"packed": codec.code_buffer(self.fmt, self.shape)}
        out.update(codec.expected_params(self.fmt, self.shape, self.block, has_zero_point))
        return out

    # --- reading ------------------------------------------------------------------------------------

    @property
    def code_count(self) -> int:
        """Number of stored codes (values, or sub-vectors for product quantization)."""
        return codec_for(self.fmt).code_count(self.fmt, self.shape)

    def scale_values(self) -> torch.Tensor:
        """Float32 scales, one per block, whatever type they are stored in (float32, fp16, bf16,
        MX e8m0 bytes, NVFP4 e4m3 bytes times the tensor's scale); ones when nothing is stored.

        >>> qw = QuantizedWeight.from_float(torch.randn(4, 32), "mxfp4", "group:32")
        >>> qw.scale.dtype, qw.scale_values().dtype
        (torch.uint8, torch.float32)
        """
        if getattr(self, "scale", None) is None:
            return torch.ones((), device=self.packed.device)
        return scale_from_buffers(dict(self.named_buffers()), self.fmt)

    def qparams(self) -> QParams:
        """The ``QParams`` these buffers describe (for ``lowbit.primitives.dequantize``)."""
        scale = self.scale_values()
        zp = getattr(self, "zero_point", None)
        block = codec_for(self.fmt).stored_block(self.fmt, self.shape, self.block)
        return QParams(
            scale, None if zp is None else zp.to(torch.int32), block, getattr(self, "codebook", None)
        )

    def codes(self) -> torch.Tensor:
        """Unpacked codes, as ``lowbit.primitives.quantize`` returned them."""
        return codec_for(self.fmt).load_codes(self.packed, self.fmt, self.shape)

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
        values = codec_for(self.fmt).read_rows(self, index, dtype)
        return self.dequantize(dtype)[index] if values is None else values

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


def _granularity_text(g: Granularity) -> str:
    """Inverse of ``lowbit.granularity.parse``."""
    if isinstance(g, gran.PerChannel):
        return f"channel:{g.axis}"
    if isinstance(g, gran.PerGroup):
        return f"group:{g.size}"
    if isinstance(g, gran.PerToken):
        return "token"
    return "tensor"
