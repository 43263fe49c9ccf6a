"""lowbit weights and activation specs <-> compressed-tensors ``QuantizationArgs``, exactly or not at all.

compressed-tensors stores affine integers as *signed* codes ``-2**(b-1) .. 2**(b-1)-1`` with an
optional zero point in the same range, and fp8 weights as ``float8_e4m3fn`` values; each times a
scale per tensor, per output channel or per group of inputs. lowbit's ``intN`` codes are those
signed codes; its ``uintN`` codes (``0 .. 2**b-1``, zero point likewise) are the same numbers
shifted by ``2**(b-1)``, which changes no dequantized value: ``(q - z) * s``. lowbit's
``fp8_e4m3`` code (sign bit, then the magnitude's index in the e4m3 grid) is the e4m3 bit pattern.

Anything else (NF4, codebooks, log2, a group size that does not divide the input width, a
zero-point-free ``uintN``, symmetric *dynamic* integer activations, whose scale compressed-tensors
takes as ``amax / (2**b - 1) * 2`` where lowbit takes ``amax / qmax``) raises ``ArtifactError``.

>>> import torch
>>> from lowbit.nn.qweight import QuantizedWeight
>>> qw = QuantizedWeight.from_float(torch.randn(8, 64), "uint4", "group:32", symmetric=False)
>>> args = weight_args(qw, "demo")
>>> args.num_bits, args.strategy, args.group_size, args.symmetric
(4, 'group', 32, False)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType

from lowbit import formats
from lowbit import granularity as gran
from lowbit.errors import ArtifactError
from lowbit.nn.activation import ActivationQuantizer
from lowbit.nn.qweight import QuantizedWeight
from lowbit.primitives import QParams
from lowbit.recipes.spec import ActivationSpec

SUPPORTED = (
    "weights: int1..int8 (symmetric or with zero points), uint1..uint8 with zero points, fp8_e4m3; "
    "per tensor, per output channel, or per group of inputs dividing the input width. "
    "activations: none; static per-tensor int / uint / fp8_e4m3; dynamic per-token or per-tensor "
    "with zero points (uint8, int8 asymmetric) or fp8_e4m3"
)
FP8_NAN_CODES = (0x7F, 0xFF)  # e4m3fn has no infinities; these two bit patterns are NaN


def _fail(what: str, why: str) -> ArtifactError:
    return ArtifactError(f"{what}: {why}; compressed-tensors can store {SUPPORTED}")


# --- lowbit -> compressed-tensors ------------------------------------------------------------------


def _strategy(qw: QuantizedWeight, what: str) -> dict[str, Any]:
    out_f, in_f = qw.shape
    g = qw.granularity
    if isinstance(g, gran.PerTensor):
        return {"strategy": QuantizationStrategy.TENSOR.value}
    if isinstance(g, gran.PerChannel) and g.axis % 2 == 0:
        return {"strategy": QuantizationStrategy.CHANNEL.value}
    if isinstance(g, gran.PerGroup):
        size = qw.block[1]
        if in_f % size:
            raise _fail(
                what,
                f"groups of {g.size} do not divide the input width {in_f} (lowbit pads the last "
                "group, compressed-tensors needs whole groups); re-quantize with a group size that "
                f"divides {in_f}",
            )
        return {"strategy": QuantizationStrategy.GROUP.value, "group_size": size}
    raise _fail(what, f"granularity {g} has no compressed-tensors strategy")


def weight_args(qw: QuantizedWeight, what: str) -> QuantizationArgs:
    """The ``QuantizationArgs`` that store ``qw`` exactly; ``ArtifactError`` naming ``what`` if none do."""
    fmt = qw.fmt
    if len(qw.shape) != 2:
        raise _fail(what, f"a {len(qw.shape)}-d weight is not a linear layer's")
    has_zp = hasattr(qw, "zero_point")
    if fmt.family == "int":
        if not fmt.signed and not has_zp:
            raise _fail(what, f"{fmt.name} without zero points has no signed equivalent")
        kind = {"num_bits": fmt.bits, "type": QuantizationType.INT.value, "symmetric": not has_zp}
    elif fmt.name == "fp8_e4m3":
        kind = {"num_bits": 8, "type": QuantizationType.FLOAT.value, "symmetric": True}
    else:
        raise _fail(
            what,
            f"weight format {fmt.name} has no compressed-tensors equivalent; quantize this layer "
            "with int4 / uint4 / int8 / fp8_e4m3 (or exclude it from the recipe)",
        )
    return QuantizationArgs(**kind, **_strategy(qw, what))


def ct_codes(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``qw``'s codes and zero points as compressed-tensors stores them before packing: signed int8
    (shifted by ``2**(bits-1)`` for ``uintN``), or ``float8_e4m3fn`` for fp8."""
    codes, zp = qw.codes(), getattr(qw, "zero_point", None)
    if qw.fmt.family != "int":
        return codes.contiguous().view(torch.float8_e4m3fn), None
    shift = 0 if qw.fmt.signed else 1 << (qw.fmt.bits - 1)
    codes = (codes.to(torch.int16) - shift).to(torch.int8)
    if zp is not None:
        zp = (zp.to(torch.int16) - shift).to(torch.int8)
    return codes, zp


def ct_scale(qw: QuantizedWeight, args: QuantizationArgs) -> torch.Tensor:
    """lowbit's float32 scales laid out as compressed-tensors': ``[1]``, ``[out, 1]``, ``[out, groups]``."""
    scale = qw.scale_values()
    return scale.reshape(1) if args.strategy == QuantizationStrategy.TENSOR.value else scale


def activation_args(quant: ActivationQuantizer | None, what: str) -> QuantizationArgs | None:
    """The ``input_activations`` args for a layer's input quantizer (``None``: float inputs)."""
    if quant is None:
        return None
    spec, fmt = quant.spec, quant.fmt
    dynamic = spec.mode == "dynamic"
    strategy = "token" if isinstance(quant.granularity, gran.PerToken) else "tensor"
    if fmt.name == "fp8_e4m3":
        return QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy, dynamic=dynamic)
    if fmt.family != "int":
        raise _fail(what, f"input format {fmt.name} has no compressed-tensors equivalent")
    has_zp = not spec.symmetric if dynamic else hasattr(quant, "zero_point")
    if not fmt.signed and not has_zp:
        raise _fail(what, f"{fmt.name} inputs without a zero point have no signed equivalent")
    if dynamic and not has_zp:
        raise _fail(
            what,
            "symmetric dynamic inputs: compressed-tensors scales them by amax / "
            f"{((1 << fmt.bits) - 1) / 2}, lowbit by amax / {fmt.qmax}; use asymmetric dynamic inputs "
            "(lowbit's int8-dynamic preset) or static ones",
        )
    return QuantizationArgs(
        num_bits=fmt.bits, type="int", symmetric=not has_zp, strategy=strategy, dynamic=dynamic
    )


def activation_tensors(quant: ActivationQuantizer, args: QuantizationArgs) -> dict[str, torch.Tensor]:
    """``input_scale`` (and ``input_zero_point``) of a static input quantizer, as compressed-tensors
    stores them (signed zero point, one value each)."""
    if args.dynamic:
        return {}
    out = {"input_scale": quant.scale.float().reshape(1)}
    zp = getattr(quant, "zero_point", None)
    if zp is not None:
        shift = 0 if quant.fmt.signed else 1 << (quant.fmt.bits - 1)
        out["input_zero_point"] = (zp.to(torch.int32) - shift).to(torch.int8).reshape(1)
    return out


# --- compressed-tensors -> lowbit ------------------------------------------------------------------


@dataclass(frozen=True)
class WeightLayout:
    """What a compressed-tensors weight scheme means in lowbit terms, for one ``[out, in]`` weight."""

    format: str
    granularity: str
    symmetric: bool
    shape: tuple[int, int]
    block: tuple[int, int]
    scale_shape: tuple[int, ...]
    shift: int  # added to compressed-tensors' signed codes / zero points to get lowbit's

    def qparams(self, scale: torch.Tensor, zero_point: torch.Tensor | None) -> QParams:
        """lowbit ``QParams`` from compressed-tensors' scale and (signed) zero point."""
        bshape = gran.blocked_shape(self.shape, self.block)
        zp = None if zero_point is None else zero_point.to(torch.int32).reshape(bshape) + self.shift
        return QParams(scale.float().reshape(bshape).contiguous(), zp, self.block)


def weight_layout(args: QuantizationArgs, shape: tuple[int, int], what: str) -> WeightLayout:
    """The lowbit format / granularity / block for ``args`` on a weight of ``shape``."""
    out_f, in_f = shape
    bits = args.num_bits
    if args.type == QuantizationType.FLOAT.value:
        if bits != 8 or not args.symmetric:
            raise _fail(what, f"float weights of {bits} bits (symmetric={args.symmetric}) are not supported")
        fmt, shift = "fp8_e4m3", 0
    elif not 1 <= bits <= 8:
        raise _fail(what, f"{bits}-bit integer weights are not supported")
    else:
        fmt, shift = (f"int{bits}", 0) if args.symmetric else (f"uint{bits}", 1 << (bits - 1))
    if args.block_structure is not None or args.actorder not in (None, "weight", "static"):
        raise _fail(what, f"strategy {args.strategy} / actorder {args.actorder} is not supported")
    if args.dynamic:
        raise _fail(what, "dynamic weight quantization is not supported")
    if args.strategy == QuantizationStrategy.TENSOR.value:
        granularity, block, scale_shape = "tensor", (out_f, in_f), (1,)
    elif args.strategy == QuantizationStrategy.CHANNEL.value:
        granularity, block, scale_shape = "channel", (1, in_f), (out_f, 1)
    elif args.strategy == QuantizationStrategy.GROUP.value:
        size = int(args.group_size or 0)
        if size <= 0 or in_f % size:
            raise _fail(what, f"group size {size} does not divide the input width {in_f}")
        granularity, block, scale_shape = f"group:{size}", (1, size), (out_f, in_f // size)
    else:
        raise _fail(what, f"weight strategy {args.strategy!r} is not supported")
    return WeightLayout(fmt, granularity, args.symmetric, (out_f, in_f), block, scale_shape, shift)


def lowbit_codes(codes: torch.Tensor, layout: WeightLayout, what: str) -> torch.Tensor:
    """compressed-tensors codes (int8, or ``float8_e4m3fn``) as lowbit codes, range-checked."""
    fmt = formats.get(layout.format)
    if fmt.family != "int":
        raw = codes.contiguous().view(torch.uint8)
        if bool(((raw & 0x7F) == 0x7F).any()):
            raise ArtifactError(f"{what}: fp8 weight holds NaN codes; the checkpoint is corrupt")
        return raw
    lo, hi = fmt.qmin - layout.shift, fmt.qmax - layout.shift
    if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise ArtifactError(
            f"{what}: codes span {int(codes.min())}..{int(codes.max())}, outside {lo}..{hi} for "
            f"{fmt.bits}-bit weights; the checkpoint is corrupt"
        )
    return (codes.to(torch.int16) + layout.shift).to(fmt.code_dtype)


def activation_spec(args: QuantizationArgs, what: str) -> ActivationSpec:
    """The lowbit ``ActivationSpec`` equal to compressed-tensors ``input_activations`` args."""
    strategy = args.strategy
    if strategy not in ("tensor", "token") or args.block_structure is not None:
        raise _fail(what, f"input strategy {strategy!r} is not supported")
    if args.dynamic not in (True, False):
        raise _fail(what, f"dynamic={args.dynamic!r} inputs are not supported")
    mode = "dynamic" if args.dynamic else "static"
    if args.type == QuantizationType.FLOAT.value:
        if args.num_bits != 8 or not args.symmetric:
            raise _fail(what, f"float inputs of {args.num_bits} bits (symmetric={args.symmetric})")
        return ActivationSpec(mode=mode, format="fp8_e4m3", granularity=strategy, symmetric=True)
    if not 2 <= args.num_bits <= 8:
        raise _fail(what, f"{args.num_bits}-bit integer inputs are not supported")
    if args.dynamic and args.symmetric:
        raise _fail(
            what,
            "symmetric dynamic integer inputs: compressed-tensors scales them by amax / "
            f"{((1 << args.num_bits) - 1) / 2}, which no lowbit format reproduces",
        )
    fmt = f"int{args.num_bits}" if args.symmetric else f"uint{args.num_bits}"
    return ActivationSpec(mode=mode, format=fmt, granularity=strategy, symmetric=args.symmetric)
