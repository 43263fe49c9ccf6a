"""``ActivationQuantizer``: fake-quantize a module's input, dynamically or with calibrated ranges.

Its state is explicit (STYLE.md item 7):

- ``dynamic``: the range is measured on every call (per tensor or per token); no state.
- ``observing``: static mode before calibration ends; batches feed the observer and pass through
  unchanged, so calibration sees float activations.
- ``frozen``: static mode after ``freeze()``; the calibrated scale / zero point are buffers and
  every call fake-quantizes with them.

Calling a static quantizer that never saw data, or freezing it, raises instead of guessing.

>>> import torch
>>> from lowbit.recipes import ActivationSpec
>>> aq = ActivationQuantizer(ActivationSpec(mode="static", format="uint8", observer="minmax"))
>>> _ = aq(torch.tensor([0.0, 2.0])); aq.freeze()
>>> aq.state, aq(torch.tensor([1.0, 3.0])).tolist()
('frozen', [0.9960784912109375, 2.0])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowbit import formats, observers
from lowbit import granularity as gran
from lowbit.primitives import QParams, choose_qparams, fake_quantize
from lowbit.recipes.spec import ActivationSpec


class ActivationQuantizer(nn.Module):
    """Quantizes the tensor passing through it as ``spec`` says (see the module docstring)."""

    def __init__(self, spec: ActivationSpec, name: str = "") -> None:
        super().__init__()
        if not spec.enabled:
            raise ValueError("ActivationQuantizer needs an activation spec with mode 'dynamic' or 'static'")
        self.spec = spec
        self.name = name  # qualified name of the owning module, for error messages
        self.fmt = formats.get(spec.format)
        self.granularity = gran.parse(spec.granularity)
        self.state = "dynamic" if spec.mode == "dynamic" else "observing"
        self.observer: observers.Observer | None = None
        if spec.mode == "static":
            self.observer = observers.get(spec.observer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.state == "dynamic":
            qp = choose_qparams(x.detach(), self.fmt, self.granularity, self.spec.symmetric)
            return fake_quantize(x, self.fmt, qp)
        if self.state == "observing":
            assert self.observer is not None
            self.observer.observe(x)
            return x
        return fake_quantize(x, self.fmt, self.frozen_qparams(x))

    def freeze(self) -> None:
        """End calibration: turn the observer's statistics into a fixed scale (and zero point)."""
        if self.state != "observing":
            raise RuntimeError(
                f"{self.name or 'activation quantizer'}: cannot freeze in state {self.state!r}"
            )
        assert self.observer is not None
        if self.observer.count == 0:
            raise ValueError(
                f"layer {self.name or '?'} saw no calibration data (its input was never computed); "
                "check that the calibration batches exercise every quantized layer, or exclude it"
            )
        qp = self.observer.qparams(self.fmt, self.spec.symmetric)
        self.set_qparams(qp.scale.reshape(()), None if qp.zero_point is None else qp.zero_point.reshape(()))
        self.observer = None  # the statistics are no longer needed; do not keep them in memory

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor | None) -> None:
        """Fix the static range directly (loading an artifact, or a range chosen elsewhere)."""
        self.register_buffer("scale", scale.float().reshape(()).clone())
        if zero_point is not None:
            self.register_buffer("zero_point", zero_point.to(torch.int32).reshape(()).clone())
        self.state = "frozen"

    def frozen_qparams(self, x: torch.Tensor) -> QParams:
        """The static parameters, laid out for a tensor shaped like ``x`` (one block: all of it)."""
        ones = (1,) * x.dim()
        zp = getattr(self, "zero_point", None)
        return QParams(
            self.scale.reshape(ones), None if zp is None else zp.reshape(ones), tuple(x.shape) or (1,)
        )

    def manifest(self) -> dict[str, Any]:
        """The spec plus, when frozen, the calibrated range (JSON-ready)."""
        out: dict[str, Any] = {
            "mode": self.spec.mode,
            "format": self.spec.format,
            "granularity": self.spec.granularity,
            "symmetric": self.spec.symmetric,
            "observer": self.spec.observer,
        }
        if self.state == "frozen":
            out["scale"] = float(self.scale)
            if hasattr(self, "zero_point"):
                out["zero_point"] = int(self.zero_point)
        return out

    def extra_repr(self) -> str:
        return f"{self.spec.mode} {self.spec.format} {self.spec.granularity}, state={self.state}"
