"""What an execution backend is: a named way to run one quantized layer on a real kernel.

A ``Backend`` says where it can run (``unavailable``: a reason, or ``None``), which layers it can
run exactly as their recipe says (``unsupported``: a reason, or ``None``) and how to build a
``Kernel`` for one layer: the weight repacked once into the layout the kernel wants. The packed
tensors live on the kernel, outside ``state_dict``: the artifact stays exactly what the recipe
stored, and a kernel can always be dropped to fall back to the reference path.

``numerics`` says what the backend changes against the reference path (dequantize + float op),
in words users read in ``lowbit doctor``; ``tolerance`` bounds the relative output error against
the reference that the chooser accepts when it measures the backend on this machine.

>>> b = Backend("demo", "linear", "a demo", "exact integer math", lambda f: None, lambda m: "no", None)
>>> b.unsupported(None)
'no'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lowbit.doctor import CpuFeatures


class Kernel:
    """One layer's prepared kernel: ``kernel(x) -> y`` for an input already divided by the
    layer's smoothing factors; subclasses hold the packed weight."""

    name: str = "kernel"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes of the packed tensors this kernel keeps besides the layer's own storage."""
        return sum(t.numel() * t.element_size() for t in vars(self).values() if isinstance(t, torch.Tensor))


@dataclass(frozen=True)
class Backend:
    """A registered execution backend (see the module docstring)."""

    name: str
    kind: str  # the layer kind it runs: "linear", "conv"
    description: str
    numerics: str
    unavailable: Callable[[CpuFeatures], str | None]
    unsupported: Callable[[Any], str | None]
    prepare: Callable[[Any], Kernel] | None
    tolerance: float = 0.02  # relative RMS output error vs the reference path

    def reason_not(self, layer: Any, cpu: CpuFeatures) -> str | None:
        """Why this backend cannot run ``layer`` here (``None``: it can)."""
        if getattr(layer, "kind", None) != self.kind:
            return f"runs {self.kind} layers"
        return self.unavailable(cpu) or self.unsupported(layer)
