"""QAT layers: the float layer's own parameters, trained through weight and input fake-quantizers.

Each QAT layer keeps float ``weight`` / ``bias`` parameters (so any optimizer and training loop
works unchanged), fake-quantizes its input like ``QuantizedModule.quantize_input`` and its weight
like ``QuantizedWeight`` would store it, and knows how to hand back the float layer
(``to_float``) and the packed weights (``quantized_weights``) for ``lowbit.qat.convert``.

>>> import torch
>>> from lowbit.recipes import ActivationSpec, WeightSpec
>>> layer = QATLinear(torch.nn.Linear(8, 4), WeightSpec(format="int4"), ActivationSpec())
>>> layer(torch.randn(2, 8)).shape
torch.Size([2, 4])
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from lowbit.nn.base import _plain
from lowbit.nn.layers import is_hf_conv1d
from lowbit.nn.qweight import QuantizedWeight
from lowbit.primitives import quantize
from lowbit.qat.fake_quant import ActFakeQuant, WeightFakeQuant
from lowbit.recipes.spec import ActivationSpec, WeightSpec


def pack(fq: WeightFakeQuant, weight: torch.Tensor, algorithm: str) -> QuantizedWeight:
    """Pack ``weight`` with exactly the parameters ``fq`` uses in its forward."""
    w = weight.detach()
    qp = fq.qparams(w)
    qw = QuantizedWeight.from_codes(
        quantize(w, fq.fmt, qp), fq.fmt, qp, fq.granularity, fq.spec.symmetric, tuple(w.shape)
    )
    qw.algorithm = algorithm
    return qw


class QATModule(nn.Module):
    """Shared parts: the optional input fake-quantizer and the conversion hooks."""

    kind: ClassVar[str] = "module"

    def __init__(self, activation: ActivationSpec, lsq: bool, name: str) -> None:
        super().__init__()
        self.name = name
        self.lsq = lsq
        self.input_quant = ActFakeQuant(activation, lsq, name) if activation.enabled else None

    # The float layer a subclass wraps as a submodule (``conv``, ``rnn`` ...): attribute reads this
    # layer cannot answer go to it, so model code that inspects layers (transformers reads
    # ``projection.weight.dtype`` in ViT, ``conv1.stride`` in Whisper) keeps working while training.
    wrapped: ClassVar[str | None] = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get(self.wrapped) if self.wrapped else None
            if inner is None or name.startswith("_"):
                raise
            return getattr(inner, name)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quant is None else self.input_quant(x)

    @property
    def algorithm(self) -> str:
        return "qat-lsq" if self.lsq else "qat-ste"

    def to_float(self) -> nn.Module:
        """The float layer with the current (trained) weights."""
        raise NotImplementedError

    def quantized_weights(self) -> dict[str, QuantizedWeight]:
        """Packed weights by attribute path as the quantized layer names them (``qweight``, ...)."""
        raise NotImplementedError


class QATLinear(QATModule):
    """``nn.Linear`` (or Hugging Face GPT-2's ``Conv1D``, a linear layer whose weight is stored
    ``[in, out]``) trained with fake-quantized weight and input. ``weight`` keeps the float layer's
    layout, so its state dict and model code reading it are unchanged."""

    kind = "linear"

    def __init__(
        self,
        module: nn.Module,
        weight: WeightSpec,
        activation: ActivationSpec,
        lsq: bool = False,
        name: str = "",
    ) -> None:
        transposed = is_hf_conv1d(module)
        if type(module) is not nn.Linear and not transposed:
            raise ValueError(
                f"layer {name or '?'}: QAT supports torch.nn.Linear, got {type(module).__name__}; "
                "exclude it from the recipe (exclude=[...]) to keep it float"
            )
        super().__init__(activation, lsq, name)
        self.transposed = transposed
        # The float layer's plain settings (``nf`` of Conv1D ...), as quantized layers keep them.
        for key, value in vars(module).items():
            if not key.startswith("_") and key != "training" and _plain(value) and key not in vars(self):
                setattr(self, key, value)
        w = module.weight.detach()
        self.out_features, self.in_features = (w.shape[1], w.shape[0]) if self.transposed else w.shape
        self.weight = nn.Parameter(w.clone())
        self.bias = None if module.bias is None else nn.Parameter(module.bias.detach().clone())
        # Conv1D is rebuilt from a copy of itself (its class lives in transformers, not here).
        self._template = [copy.deepcopy(module)] if self.transposed else []
        self.weight_quant = WeightFakeQuant(weight, self._matrix(), lsq, name)

    def _matrix(self) -> torch.Tensor:
        """The ``[out, in]`` weight, as ``QuantizedLinear`` quantizes it."""
        return self.weight.t() if self.transposed else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Contiguous: the same GEMM as the converted layer's, so converted outputs match bit for bit.
        return F.linear(self.quantize_input(x), self.weight_quant(self._matrix()).contiguous(), self.bias)

    def to_float(self) -> nn.Module:
        if self.transposed:
            out = copy.deepcopy(self._template[0]).to(self.weight.device)
        else:
            out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
            out = out.to(self.weight.device)
        with torch.no_grad():
            out.weight.copy_(self.weight)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def quantized_weights(self) -> dict[str, QuantizedWeight]:
        return {"qweight": pack(self.weight_quant, self._matrix(), self.algorithm)}


class QATConv(QATModule):
    """Conv1d / Conv2d trained with fake-quantized kernel and input. The kernel is quantized as a
    ``[out, in/groups * prod(kernel)]`` matrix, exactly as ``QuantizedConv`` stores it."""

    kind = "conv"
    wrapped = "conv"

    def __init__(
        self,
        module: nn.Conv1d | nn.Conv2d,
        weight: WeightSpec,
        activation: ActivationSpec,
        lsq: bool = False,
        name: str = "",
    ) -> None:
        if module.padding_mode != "zeros":
            raise ValueError(
                f"layer {name or '?'}: padding_mode={module.padding_mode!r} is not supported; "
                "exclude the layer from the recipe"
            )
        super().__init__(activation, lsq, name)
        self.conv = copy.deepcopy(module)  # keeps the float hyper-parameters and parameters
        self.weight_quant = WeightFakeQuant(weight, self._matrix(self.conv.weight), lsq, name)

    def _matrix(self, w: torch.Tensor) -> torch.Tensor:
        return w.reshape(w.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.conv.weight
        wq = self.weight_quant(self._matrix(w)).reshape(w.shape)
        return self.conv._conv_forward(self.quantize_input(x), wq, self.conv.bias)

    def to_float(self) -> nn.Module:
        return copy.deepcopy(self.conv)

    def quantized_weights(self) -> dict[str, QuantizedWeight]:
        return {"qweight": pack(self.weight_quant, self._matrix(self.conv.weight), self.algorithm)}


class QATEmbedding(QATModule):
    """``nn.Embedding`` with a fake-quantized table (its integer inputs are never quantized)."""

    kind = "embedding"
    wrapped = "embedding"

    def __init__(
        self,
        module: nn.Embedding,
        weight: WeightSpec,
        activation: ActivationSpec,
        lsq: bool = False,
        name: str = "",
    ) -> None:
        super().__init__(ActivationSpec(), lsq, name)
        self.embedding = copy.deepcopy(module)
        self.weight_quant = WeightFakeQuant(weight, self.embedding.weight, lsq, name)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.embedding
        return F.embedding(ids, self.weight_quant(e.weight), e.padding_idx)

    def to_float(self) -> nn.Module:
        return copy.deepcopy(self.embedding)

    def quantized_weights(self) -> dict[str, QuantizedWeight]:
        return {"qweight": pack(self.weight_quant, self.embedding.weight, self.algorithm)}


class QATRNN(QATModule):
    """LSTM / GRU with every ``weight_*`` matrix fake-quantized; the input sequence is quantized,
    hidden states are not (as in ``QuantizedRNN``)."""

    kind = "rnn"
    wrapped = "rnn"

    def __init__(
        self,
        module: nn.LSTM | nn.GRU,
        weight: WeightSpec,
        activation: ActivationSpec,
        lsq: bool = False,
        name: str = "",
    ) -> None:
        super().__init__(activation, lsq, name)
        self.rnn = copy.deepcopy(module)
        self.weight_names = [n for n, _ in self.rnn.named_parameters() if n.startswith("weight")]
        self.weight_quant = nn.ModuleDict(
            {n: WeightFakeQuant(weight, getattr(self.rnn, n), lsq, f"{name}.{n}") for n in self.weight_names}
        )

    def forward(self, x: torch.Tensor, hx: torch.Tensor | tuple | None = None):  # noqa: ANN201
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"layer {self.name or '?'}: QAT of packed sequences is not supported; pad them")
        params = dict(self.rnn.named_parameters())
        for n in self.weight_names:
            params[n] = self.weight_quant[n](params[n])
        return functional_call(self.rnn, params, (self.quantize_input(x), hx))

    def to_float(self) -> nn.Module:
        return copy.deepcopy(self.rnn)

    def quantized_weights(self) -> dict[str, QuantizedWeight]:
        return {
            f"weights.{n}": pack(self.weight_quant[n], getattr(self.rnn, n), self.algorithm)
            for n in self.weight_names
        }


QAT_CLASSES: dict[str, type[QATModule]] = {
    "linear": QATLinear,
    "conv": QATConv,
    "embedding": QATEmbedding,
    "rnn": QATRNN,
}
