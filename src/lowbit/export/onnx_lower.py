"""Lower one quantized layer to ONNX Runtime nodes, using lowbit's own codes and scales.

Each ``lower_*`` function takes the layer, the name of its input value and of its output value,
and appends nodes and initializers to a :class:`Builder`. The kernel chosen for every layer is
decided first by :func:`choose_kernel` (also used by ``lowbit doctor`` before anything is
exported), so what the report says is what the graph contains.

Kernels (``Kernel.name``):

==========================  ==================================================================
``DynamicQuantizeMatMul``   int8 weights, dynamic per-tensor uint8 activations (one fused op; layers
                            sharing an input: one DynamicQuantizeLinear + MatMulIntegerToFloat each)
``MatMulIntegerToFloat``    int8 weights, dynamic per-token activations (row scales applied after)
``ConvInteger``             opt-in for int8-dynamic convs (``ExportOptions.dynamic_conv``): one
                            DynamicQuantizeLinear (per tensor) + ConvInteger, scaled per channel
``QDQ``                     static activations: Q/DQ pairs that ORT fuses to QLinearConv /
                            QLinearMatMul; 2-7-bit codes ride in int8 Q/DQ with an integer clamp
``MatMulNBits``             2/4/8-bit block-wise weight-only (weights dequantized inside the kernel)
``GatherDequant``           integer embedding table gathered as codes, dequantized per looked-up row
``fp16-storage``            fp16/bf16 weights stored at half size, computed in fp32
``float``                   float weights: ORT has no kernel for this format (``storage_only``)
==========================  ==================================================================

>>> import torch
>>> from lowbit.recipes import WeightSpec
>>> from lowbit.nn import QuantizedLinear
>>> layer = QuantizedLinear.from_float(torch.nn.Linear(64, 8), WeightSpec(format="uint4",
...     granularity="group:32", symmetric=False))
>>> choose_kernel(layer).name
'MatMulNBits'
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper

from lowbit import granularity as gran
from lowbit.export.onnx_unpack import supported as unpack_supported
from lowbit.export.onnx_unpack import unpacked_weight
from lowbit.nn.base import QuantizedModule
from lowbit.nn.layers import QuantizedConv, QuantizedEmbedding, QuantizedLinear
from lowbit.nn.qweight import QuantizedWeight
from lowbit.primitives import EPS

MS = "com.microsoft"  # ONNX Runtime's contrib-operator domain
NBITS_BITS = (2, 4, 8)  # widths MatMulNBits executes


@dataclass(frozen=True)
class Kernel:
    """What one layer runs as in ONNX Runtime.

    Attributes:
        name: kernel label (see the module docstring).
        precision: ``int8`` / ``int4`` / ``int2`` (integer arithmetic or integer weights inside the
            kernel), ``fp16`` (half storage) or ``float``.
        storage_only: the format is kept by lowbit but ORT computes with dequantized float weights.
        note: why this kernel was chosen, for reports.
    """

    name: str
    precision: str
    storage_only: bool = False
    note: str = ""


@dataclass(frozen=True)
class ExportOptions:
    """Knobs of the lowering (defaults are what measured best on x86 CPUs, see docs/notes/issue-5.md).

    Attributes:
        u8u8: store int8 weights as uint8 + 128 so MLAS uses its u8u8 kernel. Needed on AVX2 CPUs
            without VNNI, where the u8 x s8 ``vpmaddubsw`` path saturates 16-bit pair sums; ``None``
            decides from the CPU (``lowbit.doctor.cpu_features``).
        nbits_accuracy_level: MatMulNBits ``accuracy_level`` (4: int8 activations inside the
            kernel, fastest; 0: fp32 compute, closest to lowbit's reference).
        dynamic_conv: how int8-dynamic convs run: ``"float"`` (float Conv on the dequantized weights,
            reported in ``fallbacks``; faster on x86 CPUs, see docs/onnx.md) or ``"ConvInteger"``
            (DynamicQuantizeLinear + ConvInteger, per-tensor uint8 activations).
        fuse_shared_inputs: merge dynamic int8 linears reading the same input (attention Q/K/V)
            into one quantize + one GEMM; exact, since the activation is quantized the same way.
        transformer_fusions: on graphs with LayerNormalization, run ONNX Runtime's transformer
            optimizer (Gelu fusion: ~6% faster MiniLM at batch 32 here); exact up to float rounding.
    """

    u8u8: bool | None = None
    nbits_accuracy_level: int = 4
    dynamic_conv: str = "float"
    fuse_shared_inputs: bool = True
    transformer_fusions: bool = True


def _granularity(qw: QuantizedWeight) -> gran.Granularity:
    return qw.granularity


def _is_int(qw: QuantizedWeight) -> bool:
    return qw.fmt.family == "int"


def _per_row_scales(qw: QuantizedWeight) -> bool:
    """One scale per output row (per channel on axis 0, or per tensor)."""
    g = _granularity(qw)
    return isinstance(g, gran.PerTensor) or (isinstance(g, gran.PerChannel) and g.axis == 0)


def _storage_kernel(qw: QuantizedWeight, what: str) -> Kernel:
    if qw.fmt.family == "float":
        return Kernel("fp16-storage", "fp16", note=f"{qw.fmt.name} weights, fp32 compute")
    if unpack_supported(qw):
        return Kernel(
            "float",
            "float",
            storage_only=True,
            note=f"{qw.fmt.name} {what}: no ONNX Runtime kernel; the file stores the "
            f"{qw.fmt.bits}-bit codes, unpacked once when ORT loads it, float compute",
        )
    return Kernel(
        "float",
        "float",
        storage_only=True,
        note=f"{qw.fmt.name} {what}: no ONNX Runtime kernel, exported as dequantized float weights",
    )


def _narrow_static(qw: QuantizedWeight, aq: Any) -> bool:
    """Integer weights (per row) and static integer activations, all at most 8 bits and not both
    exactly int8: their codes fit int8 / uint8 Q/DQ, the activation codes clamped to their range."""
    narrow = qw.fmt.bits < 8 or aq.fmt.bits < 8
    fits = _is_int(qw) and qw.fmt.bits <= 8 and _per_row_scales(qw)
    return narrow and fits and aq.fmt.family == "int" and aq.fmt.bits <= 8


def choose_kernel(layer: QuantizedModule, dynamic_conv: str = "float") -> Kernel:
    """The ONNX Runtime kernel ``layer`` gets (see the module docstring for the list).

    Static layers with integer weights (per channel / tensor) and integer activations of at most 8
    bits, narrower than W8A8, also get ``QDQ``: their N-bit codes held in int8 / uint8 Q/DQ
    (precision ``int{N}``, the wider of the two widths).

    >>> from lowbit.recipes import WeightSpec
    >>> lin = QuantizedLinear.from_float(torch.nn.Linear(16, 4), WeightSpec(format="nf4",
    ...     granularity="group:16"))
    >>> k = choose_kernel(lin); k.name, k.storage_only
    ('float', True)
    """
    if isinstance(layer, QuantizedEmbedding):
        qw = layer.qweight
        if _is_int(qw) and qw.fmt.bits <= 8 and _per_row_scales(qw):
            return Kernel("GatherDequant", f"int{qw.fmt.bits}", note="codes gathered, rows dequantized")
        return _storage_kernel(qw, "embedding")
    if not isinstance(layer, (QuantizedLinear, QuantizedConv)):
        return Kernel("float", "float", note=f"{type(layer).__name__}: exported through PyTorch as float")
    qw = layer.qweight
    aq = layer.input_quant
    int8_weights = _is_int(qw) and qw.fmt.bits == 8 and _per_row_scales(qw)
    if aq is not None:
        if aq.spec.mode == "static" and _narrow_static(qw, aq):
            wb, ab = qw.fmt.bits, aq.fmt.bits
            note = f"W{wb}A{ab}: N-bit codes in int8 QDQ ({aq.fmt.name} clamp); ORT fuses to QLinear ops"
            return Kernel("QDQ", f"int{max(wb, ab)}", note=note)
        if not int8_weights or aq.fmt.name not in ("uint8", "int8"):
            why = "int8 per-channel weights with 8-bit activations"
            return Kernel("float", "float", True, f"{qw.fmt.name} weights + activations: ORT needs {why}")
        if aq.spec.mode == "static":
            return Kernel("QDQ", "int8", note="static uint8 activations: ORT fuses Q/DQ to QLinear ops")
        if isinstance(layer, QuantizedConv):
            zp = getattr(qw, "zero_point", None)
            if dynamic_conv == "ConvInteger" and (zp is None or bool((zp == zp.reshape(-1)[0]).all())):
                note = "opt-in: per-tensor uint8 activations (lowbit's reference quantizes per row)"
                return Kernel("ConvInteger", "int8", note=note)
            return Kernel(
                "float", "float",
                note="dynamic conv run as float Conv on the dequantized int8 weights (input not quantized): "
                "ORT's ConvInteger measured 3-18x slower here (docs/onnx.md)",
            )  # fmt: skip
        if isinstance(aq.granularity, gran.PerToken):
            return Kernel("MatMulIntegerToFloat", "int8", note="per-token dynamic activations")
        return Kernel("DynamicQuantizeMatMul", "int8", note="per-tensor dynamic activations")
    if isinstance(layer, QuantizedLinear) and _is_int(qw) and qw.fmt.bits in NBITS_BITS:
        if _nbits_block(qw) is not None:
            return Kernel("MatMulNBits", f"int{qw.fmt.bits}", note="block-wise weight-only")
    if isinstance(layer, QuantizedConv) and _is_int(qw):
        return _storage_kernel(qw, "weight-only conv (ORT has no integer-weight float conv)")
    return _storage_kernel(qw, "weights")


# --- graph building -------------------------------------------------------------------------------


class Builder:
    """Collects nodes and initializers under unique names derived from the layer name."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0

    def name(self, prefix: str, what: str) -> str:
        self._count += 1
        return f"{prefix}/{what}_{self._count}"

    def const(self, prefix: str, what: str, value: np.ndarray) -> str:
        n = self.name(prefix, what)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), n))
        return n

    def node(self, op: str, inputs: list[str], prefix: str, outputs: list[str] | None = None, **attrs):
        outputs = outputs or [self.name(prefix, op.lower() + "_out")]
        domain = MS if op in _MS_OPS else ""
        self.nodes.append(
            helper.make_node(op, inputs, outputs, self.name(prefix, op), domain=domain, **attrs)
        )
        return outputs[0] if len(outputs) == 1 else outputs


_MS_OPS = {"DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits", "QAttention"}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


def _smooth(b: Builder, layer: QuantizedModule, x: str, prefix: str, channel_axis: int) -> str:
    """Divide the input by ``input_smooth`` (multiply by its inverse: one cheap broadcast op)."""
    smooth = getattr(layer, "input_smooth", None)
    if smooth is None:
        return x
    inv = (1.0 / smooth.float()).numpy().astype(np.float32)
    if channel_axis == 1:
        inv = (
            inv.reshape(1, -1, 1, 1)
            if isinstance(layer, QuantizedConv) and layer.config["dims"] == 2
            else (inv.reshape(1, -1, 1))
        )
    return b.node("Mul", [x, b.const(prefix, "inv_smooth", inv)], prefix)


def _row_params(qw: QuantizedWeight) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-output-row scale ``[N]`` and zero point (codes' dtype) for per-channel / per-tensor weights."""
    rows = qw.shape[0]
    scale = qw.scale_values().reshape(-1)
    scale = scale.expand(rows) if scale.numel() == 1 else scale
    zp = getattr(qw, "zero_point", None)
    if zp is not None:
        zp = zp.reshape(-1)
        zp = zp.expand(rows) if zp.numel() == 1 else zp
    return _np(scale).astype(np.float32), None if zp is None else _np(zp)


def int8_weight_kn(qw: QuantizedWeight, u8: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes as a ``[K, N]`` matrix for MatMul-style ops plus per-column scale and zero point.

    ``u8``: shift signed codes by +128 (and the zero point with them), which leaves the product
    unchanged and lets MLAS pick its u8u8 kernel (no ``vpmaddubsw`` saturation on AVX2).
    """
    codes = qw.codes().reshape(qw.shape[0], -1).to(torch.int32)
    scale, zp = _row_params(qw)
    zp32 = np.zeros(scale.shape, np.int32) if zp is None else zp.astype(np.int32)
    signed = qw.fmt.signed
    if u8 and signed:
        codes, zp32, signed = codes + 128, zp32 + 128, False
    dtype = np.int8 if signed else np.uint8
    return _np(codes.t()).astype(dtype), scale, zp32.astype(dtype)


# --- linear ---------------------------------------------------------------------------------------


def lower_linear(
    b: Builder,
    layer: QuantizedLinear,
    x: str,
    y: str,
    prefix: str,
    opts: ExportOptions,
    kernel: Kernel,
    u8u8: bool,
) -> None:
    """Append the nodes computing ``y = layer(x)`` with ``kernel``."""
    x = _smooth(b, layer, x, prefix, channel_axis=-1)
    bias = None if layer.bias is None else b.const(prefix, "bias", _np(layer.bias.float()))
    qw = layer.qweight
    if kernel.name in ("DynamicQuantizeMatMul", "MatMulIntegerToFloat"):
        b.initializers = [t for t in b.initializers if t.name != bias]
        lower_dynamic_group(b, [layer], x, [y], prefix, kernel, u8u8, smoothed=True)
    elif kernel.name == "QDQ":
        xq = _qdq_input(b, layer, x, prefix)
        wdq = _dq_weight(b, qw, prefix, u8=u8u8)
        out = b.node("MatMul", [xq, wdq], prefix, None if bias else [y])
        if bias:
            b.node("Add", [out, bias], prefix, [y])
    elif kernel.name == "MatMulNBits":
        _matmul_nbits(b, layer, x, y, prefix, bias, opts.nbits_accuracy_level)
    else:
        w = _float_weight(b, qw, prefix, transpose=True)
        out = b.node("MatMul", [x, w], prefix, None if bias else [y])
        if bias:
            b.node("Add", [out, bias], prefix, [y])


def _float_weight(b: Builder, qw: QuantizedWeight, prefix: str, transpose: bool) -> str:
    """Dequantized float weight (fp16 formats stay fp16 on disk and are cast when loaded)."""
    if qw.fmt.family == "float":
        w = qw.packed.reshape(qw.shape[0], -1)
        w = w.t() if transpose else w.reshape(qw.shape)
        half = b.const(prefix, "w_fp16", _np(w.to(torch.float16)))
        return b.node("Cast", [half], prefix, to=TensorProto.FLOAT)
    unpacked = _codes_in_graph(b, qw, prefix)
    if unpacked is not None:
        return b.node("Transpose", [unpacked], prefix, perm=[1, 0]) if transpose else unpacked
    w = qw.dequantize(torch.float32).reshape(qw.shape[0], -1)
    return b.const(prefix, "w", _np(w.t() if transpose else w))


def _codes_in_graph(b: Builder, qw: QuantizedWeight, prefix: str) -> str | None:
    """The float ``[out, in]`` weight rebuilt in the graph from packed codes (``onnx_unpack``)."""
    if not unpack_supported(qw):
        return None
    built = unpacked_weight(b, qw, prefix)
    if built is None:
        warnings.warn(
            f"lowbit: layer {prefix}: its {qw.fmt.name} codes could not be rebuilt exactly in the graph; "
            "exported as float weights (a larger file)",
            stacklevel=3,
        )
        return None
    return built


def _qdq_input(b: Builder, layer: QuantizedModule, x: str, prefix: str) -> str:
    aq = layer.input_quant
    assert aq is not None
    fmt = aq.fmt
    zp_value = int(getattr(aq, "zero_point", torch.tensor(0)))
    zdt = np.int8 if fmt.signed else np.uint8
    s = b.const(prefix, "x_scale", np.array(float(aq.scale), np.float32))
    z = b.const(prefix, "x_zp", np.array(zp_value, zdt))
    q = b.node("QuantizeLinear", [x, s, z], prefix)
    info = np.iinfo(zdt)
    if (fmt.qmin, fmt.qmax) != (info.min, info.max):
        # Sub-8-bit codes: clamp the 8-bit codes to the format's range, in the integer domain, so
        # they are lowbit's codes exactly (clamp(round(x/s)+zp, 0, 255) then to qmin..qmax is the
        # clamp to qmin..qmax). After the Q, so ORT still fuses DQ -> Conv -> Q into QLinearConv.
        lo = b.const(prefix, "x_qmin", np.array(fmt.qmin, zdt))
        hi = b.const(prefix, "x_qmax", np.array(fmt.qmax, zdt))
        q = b.node("Clip", [q, lo, hi], prefix)
    return b.node("DequantizeLinear", [q, s, z], prefix)


def _code_stretch(qw: QuantizedWeight) -> int:
    """Largest power of two ``k`` with ``k * code`` (and ``k * zero_point``) inside int8 / uint8 for
    every code of the format, and ``scale / k`` exact (no float32 underflow); 1 for 8-bit weights."""
    fmt = qw.fmt
    lo, hi = (-128, 127) if fmt.signed else (0, 255)
    k = 1
    while lo <= 2 * k * fmt.qmin and 2 * k * fmt.qmax <= hi and fmt.qmax > 0:
        k *= 2
    if k > 1 and float(qw.scale_values().abs().min()) / k < float(np.finfo(np.float32).tiny):
        return 1
    return k


def _dq_weight(
    b: Builder, qw: QuantizedWeight, prefix: str, u8: bool, conv_shape: tuple[int, ...] | None = None
) -> str:
    """``DequantizeLinear`` of the int8 codes with per-channel scales (ORT folds it into QLinear ops):
    ``[K, N]`` for MatMul, or the conv kernel shape (channels first) when ``conv_shape`` is given."""
    w, scale, zp = int8_weight_kn(qw, u8)
    k = _code_stretch(qw)
    if k > 1:
        # Sub-8-bit codes times 2**m (and scales / 2**m): the same float weights exactly, but ORT
        # quantizes the conv / gemm bias to int32 at x_scale * w_scale, so a finer w_scale rounds the
        # bias 2**m times more finely (as fine as int8 weights would), which keeps requantized
        # activation codes at lowbit's values. Shifted u8 codes are unshifted first and reshifted.
        shift = 128 if u8 and qw.fmt.signed else 0
        w = ((w.astype(np.int32) - shift) * k + shift).astype(w.dtype)
        zp = ((zp.astype(np.int32) - shift) * k + shift).astype(zp.dtype)
        scale = scale / np.float32(k)
    axis = 1
    if conv_shape is not None:
        w, axis = w.T.reshape(conv_shape), 0
    inputs = [
        b.const(prefix, "w_q", np.ascontiguousarray(w)),
        b.const(prefix, "w_scale", scale),
        b.const(prefix, "w_zp", zp),
    ]
    return b.node("DequantizeLinear", inputs, prefix, axis=axis)


def lower_dynamic_group(
    b: Builder,
    layers: list[QuantizedLinear],
    x: str,
    ys: list[str],
    prefix: str,
    kernel: Kernel,
    u8u8: bool,
    smoothed: bool = False,
) -> None:
    """Dynamic int8 linears that read the same input ``x`` (attention's query / key / value): the
    input is smoothed and quantized once, then each layer runs its own integer GEMM into its ``ys``
    entry (separate GEMMs measured faster than one over concatenated weights plus a Split copy).
    Exact: layers must share the activation spec and the ``input_smooth`` scales."""
    if not smoothed:
        x = _smooth(b, layers[0], x, prefix, channel_axis=-1)
    parts = [int8_weight_kn(layer.qweight, u8u8) for layer in layers]
    if len({p[0].dtype for p in parts}) != 1:  # mixed signed / unsigned codes: all as uint8 (exact)
        parts = [int8_weight_kn(layer.qweight, True) for layer in layers]
    biases = [None if layer.bias is None else _np(layer.bias.float()) for layer in layers]
    if kernel.name == "MatMulIntegerToFloat":
        aq = layers[0].input_quant
        assert aq is not None
        quantized = _per_token_quantize(b, aq, x, parts[0][0].shape[0], prefix)
        for (w, scale, zp), y, bias in zip(parts, ys, biases, strict=True):
            _per_token_gemm(b, quantized, x, y, prefix, w, scale, zp, bias)
        return
    if len(layers) == 1:
        (w, scale, zp), bias = parts[0], biases[0]
        inputs = [x, b.const(prefix, "w", w), b.const(prefix, "w_scale", scale), b.const(prefix, "w_zp", zp)]
        if bias is not None:
            inputs.append(b.const(prefix, "bias", bias))
        b.node("DynamicQuantizeMatMul", inputs, prefix, ys)
        return
    # One DynamicQuantizeLinear (the per-tensor uint8 rule DynamicQuantizeMatMul applies inside),
    # then one MatMulIntegerToFloat per layer.
    q_x, s_x, zp_x = (b.name(prefix, what) for what in ("x_q", "x_scale", "x_zp"))
    b.node("DynamicQuantizeLinear", [x], prefix, [q_x, s_x, zp_x])
    for (w, scale, zp), y, bias in zip(parts, ys, biases, strict=True):
        w_scale, w_zp = b.const(prefix, "w_scale", scale), b.const(prefix, "w_zp", zp)
        inputs = [q_x, b.const(prefix, "w", w), s_x, w_scale, zp_x, w_zp]
        if bias is not None:
            inputs.append(b.const(prefix, "bias", bias))
        b.node("MatMulIntegerToFloat", inputs, prefix, [y])


def _per_token_quantize(b: Builder, aq: Any, x: str, k: int, prefix: str) -> tuple[str, str, str, str | None]:
    """Per-token activations (one scale, and zero point if asymmetric, per row), as lowbit does.

    ORT's fused dynamic ops take one activation scale per tensor, so the integer product runs in
    ``MatMulIntegerToFloat`` (weight scales and zero points folded in) and each row is scaled
    afterwards (and, when asymmetric, corrected by ``zp_row * colsum(W)``).

    Symmetric: the input keeps its shape; each row is multiplied by ``1 / scale`` (exactly as
    ``lowbit.primitives.quantize`` does) and quantized with scale 1. Int8 codes travel as uint8 +
    128 with one zero point of 128 (exact), because ORT's s8 x s8 GEMM is ~10x slower than u8 x s8
    on x86; ``MatMulIntegerToFloat`` removes that zero point itself. Asymmetric: a per-axis
    ``QuantizeLinear`` on the input seen as ``[tokens, K]``.

    Returns ``(codes, row_scale, a_zero_point, zp_row)``; ``zp_row`` is ``None`` when symmetric.
    """
    fmt = aq.fmt
    f32 = np.float32
    eps = b.const(prefix, "eps", np.array(EPS, f32))
    if aq.spec.symmetric:
        # max |x| per row as max(max x, -min x): two reductions, no Abs copy of the whole input
        # (ORT's Abs is a slow single pass here: ~1 ms on a 1024 x 1536 input, 2 threads).
        hi = b.node("ReduceMax", [x], prefix, axes=[-1], keepdims=1)
        lo = b.node("ReduceMin", [x], prefix, axes=[-1], keepdims=1)
        amax = b.node("Max", [hi, b.node("Neg", [lo], prefix)], prefix)
        top = float(fmt.qmax if fmt.qmax > 0 else -fmt.qmin)
        s = b.node(
            "Max", [b.node("Div", [amax, b.const(prefix, "top", np.array(top, f32))], prefix), eps], prefix
        )
        a_zp = b.const(prefix, "x_zp", np.array(128 if fmt.signed else 0, np.uint8))
        scaled = b.node("Mul", [x, b.node("Reciprocal", [s], prefix)], prefix)
        q = b.node("QuantizeLinear", [scaled, b.const(prefix, "unit", np.array(1.0, f32)), a_zp], prefix)
        return q, s, a_zp, None
    x2 = b.node("Reshape", [x, b.const(prefix, "rows", np.array([-1, k], np.int64))], prefix)
    zero = b.const(prefix, "zero", np.array(0.0, f32))
    lo = b.node("Min", [b.node("ReduceMin", [x2], prefix, axes=[1], keepdims=0), zero], prefix)
    hi = b.node("Max", [b.node("ReduceMax", [x2], prefix, axes=[1], keepdims=0), zero], prefix)
    span = b.const(prefix, "span", np.array(float(fmt.qmax - fmt.qmin), f32))
    s = b.node("Max", [b.node("Div", [b.node("Sub", [hi, lo], prefix), span], prefix), eps], prefix)
    qmin = b.const(prefix, "qmin", np.array(float(fmt.qmin), f32))
    qmax = b.const(prefix, "qmax", np.array(float(fmt.qmax), f32))
    zp_row = b.node("Sub", [qmin, b.node("Round", [b.node("Div", [lo, s], prefix)], prefix)], prefix)
    zp_row = b.node("Clip", [zp_row, qmin, qmax], prefix)
    ztype = TensorProto.INT8 if fmt.signed else TensorProto.UINT8
    q = b.node("QuantizeLinear", [x2, s, b.node("Cast", [zp_row], prefix, to=ztype)], prefix, axis=0)
    return q, s, "", zp_row


def _per_token_gemm(
    b: Builder,
    quantized: tuple[str, str, str, str | None],
    x: str,
    y: str,
    prefix: str,
    w: np.ndarray,
    scale: np.ndarray,
    zp: np.ndarray,
    bias: np.ndarray | None,
) -> None:
    """Integer GEMM of per-token codes (``_per_token_quantize``'s result) with ``w``, then row scale,
    zero-point correction, bias."""
    q, s, a_zp, zp_row = quantized
    f32 = np.float32
    one = b.const(prefix, "one", np.array(1.0, f32))
    prod = b.node(
        "MatMulIntegerToFloat",
        [
            q,
            b.const(prefix, "w", w),
            one,
            b.const(prefix, "w_scale", scale),
            a_zp,
            b.const(prefix, "w_zp", zp),
        ],
        prefix,
    )
    if zp_row is None:  # symmetric: codes kept the input's shape, ``s`` is [..., 1]
        out = b.node("Mul", [prod, s], prefix, None if bias is not None else [y])
        if bias is not None:
            b.node("Add", [out, b.const(prefix, "bias", bias.astype(f32))], prefix, [y])
        return
    ax1 = b.const(prefix, "ax1", np.array([1], np.int64))
    out = b.node("Mul", [prod, b.node("Unsqueeze", [s, ax1], prefix)], prefix)
    # Zero-point correction and bias in one pass over the output: a K=2 Gemm accumulating into
    # it, [-s*zp_row, 1] @ [colsum(W); bias]  (colsum of the dequantized weight, per column).
    colsum = ((w.astype(np.int64) - zp.astype(np.int64)[None, :]).sum(axis=0) * scale).astype(f32)
    neg = b.node("Unsqueeze", [b.node("Neg", [b.node("Mul", [s, zp_row], prefix)], prefix), ax1], prefix)
    a2, rows = neg, [colsum]
    if bias is not None:
        ones = b.node(
            "Expand",
            [b.const(prefix, "one_col", np.ones((1, 1), f32)), b.node("Shape", [neg], prefix)],
            prefix,
        )
        a2, rows = b.node("Concat", [neg, ones], prefix, axis=1), [colsum, bias]
    out = b.node("Gemm", [a2, b.const(prefix, "corr_bias", np.stack(rows).astype(f32)), out], prefix)
    # Back to the input's leading shape with N features.
    lead = b.node(
        "Slice",
        [
            b.node("Shape", [x], prefix),
            b.const(prefix, "s0", np.array([0], np.int64)),
            b.const(prefix, "s1", np.array([-1], np.int64)),
        ],
        prefix,
    )
    shape = b.node("Concat", [lead, b.const(prefix, "n", np.array([w.shape[1]], np.int64))], prefix, axis=0)
    b.node("Reshape", [out, shape], prefix, [y])


def _nbits_block(qw: QuantizedWeight) -> int | None:
    """MatMulNBits block size for this weight: the group size, or (per channel / tensor) a power of
    two that tiles K, each block repeating the row's scale. ``None`` when ORT cannot express it."""
    g = _granularity(qw)
    k = math.prod(qw.shape[1:])
    if isinstance(g, gran.PerGroup):
        size = g.size
        return size if size >= 16 and size & (size - 1) == 0 else None
    if _per_row_scales(qw):
        return 128 if k >= 128 else 32
    return None


def nbits_tensors(qw: QuantizedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """MatMulNBits ``B`` ``[N, blocks, block*bits/8]``, ``scales`` ``[N, blocks]``, packed uint8 zero
    points, and the block size. Codes are stored unsigned (``code - qmin``, zero point shifted alike),
    packed low bits first as ORT expects."""
    bits = qw.fmt.bits
    block = _nbits_block(qw)
    assert block is not None
    n = qw.shape[0]
    k = math.prod(qw.shape[1:])
    blocks = math.ceil(k / block)
    codes = qw.codes().reshape(n, k).to(torch.int32) - qw.fmt.qmin
    zp = getattr(qw, "zero_point", None)
    if _per_row_scales(qw):
        scale = torch.as_tensor(_row_params(qw)[0]).reshape(n, 1).expand(n, blocks)
        zpv = None if zp is None else torch.as_tensor(_row_params(qw)[1]).reshape(n, 1).expand(n, blocks)
    else:
        scale = qw.scale_values().reshape(n, -1)[:, :blocks]
        zpv = None if zp is None else zp.reshape(n, -1)[:, :blocks]
    zpu = (torch.zeros(n, blocks, dtype=torch.int32) if zpv is None else zpv.to(torch.int32)) - qw.fmt.qmin
    padded = torch.zeros(n, blocks * block, dtype=torch.int32)
    padded[:, :k] = codes
    padded[:, k:] = zpu.reshape(n, blocks).repeat_interleave(block, dim=1)[:, k:]  # padding dequantizes to 0
    per_byte = 8 // bits
    b_packed = _pack_low_first(padded.reshape(n, blocks, block), bits, per_byte)
    zp_cols = math.ceil(blocks / per_byte) * per_byte
    zp_pad = torch.zeros(n, zp_cols, dtype=torch.int32)
    zp_pad[:, :blocks] = zpu
    zp_packed = _pack_low_first(zp_pad, bits, per_byte).reshape(-1)
    return _np(b_packed), _np(scale.contiguous()).astype(np.float32), _np(zp_packed), block


def _pack_low_first(values: torch.Tensor, bits: int, per_byte: int) -> torch.Tensor:
    v = values.reshape(*values.shape[:-1], values.shape[-1] // per_byte, per_byte)
    out = torch.zeros(v.shape[:-1], dtype=torch.int32)
    for i in range(per_byte):
        out |= (v[..., i] & ((1 << bits) - 1)) << (i * bits)
    return out.to(torch.uint8)


def _matmul_nbits(
    b: Builder, layer: QuantizedLinear, x: str, y: str, prefix: str, bias: str | None, accuracy_level: int
) -> None:
    qw = layer.qweight
    packed, scales, zps, block = nbits_tensors(qw)
    inputs = [
        x,
        b.const(prefix, "w_nbits", packed),
        b.const(prefix, "w_scales", scales.reshape(-1)),
        b.const(prefix, "w_zp", zps),
    ]
    out = b.node(
        "MatMulNBits",
        inputs,
        prefix,
        None if bias else [y],
        K=layer.in_features,
        N=layer.out_features,
        bits=qw.fmt.bits,
        block_size=block,
        accuracy_level=accuracy_level,
    )
    if bias:
        b.node("Add", [out, bias], prefix, [y])


# --- conv -----------------------------------------------------------------------------------------


def lower_conv(
    b: Builder, layer: QuantizedConv, x: str, y: str, prefix: str, kernel: Kernel, u8u8: bool
) -> None:
    """Append the nodes computing ``y = layer(x)`` (QDQ for static integer codes, else float weights)."""
    c = layer.config
    if isinstance(c["padding"], str):
        raise ValueError(
            f"layer {prefix}: padding={c['padding']!r} cannot be exported; use explicit integer padding"
        )
    x = _smooth(b, layer, x, prefix, channel_axis=1)
    qw = layer.qweight
    if kernel.name == "ConvInteger":
        _conv_integer(b, layer, x, y, prefix, u8u8)
        return
    if kernel.name == "QDQ":
        x = _qdq_input(b, layer, x, prefix)
        w = _dq_weight(b, qw, prefix, u8=u8u8, conv_shape=layer.kernel_shape)
    elif qw.fmt.family == "float":
        w = b.node(
            "Cast",
            [b.const(prefix, "w_fp16", _np(qw.packed.reshape(layer.kernel_shape).half()))],
            prefix,
            to=TensorProto.FLOAT,
        )
    else:
        unpacked = _codes_in_graph(b, qw, prefix)
        if unpacked is None:
            w = b.const(prefix, "w", _np(qw.dequantize().reshape(layer.kernel_shape)))
        else:
            w = b.node("Reshape", [unpacked, b.const(prefix, "kernel", np.array(layer.kernel_shape))], prefix)
    inputs = [x, w] + ([b.const(prefix, "bias", _np(layer.bias.float()))] if layer.bias is not None else [])
    pads = list(c["padding"]) * 2
    b.node(
        "Conv",
        inputs,
        prefix,
        [y],
        kernel_shape=list(c["kernel_size"]),
        strides=list(c["stride"]),
        pads=pads,
        dilations=list(c["dilation"]),
        group=c["groups"],
    )


def _conv_attrs(layer: QuantizedConv) -> dict[str, Any]:
    c = layer.config
    return {
        "kernel_shape": list(c["kernel_size"]),
        "strides": list(c["stride"]),
        "pads": list(c["padding"]) * 2,
        "dilations": list(c["dilation"]),
        "group": c["groups"],
    }


def _conv_integer(b: Builder, layer: QuantizedConv, x: str, y: str, prefix: str, u8u8: bool) -> None:
    """DynamicQuantizeLinear (per-tensor uint8) + ConvInteger on the int8 codes, then the product
    scaled by ``x_scale * w_scale`` per output channel and the float bias added."""
    w, scale, zp = int8_weight_kn(layer.qweight, u8u8)
    w = np.ascontiguousarray(w.T.reshape(layer.kernel_shape))
    q_x, s_x, zp_x = (b.name(prefix, what) for what in ("x_q", "x_scale", "x_zp"))
    b.node("DynamicQuantizeLinear", [x], prefix, [q_x, s_x, zp_x])
    w_zp = b.const(prefix, "w_zp", np.array(zp.reshape(-1)[0], zp.dtype))
    acc = b.node("ConvInteger", [q_x, b.const(prefix, "w", w), zp_x, w_zp], prefix, **_conv_attrs(layer))
    shape = [1, -1] + [1] * layer.config["dims"]
    s = b.node("Mul", [s_x, b.const(prefix, "w_scale", scale.reshape(shape))], prefix)
    acc = b.node("Cast", [acc], prefix, to=TensorProto.FLOAT)
    out = b.node("Mul", [acc, s], prefix, [y] if layer.bias is None else None)
    if layer.bias is not None:
        b.node("Add", [out, b.const(prefix, "bias", _np(layer.bias.float()).reshape(shape))], prefix, [y])


# --- embedding ------------------------------------------------------------------------------------


def lower_embedding(
    b: Builder, layer: QuantizedEmbedding, ids: str, y: str, prefix: str, kernel: Kernel
) -> None:
    """Gather codes (1 byte each) and scales per looked-up row, dequantize only those rows."""
    qw = layer.qweight
    if kernel.name != "GatherDequant":
        w = _float_weight(b, qw, prefix, transpose=False)
        b.node("Gather", [w, ids], prefix, [y], axis=0)
        return
    codes = qw.codes().to(torch.int32)
    scale, zp = _row_params(qw)
    signed = qw.fmt.signed
    table = b.const(prefix, "codes", _np(codes).astype(np.int8 if signed else np.uint8))
    rows = b.node("Cast", [b.node("Gather", [table, ids], prefix, axis=0)], prefix, to=TensorProto.FLOAT)
    if zp is not None:
        zrow = b.node(
            "Gather", [b.const(prefix, "zp", zp.astype(np.float32).reshape(-1, 1)), ids], prefix, axis=0
        )
        rows = b.node("Sub", [rows, zrow], prefix)
    srow = b.node("Gather", [b.const(prefix, "scale", scale.reshape(-1, 1)), ids], prefix, axis=0)
    b.node("Mul", [rows, srow], prefix, [y])
