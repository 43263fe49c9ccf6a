"""``QuantizedModule``: what every quantized layer shares (input quantization, manifest, backend).

A quantized layer holds one or more ``QuantizedWeight`` (packed storage), float biases, and an
optional ``ActivationQuantizer`` for its input. An optional per-input-channel ``input_smooth``
divisor implements SmoothQuant / AWQ: the input is divided by it and the weight was multiplied by
it before quantization, so the float product is unchanged while outliers move into the weight.

Its forward is the *reference* path: dequantize the weight, run the float op. It is exactly the
fake-quant simulation, and it is what the fast runtimes (ONNX Runtime export) are checked against.
``backend`` says which path runs; the reference path is never reported as faster than float.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from lowbit.nn.activation import ActivationQuantizer
from lowbit.nn.qweight import QuantizedWeight
from lowbit.recipes.spec import ActivationSpec


class QuantizedModule(nn.Module):
    """Base class of quantized layers; subclasses define ``kind``, ``forward`` and ``float_config``."""

    kind: ClassVar[str] = "module"
    backend: str = "reference"

    def __init__(self) -> None:
        super().__init__()
        self.input_quant: ActivationQuantizer | None = None

    def set_activation(self, spec: ActivationSpec | None, name: str = "") -> None:
        """Attach an input quantizer (or none) as ``spec`` says."""
        self.input_quant = ActivationQuantizer(spec, name) if spec is not None and spec.enabled else None

    def set_input_smooth(self, divisor: torch.Tensor | None) -> None:
        """Divide inputs by ``divisor`` (per input channel, last dim) before quantizing them."""
        if divisor is None:
            self.input_smooth = None
        else:
            self.register_buffer("input_smooth", divisor.detach().float().clone())

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        smooth = getattr(self, "input_smooth", None)
        if smooth is not None:
            x = x / self._broadcast_smooth(smooth, x)
        if self.input_quant is not None:
            x = self.input_quant(x)
        return x

    def _broadcast_smooth(self, smooth: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Smoothing factors shaped to broadcast over ``x`` (channels last; conv overrides)."""
        return smooth.to(x.dtype)

    def quantized_weights(self) -> dict[str, QuantizedWeight]:
        """Every packed weight of this layer by its attribute path (``qweight``, ``weights.weight_ih_l0``)."""
        return {name: m for name, m in self.named_modules() if isinstance(m, QuantizedWeight)}

    @classmethod
    def float_weight_shapes(cls, module: nn.Module) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every weight this class quantizes in float ``module`` (as ``manifest()``
        names and shapes them); artifacts are checked against it before anything is allocated."""
        raise NotImplementedError

    def float_config(self) -> dict[str, Any]:
        """Constructor settings of the float layer (JSON-ready), to rebuild this layer on load."""
        raise NotImplementedError

    def manifest(self) -> dict[str, Any]:
        """Everything the artifact records about this layer (JSON-ready)."""
        return {
            "kind": self.kind,
            "class": type(self).__name__,
            "config": self.float_config(),
            "weights": {name: qw.manifest() for name, qw in self.quantized_weights().items()},
            "activation": None if self.input_quant is None else self.input_quant.manifest(),
            "input_smooth": getattr(self, "input_smooth", None) is not None,
            "backend": self.backend,
        }

    @property
    def stored_bytes(self) -> int:
        """Bytes of everything this layer stores (packed weights, scales, float biases, ranges)."""
        tensors = list(self.state_dict().values())
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def weight_params(self) -> int:
        return sum(qw.numel for qw in self.quantized_weights().values())
