"""``size_report``: parameters, stored bytes and bits per parameter, overall and per layer.

Stored bytes are the bytes of every tensor the artifact writes (codes, scales, zero points,
codebooks, float biases and the layers kept in float); the safetensors header adds a few KB
on disk, which ``lowbit.save`` reports separately as the file size.

>>> import torch, lowbit
>>> q = lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(256, 256, bias=False)), "int8-weight-only")
>>> r = size_report(q)
>>> r.parameters, r.stored_bytes, r.float_bytes
(65536, 66560, 262144)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from lowbit.nn.base import QuantizedModule


@dataclass
class LayerSize:
    """One row of the size report."""

    name: str
    kind: str
    format: str
    parameters: int
    stored_bytes: int

    @property
    def bits_per_param(self) -> float:
        return self.stored_bytes * 8 / max(self.parameters, 1)


@dataclass
class SizeReport:
    """Totals plus one ``LayerSize`` per quantized layer and one row for everything kept float."""

    parameters: int
    stored_bytes: int
    float_bytes: int  # the same parameters stored as float32
    layers: list[LayerSize] = field(default_factory=list)

    @property
    def bits_per_param(self) -> float:
        return self.stored_bytes * 8 / max(self.parameters, 1)

    @property
    def ratio(self) -> float:
        """Stored bytes as a fraction of the float32 size."""
        return self.stored_bytes / max(self.float_bytes, 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bits_per_param"] = self.bits_per_param
        for row, layer in zip(d["layers"], self.layers, strict=True):
            row["bits_per_param"] = layer.bits_per_param
        return d

    def table(self) -> str:
        """A Markdown table of the per-layer rows and the total."""
        lines = ["| layer | kind | format | params | bytes | bits/param |", "|---|---|---|---:|---:|---:|"]
        for r in self.layers:
            lines.append(
                f"| {r.name} | {r.kind} | {r.format} | {r.parameters:,} | {r.stored_bytes:,} "
                f"| {r.bits_per_param:.2f} |"
            )
        lines.append(
            f"| **total** | | | {self.parameters:,} | {self.stored_bytes:,} | {self.bits_per_param:.2f} |"
        )
        return "\n".join(lines)


def size_report(model: nn.Module) -> SizeReport:
    """Measure what ``model`` stores (quantized or not); see the module docstring."""
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedModule)}
    seen: set[int] = set()
    layers = []
    covered: set[str] = set()
    for name, module in quantized.items():
        nbytes = 0
        for key, t in module.state_dict(prefix=f"{name}." if name else "").items():
            covered.add(key)
            if t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                nbytes += t.numel() * t.element_size()
        bias_params = sum(p.numel() for p in module.parameters())
        formats = sorted({qw.fmt.name for qw in module.quantized_weights().values()})
        layers.append(
            LayerSize(name, module.kind, ",".join(formats), module.weight_params + bias_params, nbytes)
        )
    float_params = float_bytes_stored = 0
    for key, t in model.state_dict().items():
        if key in covered or t.untyped_storage().data_ptr() in seen:
            continue
        seen.add(t.untyped_storage().data_ptr())
        float_params += t.numel()
        float_bytes_stored += t.numel() * t.element_size()
    if float_params:
        layers.append(LayerSize("(kept float)", "float", "float", float_params, float_bytes_stored))
    params = sum(r.parameters for r in layers)
    return SizeReport(params, sum(r.stored_bytes for r in layers), params * 4, layers)
