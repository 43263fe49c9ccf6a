"""Per-layer error: where does the quantization loss come from?

For every quantized layer of ``qmodel`` the float layer with the same name in ``float_model`` is
hooked, and both are compared two ways on the same batches:

* **isolated**: the quantized layer is called on exactly the inputs the float layer received, so
  its error is its own (weights and input quantization of that layer alone);
* **accumulated**: the quantized layer's output inside the quantized model, which also carries
  the error of every layer before it.

Statistics are accumulated batch by batch (sums, not stored outputs), so a transformer's many
layers fit in memory on long evaluation sets.

>>> import torch, lowbit
>>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
>>> q = lowbit.quantize(model, "int8-weight-only", progress=False)
>>> rows = layer_errors(model, q, [torch.randn(8, 16)])
>>> [r.name for r in rows], rows[0].sqnr_db > 30
(['0', '2'], True)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lowbit.eval.metrics import output_tensor
from lowbit.nn.base import QuantizedModule
from lowbit.ptq.convert import model_device, to_device
from lowbit.zoo.base import call_model


@dataclass
class LayerError:
    """Error of one quantized layer's output against the float layer's (see the module docstring)."""

    name: str
    kind: str
    format: str
    parameters: int
    bits_per_param: float
    sqnr_db: float  # isolated: same inputs as the float layer
    cosine: float  # isolated, mean over output rows (last dimension = features)
    mse: float  # isolated
    accumulated_sqnr_db: float  # inside the quantized model, error of all earlier layers included
    accumulated_cosine: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (infinite SQNR of a lossless layer becomes ``None``)."""
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(self).items()}


class _Stats:
    """Running sums for SQNR, MSE and mean row cosine."""

    def __init__(self) -> None:
        self.signal = self.noise = self.count = self.cos_sum = self.rows = 0.0

    def add(self, ref: torch.Tensor, out: torch.Tensor, channels_first: bool = False) -> None:
        ref, out = ref.detach().float(), out.detach().float()
        if ref.shape != out.shape:
            raise ValueError(
                f"output shapes differ: float {tuple(ref.shape)} vs quantized {tuple(out.shape)}"
            )
        # Sums in float64: a float32 running sum over millions of values would lose the small noise.
        self.signal += float(ref.square().sum(dtype=torch.float64))
        self.noise += float((ref - out).square().sum(dtype=torch.float64))
        self.count += ref.numel()
        if ref.dim() == 0:
            ref, out = ref.reshape(1, 1), out.reshape(1, 1)
        if channels_first and ref.dim() >= 3:
            # Conv outputs are [N, C, ...]: compare the channel vector at every position.
            ref, out = ref.movedim(1, -1), out.movedim(1, -1)
        r, o = ref.reshape(-1, ref.shape[-1]), out.reshape(-1, out.shape[-1])
        self.cos_sum += float(
            torch.nn.functional.cosine_similarity(r, o, dim=1, eps=1e-12).sum(dtype=torch.float64)
        )
        self.rows += r.shape[0]

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0.0:
            return math.inf
        return 10.0 * math.log10(max(self.signal, 1e-300) / self.noise)

    @property
    def cosine(self) -> float:
        return self.cos_sum / self.rows if self.rows else math.nan

    @property
    def mse(self) -> float:
        return self.noise / self.count if self.count else math.nan


def quantized_layers(qmodel: nn.Module) -> dict[str, QuantizedModule]:
    """Every quantized layer of ``qmodel`` by its dotted name.

    >>> import torch, lowbit
    >>> list(quantized_layers(lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(4, 4)), "nf4")))
    ['0']
    """
    return {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantizedModule)}


def layer_errors(
    float_model: nn.Module, qmodel: nn.Module, batches: Iterable[Any], max_batches: int | None = None
) -> list[LayerError]:
    """Isolated and accumulated output error of every quantized layer over input ``batches``.

    ``batches`` are model inputs (tensor, tuple or dict batches, no labels); only the first
    ``max_batches`` are used when given. Layers are matched by name: ``lowbit.quantize`` keeps the
    float model's module names. Cosine is per row of the last dimension (per position's channel
    vector for convolutions).
    """
    qlayers = quantized_layers(qmodel)
    float_modules = dict(float_model.named_modules())
    missing = [n for n in qlayers if n not in float_modules]
    if missing:
        raise ValueError(
            f"quantized layer {missing[0]!r} has no float counterpart; pass the float model the "
            "quantized model was made from"
        )
    isolated = {n: _Stats() for n in qlayers}
    accumulated = {n: _Stats() for n in qlayers}
    reference: dict[str, torch.Tensor] = {}
    conv = {n: m.kind == "conv" for n, m in qlayers.items()}
    phase = {"name": "float"}  # the isolated calls run quantized layers while the float pass is on

    def float_hook(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            ref = output_tensor(output).detach()
            reference[name] = ref
            qlayer = qlayers[name]
            device = model_device(qlayer)
            qargs = to_device(args, device)
            qkwargs = to_device(kwargs, device)
            isolated[name].add(ref, output_tensor(qlayer(*qargs, **qkwargs)), conv[name])

        return hook

    def quant_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if phase["name"] == "quant" and name in reference:
                accumulated[name].add(
                    reference[name], output_tensor(output).to(reference[name].device), conv[name]
                )

        return hook

    handles = [float_modules[n].register_forward_hook(float_hook(n), with_kwargs=True) for n in qlayers]
    handles += [m.register_forward_hook(quant_hook(n)) for n, m in qlayers.items()]
    fdevice, qdevice = model_device(float_model), model_device(qmodel)
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                reference.clear()
                phase["name"] = "float"
                call_model(float_model, to_device(batch, fdevice))
                phase["name"] = "quant"
                call_model(qmodel, to_device(batch, qdevice))
    finally:
        for h in handles:
            h.remove()
    rows = []
    for name, module in qlayers.items():
        weights = module.quantized_weights()
        formats = ",".join(sorted({qw.fmt.name for qw in weights.values()}))
        params = module.weight_params
        stored = sum(qw.stored_bytes for qw in weights.values())
        iso, acc = isolated[name], accumulated[name]
        rows.append(
            LayerError(
                name=name,
                kind=module.kind,
                format=formats,
                parameters=params,
                bits_per_param=stored * 8 / max(params, 1),
                sqnr_db=iso.sqnr_db,
                cosine=iso.cosine,
                mse=iso.mse,
                accumulated_sqnr_db=acc.sqnr_db,
                accumulated_cosine=acc.cosine,
            )
        )
    return rows
