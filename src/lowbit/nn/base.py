"""``QuantizedModule``: what every quantized layer shares (input quantization, manifest, backend).

A quantized layer holds one or more ``QuantizedWeight`` (packed storage), float biases, and an
optional ``ActivationQuantizer`` for its input. An optional per-input-channel ``input_smooth``
divisor implements SmoothQuant / AWQ: the input is divided by it and the weight was multiplied by
it before quantization, so the float product is unchanged while outliers move into the weight.
An optional ``input_rotation`` (``lowbit.algorithms.rotation.HadamardRotation``, applied first)
rotates the input by the orthogonal matrix the stored weight was multiplied by (QuaRot-style
outlier spreading).

Its forward is the *reference* path (dequantize the weight, run the float op: exactly the fake-quant
simulation, what every fast path is checked against) until ``set_kernel`` attaches a real kernel
(``lowbit.backends``). ``backend`` says which path runs; the reference path is never reported as
faster than float. Kernels run inference only: with autograd recording, the reference path runs.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import nn

from lowbit.nn.activation import ActivationQuantizer
from lowbit.nn.qweight import QuantizedWeight
from lowbit.recipes.spec import ActivationSpec

_PLAIN = (bool, int, float, str, type(None))


def _plain(value: Any) -> bool:
    """A setting (a number, a string, a tuple of them), not a tensor, module or callable."""
    if isinstance(value, tuple | list):
        return all(_plain(v) for v in value)
    return isinstance(value, _PLAIN)


class QuantizedModule(nn.Module):
    """Base class of quantized layers; subclasses define ``kind``, ``forward`` and ``float_config``.

    A quantized layer is a drop-in for the float one: it keeps the public settings of the module
    it replaces (``stride``, ``padding``, ``in_features``, ``nf`` ...), and ``weight`` gives the
    dequantized weight in the float layer's layout and dtype, because model code inspects layers
    (transformers reads ``projection.weight.dtype`` in ViT, ``conv1.stride`` in Whisper).
    """

    kind: ClassVar[str] = "module"

    def __init__(self) -> None:
        super().__init__()
        self.input_quant: ActivationQuantizer | None = None
        self.float_dtype = torch.float32
        self._kernel: Any = None  # a lowbit.backends.Kernel; plain attribute, never in state_dict
        # New weights (an artifact loaded into this layer) make a packed copy stale: drop it.
        self.register_load_state_dict_post_hook(lambda module, keys: module.set_kernel(None))

    @property
    def backend(self) -> str:
        """What runs this layer: a ``lowbit.backends`` name, or ``reference``."""
        kernel = self._kernel
        return "reference" if kernel is None else kernel.name

    def set_kernel(self, kernel: Any) -> None:
        """Run ``kernel`` (a ``lowbit.backends.Kernel``) instead of the reference path; ``None``
        goes back to the reference path."""
        self._kernel = kernel
        # Looked up once: ``nn.Module`` attribute lookups cost microseconds a call, which adds up
        # over the ~60 layers of one decode step. Replacing a layer's bias or smoothing buffer needs
        # ``set_kernel`` again (``load_state_dict`` copies in place, and drops the kernel anyway).
        self._kernel_extras = (
            None if kernel is None else kernel.device,
            getattr(self, "input_smooth", None),
            getattr(self, "bias", None),
            getattr(self, "input_rotation", None),
        )

    def run_kernel(self, x: torch.Tensor) -> torch.Tensor | None:
        """The kernel's output (bias added) for ``x``, or ``None`` when the reference path must run:
        no kernel, another device, a non-float input, or autograd recording (kernels have no backward)."""
        kernel = self._kernel
        if kernel is None:
            return None
        device, smooth, bias, rotation = self._kernel_extras
        if x.device != device or not x.is_floating_point() or (x.requires_grad and torch.is_grad_enabled()):
            return None
        if rotation is not None:
            x = rotation(x)
        if smooth is not None:
            x = x / self._broadcast_smooth(smooth, x)
        y = kernel(x)
        if bias is None or getattr(kernel, "fuses_bias", False):
            return y
        return y + bias.to(y.dtype)

    def adopt(self, module: nn.Module) -> QuantizedModule:
        """Copy ``module``'s public settings that this layer does not define itself; returns ``self``.

        Only plain values are copied (numbers, strings, tuples of them): tensors, submodules and
        hooks of the float layer are not kept. The float weight's dtype is remembered for ``weight``.

        >>> conv = nn.Conv2d(3, 8, 3, stride=2)
        >>> q = QuantizedModule().adopt(conv)
        >>> q.stride, q.kernel_size, q.float_dtype
        ((2, 2), (3, 3), torch.float32)
        """
        for name, value in vars(module).items():
            if name.startswith("_") or name == "training" or not _plain(value):
                continue
            if name in vars(self) or hasattr(type(self), name):
                continue  # this layer's own attribute (or property) wins
            setattr(self, name, value)
        weight = next((p for n, p in module.named_parameters(recurse=False) if n.startswith("weight")), None)
        if weight is not None and weight.is_floating_point():
            self.float_dtype = weight.dtype
        return self

    def set_activation(self, spec: ActivationSpec | None, name: str = "") -> None:
        """Attach an input quantizer (or none) as ``spec`` says."""
        self.input_quant = ActivationQuantizer(spec, name) if spec is not None and spec.enabled else None

    def set_input_smooth(self, divisor: torch.Tensor | None) -> None:
        """Divide inputs by ``divisor`` (per input channel, last dim) before quantizing them."""
        if divisor is None:
            self.input_smooth = None
        else:
            self.register_buffer("input_smooth", divisor.detach().float().clone())

    def set_input_rotation(self, rotation: nn.Module | None) -> None:
        """Rotate inputs by ``rotation`` (a ``HadamardRotation``; the weight holds ``W R``) first."""
        self.input_rotation = None if rotation is None else copy.deepcopy(rotation)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        rotation = getattr(self, "input_rotation", None)
        if rotation is not None:
            x = rotation(x)
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
            **_rotation_entry(getattr(self, "input_rotation", None)),
            # What the artifact stores runs on the reference path anywhere; kernels are chosen per
            # machine when it is loaded.
            "backend": "reference",
        }

    @property
    def stored_bytes(self) -> int:
        """Bytes of everything this layer stores (packed weights, scales, float biases, ranges)."""
        tensors = list(self.state_dict().values())
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def weight_params(self) -> int:
        return sum(qw.numel for qw in self.quantized_weights().values())


def _rotation_entry(rotation: Any) -> dict[str, Any]:
    # Written only for rotated layers: other artifacts keep exactly their old bytes.
    return {} if rotation is None else {"input_rotation": [rotation.size, rotation.odd_size]}
