"""Linear-layer backends: PyTorch's own integer kernels, each behind the recipe it computes exactly.

==========================  ===================================================  ==========================
backend                     layers it runs                                       what differs from reference
==========================  ===================================================  ==========================
``torch-int-mm``            int8 activations (uint8 per token / per tensor,      nothing (integer sums are
                            dynamic or static) x symmetric int8 per-channel      exact); float rounding of
                            weights: ``torch._int_mm``, s8 x s8 -> s32           the rescale only
``fbgemm-dynamic``          dynamic uint8 per-tensor activations x symmetric     nothing beyond rounding
                            int8 weights: ``torch.ops.quantized.linear_dynamic``
``torch-int8pack-bf16``     weight-only symmetric per-channel weights of 2-8     activations, scales and
                            bits: ``torch._weight_int8pack_mm``                  output in bfloat16
``torch-int4pack-bf16``     weight-only 4-bit group-wise weights (groups of      activations, scales, zero
                            32-256, N a multiple of 16):                         points, output in bfloat16
                            ``torch._weight_int4pack_mm_for_cpu``
==========================  ===================================================  ==========================

The uint8 activations of the recipes have a zero point; ``_int_mm`` multiplies signed bytes, so
the kernel shifts codes by 128 and adds ``(128 - zero_point) * sum_k W[n, k]`` back, which is the
same integer result (the column sums are computed once at prepare time).

>>> import torch, lowbit
>>> from lowbit.backends.linear import INT_MM
>>> q = lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(64, 32)), "int8-dynamic", progress=False)
>>> layer = q[0]; x = torch.randn(5, 64)
>>> kernel = INT_MM.prepare(layer)
>>> ref = layer(x); fast = kernel(x) + layer.bias
>>> float((fast - ref).abs().max()) < 1e-4
True
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from lowbit import granularity as gran
from lowbit.backends.base import Backend, Kernel
from lowbit.doctor import CpuFeatures

# --- what a layer is ----------------------------------------------------------------------------------


def _weight(layer: Any) -> Any:
    return layer.qweight


def _symmetric_int_per_channel(layer: Any, max_bits: int = 8) -> str | None:
    qw = _weight(layer)
    if qw.fmt.family != "int" or not qw.fmt.signed or not qw.symmetric:
        return f"needs signed symmetric integer weights (has {qw.fmt.name}, symmetric={qw.symmetric})"
    if qw.fmt.bits > max_bits:
        return f"needs <= {max_bits}-bit weights"
    if not isinstance(qw.granularity, gran.PerChannel | gran.PerTensor) or (
        isinstance(qw.granularity, gran.PerChannel) and qw.granularity.axis != 0
    ):
        return f"needs per-output-channel scales (has {qw.granularity})"
    if len(qw.shape) != 2:
        return "needs a 2-D weight"
    return None


def _weight_only(layer: Any) -> str | None:
    if layer.input_quant is not None:
        return "its input is quantized (not a weight-only layer)"
    return None


def _uint8_activation(layer: Any, modes: tuple[str, ...], granularities: tuple[type, ...]) -> str | None:
    aq = layer.input_quant
    if aq is None:
        return "weight-only layer (no activation quantization)"
    if aq.spec.mode not in modes:
        return f"needs {'/'.join(modes)} activations (has {aq.spec.mode})"
    if aq.fmt.name != "uint8" or aq.spec.symmetric:
        return f"needs asymmetric uint8 activations (has {aq.fmt.name}, symmetric={aq.spec.symmetric})"
    if aq.state == "observing":
        return "its activation range is not calibrated yet"
    if not isinstance(aq.granularity, granularities):
        return f"needs {' or '.join(g.__name__ for g in granularities)} activations (has {aq.granularity})"
    return None


def _per_channel_scale(qw: Any) -> torch.Tensor:
    """Weight scales as one float32 per output row (per-tensor scales broadcast)."""
    return qw.scale_values().reshape(-1).expand(qw.shape[0]).contiguous()


def _int8_codes(qw: Any) -> torch.Tensor:
    return qw.codes().reshape(qw.shape).to(torch.int8)


def _flat(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    return x.reshape(-1, x.shape[-1]), tuple(x.shape[:-1])


# --- _int_mm: exact W8A8 ------------------------------------------------------------------------------


class IntMMKernel(Kernel):
    """uint8 activations (quantized here, as the reference does) x int8 weights via ``_int_mm``."""

    name = "torch-int-mm"

    def __init__(self, layer: Any) -> None:
        qw = layer.qweight
        super().__init__(qw.packed.device)
        codes = _int8_codes(qw)  # [N, K]
        self.weight_t = codes.t().contiguous()  # [K, N]: the layout _int_mm is fastest with at batch > 1
        self.weight_nk = codes  # [N, K]: its transpose view wins at batch 1
        self.col_sum = codes.sum(dim=1, dtype=torch.int32)  # [N]
        self.w_scale = _per_channel_scale(qw)
        aq = layer.input_quant
        self.per_token = isinstance(aq.granularity, gran.PerToken)
        self.static = aq.state == "frozen"
        if self.static:
            self.x_scale = aq.scale.float().reshape(())
            self.x_zero = aq.zero_point.to(torch.int32).reshape(()) if hasattr(aq, "zero_point") else None

    def _quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 codes shifted to int8, scale and zero point: the reference's asymmetric rule
        (range widened to include 0, scale (max - min) / 255, zero point -round(min / scale))."""
        if self.static:
            scale = self.x_scale
            zero = self.x_zero if self.x_zero is not None else torch.zeros((), dtype=torch.int32)
        else:
            dims = (-1,) if self.per_token else (0, 1)
            lo = x.amin(dim=dims, keepdim=True).clamp(max=0)
            hi = x.amax(dim=dims, keepdim=True).clamp(min=0)
            scale = ((hi - lo) / 255.0).clamp(min=torch.finfo(torch.float32).eps)
            zero = (-torch.round(lo / scale)).to(torch.int32).clamp(0, 255)
        q = torch.clamp(torch.round(x / scale) + zero, 0, 255) - 128
        return q.to(torch.int8), scale, zero

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat, lead = _flat(x.float())
        q, scale, zero = self._quantize(flat)
        weight = self.weight_nk.t() if flat.shape[0] == 1 else self.weight_t
        rows = flat.shape[0]
        if rows <= 16 and q.is_cuda:  # CUDA's _int_mm wants more than 16 rows: pad them
            acc = torch._int_mm(torch.nn.functional.pad(q, (0, 0, 0, 17 - rows)), weight)[:rows]
        else:
            acc = torch._int_mm(q, weight)
        acc = acc + (128 - zero).reshape(-1, 1) * self.col_sum
        y = acc.float() * (scale.reshape(-1, 1) * self.w_scale)
        return y.reshape(*lead, -1).to(x.dtype)


def _int_mm_unavailable(cpu: CpuFeatures) -> str | None:
    if not hasattr(torch, "_int_mm"):
        return "this torch has no torch._int_mm"
    return None


def _int_mm_unsupported(layer: Any) -> str | None:
    return _symmetric_int_per_channel(layer) or _uint8_activation(
        layer, ("dynamic", "static"), (gran.PerToken, gran.PerTensor)
    )


INT_MM = Backend(
    "torch-int-mm",
    "linear",
    "torch._int_mm (s8 x s8 -> s32) with the activation quantized in the layer",
    "same integer math as the reference",
    _int_mm_unavailable,
    _int_mm_unsupported,
    IntMMKernel,
    tolerance=1e-3,
)


# --- fbgemm / x86 dynamic -----------------------------------------------------------------------------


class FbgemmDynamicKernel(Kernel):
    """``torch.ops.quantized.linear_dynamic``: the weight prepacked once for the quantized engine."""

    name = "fbgemm-dynamic"

    def __init__(self, layer: Any) -> None:
        qw = layer.qweight
        super().__init__(qw.packed.device)
        codes = _int8_codes(qw).float()
        scale = _per_channel_scale(qw)
        with warnings.catch_warnings():  # quantized tensors are deprecated; the kernels are not gone
            warnings.simplefilter("ignore")
            zeros = torch.zeros(qw.shape[0], dtype=torch.long)
            wq = torch.quantize_per_channel(codes * scale[:, None], scale.double(), zeros, 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(wq, None)
        # Without VNNI, u8 x s8 pairs saturate 16-bit sums: keep activations to 7 bits there.
        from lowbit.doctor import cpu_features

        self.reduce_range = cpu_features().int8_saturates

    @property
    def nbytes(self) -> int:
        out_features, in_features = self.packed.unpack()[0].shape
        return out_features * in_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat, lead = _flat(x.float().contiguous())
        y = torch.ops.quantized.linear_dynamic(flat, self.packed, self.reduce_range)
        return y.reshape(*lead, -1).to(x.dtype)


def _fbgemm_unavailable(cpu: CpuFeatures) -> str | None:
    engines = torch.backends.quantized.supported_engines
    if not any(e in engines for e in ("x86", "fbgemm")):
        return f"no x86/fbgemm quantized engine in this torch (has {engines})"
    if not hasattr(torch.ops.quantized, "linear_dynamic"):
        return "torch.ops.quantized.linear_dynamic is gone from this torch"
    return None


def _fbgemm_unsupported(layer: Any) -> str | None:
    reason = _symmetric_int_per_channel(layer)
    if reason:
        return reason
    if layer.qweight.packed.device.type != "cpu":
        return "CPU only"
    return _uint8_activation(layer, ("dynamic",), (gran.PerTensor,))


FBGEMM_DYNAMIC = Backend(
    "fbgemm-dynamic",
    "linear",
    "torch.ops.quantized.linear_dynamic (x86/fbgemm engine), weight prepacked once",
    "same integer math as the reference (7-bit activations on CPUs without VNNI)",
    _fbgemm_unavailable,
    _fbgemm_unsupported,
    FbgemmDynamicKernel,
    tolerance=0.02,
)


# --- weight-only, bfloat16 activations ----------------------------------------------------------------


class Int8PackKernel(Kernel):
    """``torch._weight_int8pack_mm``: bf16 activations x int8 weights with per-row bf16 scales."""

    name = "torch-int8pack-bf16"

    def __init__(self, layer: Any) -> None:
        qw = layer.qweight
        super().__init__(qw.packed.device)
        self.codes = _int8_codes(qw)
        self.scale = _per_channel_scale(qw).to(torch.bfloat16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # reshape + cast always yield a contiguous bf16 matrix, as the kernel wants
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), self.codes, self.scale)
        return y.view(*x.shape[:-1], y.shape[-1]).to(x.dtype)


def _bf16_unavailable(cpu: CpuFeatures) -> str | None:
    if not cpu.bf16 and cpu.arch in ("x86_64", "amd64"):
        return "no native bfloat16 on this CPU (AVX512-BF16 / AMX): bf16 kernels would be emulated"
    return None


def _int8pack_unsupported(layer: Any) -> str | None:
    reason = _weight_only(layer) or _symmetric_int_per_channel(layer)
    if reason:
        return reason
    if layer.qweight.packed.device.type != "cpu":
        return "CPU only"
    if layer.qweight.shape[1] % 16:  # the kernel reads K in blocks of 16 (other K crash or go wrong)
        return f"needs in_features divisible by 16 (has {layer.qweight.shape[1]})"
    return None


INT8PACK_BF16 = Backend(
    "torch-int8pack-bf16",
    "linear",
    "torch._weight_int8pack_mm (bf16 x int8, per-channel scales)",
    "activations, scales and output rounded to bfloat16",
    _bf16_unavailable,
    _int8pack_unsupported,
    Int8PackKernel,
    tolerance=0.02,
)

INT4_GROUPS = (32, 64, 128, 256)


class Int4PackKernel(Kernel):
    """``torch._weight_int4pack_mm_for_cpu``: bf16 activations x 4-bit weights, group scales and
    zeros in bf16. The kernel computes ``(q - 8) * scale + zero``; our codes mean
    ``(q - zero_point) * scale`` (unsigned) or ``q * scale`` (signed), mapped here once."""

    name = "torch-int4pack-bf16"

    def __init__(self, layer: Any) -> None:
        qw = layer.qweight
        super().__init__(qw.packed.device)
        n, k = qw.shape
        group = _group_size(qw)
        codes = qw.codes().reshape(n, k).to(torch.int32)
        scale = qw.scale_values().reshape(n, k // group)
        if qw.fmt.signed:
            codes = codes + 8  # signed 4-bit -> [0, 15]; value = (u - 8) * scale
            zero = torch.zeros_like(scale)
        else:
            zp = qw.zero_point.to(torch.float32).reshape(n, k // group)
            zero = (8.0 - zp) * scale
        self.packed = torch._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
        self.scale_zero = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        self.group = group

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # contiguous, as the kernel wants
        y = torch._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scale_zero)
        return y.view(*x.shape[:-1], y.shape[-1]).to(x.dtype)


def _group_size(qw: Any) -> int:
    g = qw.granularity
    if isinstance(g, gran.PerGroup):
        return g.size
    if isinstance(g, gran.PerChannel) and g.axis == 0:
        return qw.shape[1]
    return 0


def _int4pack_unavailable(cpu: CpuFeatures) -> str | None:
    if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        return "this torch has no torch._weight_int4pack_mm_for_cpu"
    return _bf16_unavailable(cpu)


def _int4pack_unsupported(layer: Any) -> str | None:
    reason = _weight_only(layer)
    if reason:
        return reason
    qw = _weight(layer)
    if qw.fmt.family != "int" or qw.fmt.bits != 4:
        return f"needs 4-bit integer weights (has {qw.fmt.name})"
    if not qw.fmt.signed and qw.symmetric:
        return "unsigned symmetric 4-bit weights are not supported"
    if len(qw.shape) != 2:
        return "needs a 2-D weight"
    n, k = qw.shape
    group = _group_size(qw)
    if group not in INT4_GROUPS:
        return f"needs groups of {'/'.join(map(str, INT4_GROUPS))} (has {qw.granularity})"
    if k % group or n % 16:
        return f"needs in_features divisible by {group} and out_features by 16 (has {n}x{k})"
    if qw.packed.device.type != "cpu":
        return "CPU only"
    return None


INT4PACK_BF16 = Backend(
    "torch-int4pack-bf16",
    "linear",
    "torch._weight_int4pack_mm_for_cpu (bf16 x int4, group scales and zeros)",
    "activations, scales, zero points and output rounded to bfloat16",
    _int4pack_unavailable,
    _int4pack_unsupported,
    Int4PackKernel,
    tolerance=0.03,
)

LINEAR_BACKENDS = (INT_MM, FBGEMM_DYNAMIC, INT8PACK_BF16, INT4PACK_BF16)
