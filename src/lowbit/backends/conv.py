"""Conv-layer backends: oneDNN's static int8 convolution behind the recipe it computes exactly.

==========================  ===================================================  ==========================
backend                     layers it runs                                       what differs from reference
==========================  ===================================================  ==========================
``onednn-qconv``            Conv1d / Conv2d with static uint8 per-tensor         nothing (integer sums are
                            activations x symmetric int8 per-channel weights     exact); float rounding of
                            (``int8-static``): ``torch.ops.onednn.qconv_         the rescale and of the
                            pointwise``, weight prepacked once                   fused bias only
==========================  ===================================================  ==========================

This is the op Inductor's x86 quantization lowers to. The input (float, any layout) is quantized
with the layer's calibrated scale and zero point, the u8 x s8 convolution accumulates in int32 and
is rescaled to float32 with the bias added inside the kernel; the output is channels-last, so the
next quantized conv of a CNN gets its input in the layout it wants without a copy. Grouped,
depthwise, strided, dilated, non-square and odd-channel convs all run (checked against the
reference in ``tests/test_backend_conv.py``); string paddings other than ``valid`` and a symmetric
``same`` are refused.

>>> import torch, lowbit
>>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1))
>>> q = lowbit.quantize(m, "int8-static", [torch.randn(2, 3, 8, 8)], progress=False, kernels="reference")
>>> from lowbit.doctor import cpu_features
>>> reason = ONEDNN_QCONV.reason_not(q[0], cpu_features())  # None where it runs
>>> x = torch.randn(1, 3, 8, 8)
>>> reason is not None or float((ONEDNN_QCONV.prepare(q[0])(x) - q[0](x)).abs().max()) < 1e-4
True
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from lowbit import granularity as gran
from lowbit.backends.base import Backend, Kernel
from lowbit.backends.linear import _per_channel_scale, _symmetric_int_per_channel, _uint8_activation
from lowbit.doctor import CpuFeatures


def _padding(layer: Any) -> list[int] | None:
    """The conv's explicit padding per spatial dim (``None``: a string padding we do not run)."""
    c = layer.config
    padding = c["padding"]
    dims = len(c["kernel_size"])
    if padding == "valid":
        return [0] * dims
    if padding == "same":
        if any(s != 1 for s in c["stride"]):
            return None
        total = [d * (k - 1) for d, k in zip(c["dilation"], c["kernel_size"], strict=True)]
        if any(t % 2 for t in total):  # PyTorch pads such a "same" asymmetrically
            return None
        return [t // 2 for t in total]
    if isinstance(padding, str):
        return None
    return [int(p) for p in padding]


class OneDnnConvKernel(Kernel):
    """Static uint8 input x int8 per-channel weight via ``torch.ops.onednn.qconv_pointwise``;
    the bias is fused (``fuses_bias``), so ``run_kernel`` does not add it again."""

    name = "onednn-qconv"
    fuses_bias = True

    def __init__(self, layer: Any) -> None:
        qw = layer.qweight
        super().__init__(qw.packed.device)
        c = layer.config
        aq = layer.input_quant
        self.x_scale = float(aq.scale)
        self.x_zero = int(aq.zero_point) if hasattr(aq, "zero_point") else 0
        self.stride = [int(s) for s in c["stride"]]
        self.padding = _padding(layer)
        self.dilation = [int(d) for d in c["dilation"]]
        self.groups = int(c["groups"])
        self.w_scale = _per_channel_scale(qw)
        self.w_zero = torch.zeros(qw.shape[0], dtype=torch.long)
        codes = qw.codes().reshape(layer.kernel_shape).to(torch.int8)
        self.packed = torch.ops.onednn.qconv_prepack(
            codes, self.w_scale, self.x_scale, self.x_zero, self.stride, self.padding, self.dilation,
            self.groups, None,
        )  # fmt: skip
        self.bias = None if layer.bias is None else layer.bias.detach().float().contiguous()
        self.packed_elements = codes[0].numel()  # the opaque packed tensor cannot report its size
        self.channels_last = len(layer.kernel_shape) == 4

    def __deepcopy__(self, memo: dict[int, Any]) -> OneDnnConvKernel:
        # The prepacked weight is an opaque oneDNN tensor that cannot be copied; the kernel is
        # read-only after prepare, so a copied layer shares it (new weights drop it: set_kernel).
        return self

    @property
    def nbytes(self) -> int:
        return int(self.w_scale.numel()) * int(self.packed_elements) + 4 * int(self.w_scale.numel())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():  # quantized tensors are deprecated; the kernels are not gone
            warnings.simplefilter("ignore")
            q = torch.quantize_per_tensor(x.float(), self.x_scale, self.x_zero, torch.quint8).int_repr()
        if self.channels_last:
            q = q.contiguous(memory_format=torch.channels_last)  # a no-op between two such kernels
        y = torch.ops.onednn.qconv_pointwise(
            q, self.x_scale, self.x_zero, self.packed, self.w_scale, self.w_zero, self.bias,
            self.stride, self.padding, self.dilation, self.groups, 1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip
        return y if x.dtype == torch.float32 else y.to(x.dtype)


def _onednn_unavailable(cpu: CpuFeatures) -> str | None:
    onednn = getattr(torch.ops, "onednn", None)
    if onednn is None or not hasattr(onednn, "qconv_pointwise") or not hasattr(onednn, "qconv_prepack"):
        return "this torch has no torch.ops.onednn.qconv_pointwise / qconv_prepack"
    if not torch.backends.mkldnn.is_available():
        return "this torch was built without oneDNN (mkldnn)"
    if cpu.arch not in ("x86_64", "amd64"):
        return f"x86 only (this CPU is {cpu.arch})"
    if not cpu.vnni:
        # Without VNNI, oneDNN halves int8 weights to avoid 16-bit saturation (not the recipe's
        # numbers) and int8 convs rarely beat float: not worth offering.
        return "no AVX512-VNNI / AVX-VNNI on this CPU: int8 convs would not beat float"
    return None


def _onednn_unsupported(layer: Any) -> str | None:
    reason = _symmetric_int_per_channel(layer) or _uint8_activation(layer, ("static",), (gran.PerTensor,))
    if reason:
        return reason
    if layer.qweight.packed.device.type != "cpu":
        return "CPU only"
    if len(layer.kernel_shape) not in (3, 4):
        return "runs Conv1d / Conv2d only"
    if _padding(layer) is None:
        return f"padding={layer.config['padding']!r} with stride {layer.config['stride']} is not supported"
    zero = getattr(layer.input_quant, "zero_point", None)
    if zero is not None and not 0 <= int(zero) <= 255:
        return f"activation zero point {int(zero)} outside 0..255"
    return None


ONEDNN_QCONV = Backend(
    "onednn-qconv",
    "conv",
    "torch.ops.onednn.qconv_pointwise (u8 x s8 -> fp32, bias fused), weight prepacked once",
    "same integer math as the reference",
    _onednn_unavailable,
    _onednn_unsupported,
    OneDnnConvKernel,
    tolerance=1e-3,
)

CONV_BACKENDS = (ONEDNN_QCONV,)
