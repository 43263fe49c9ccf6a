"""Quantized layers: Linear (and Hugging Face's GPT-2 ``Conv1D``), Conv1d / Conv2d, Embedding,
LSTM / GRU. Each is built from its float counterpart with ``from_float`` (quantize now) or
``from_manifest`` (empty storage of the right shapes, filled by ``load_state_dict``).

>>> import torch
>>> from lowbit.recipes import WeightSpec
>>> lin = torch.nn.Linear(64, 8)
>>> q = QuantizedLinear.from_float(lin, WeightSpec(format="int8"))
>>> x = torch.randn(3, 64)
>>> float(torch.nn.functional.cosine_similarity(q(x), lin(x)).min()) > 0.999
True
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from lowbit import formats
from lowbit.algorithms.rtn import choose_weight_qparams
from lowbit.granularity import parse
from lowbit.nn.base import QuantizedModule
from lowbit.nn.qweight import QuantizedWeight
from lowbit.recipes.spec import WeightSpec


def quantize_weight(w: torch.Tensor, spec: WeightSpec, what: str) -> QuantizedWeight:
    """Quantize one weight as ``spec`` says (round to nearest, with an MSE clip search if asked).

    >>> quantize_weight(torch.randn(4, 16), WeightSpec(format="int4"), "demo").fmt.name
    'int4'
    """
    from lowbit.primitives import check_finite

    fmt = formats.get(spec.format)
    check_finite(w, what)
    g = parse(spec.granularity)
    algorithm = spec.algorithm if spec.algorithm in ("rtn", "mse") else "rtn"
    qparams = choose_weight_qparams(w.detach(), fmt, g, spec.symmetric, algorithm)
    qw = QuantizedWeight.from_float(w, fmt, g, spec.symmetric, qparams=qparams, what=what)
    qw.algorithm = "+".join(spec.steps)
    return qw


def _float_bias(bias: torch.Tensor | None) -> nn.Parameter | None:
    return None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)


def _loaded_bias(bias: torch.Tensor | None, entry: dict[str, Any], width: int) -> nn.Parameter | None:
    """The bias slot of a layer being loaded: bias correction may have added one the float layer lacks."""
    if bias is None and entry["config"].get("bias"):
        return nn.Parameter(torch.zeros(width), requires_grad=False)
    return _float_bias(bias)


# --- Linear ----------------------------------------------------------------------------------------


class QuantizedLinear(QuantizedModule):
    """``y = x W^T + b`` with a packed ``W`` of shape ``[out_features, in_features]``."""

    kind = "linear"

    def __init__(
        self, in_features: int, out_features: int, qweight: QuantizedWeight, bias: nn.Parameter | None
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.qweight = qweight
        self.bias = bias

    @classmethod
    def from_float(
        cls, module: nn.Module, spec: WeightSpec, name: str = "", qweight: QuantizedWeight | None = None
    ) -> QuantizedLinear:
        """From ``nn.Linear`` or Hugging Face ``Conv1D`` (whose weight is stored transposed)."""
        weight = linear_weight(module)
        qw = qweight if qweight is not None else quantize_weight(weight, spec, f"layer {name or '?'} weight")
        return cls(weight.shape[1], weight.shape[0], qw, _float_bias(module.bias))._adopt_linear(module)

    @classmethod
    def from_manifest(cls, module: nn.Module, entry: dict[str, Any]) -> QuantizedLinear:
        weight = linear_weight(module)
        qw = QuantizedWeight.empty(entry["weights"]["qweight"], weight.device)
        layer = cls(weight.shape[1], weight.shape[0], qw, _loaded_bias(module.bias, entry, weight.shape[0]))
        return layer._adopt_linear(module)

    def _adopt_linear(self, module: nn.Module) -> QuantizedLinear:
        self.adopt(module)
        self.weight_transposed = is_hf_conv1d(module)
        return self

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, laid out as the float layer's (``[in, out]`` for HF ``Conv1D``)."""
        w = self.qweight.dequantize(self.float_dtype)
        return w.t() if getattr(self, "weight_transposed", False) else w

    @classmethod
    def float_weight_shapes(cls, module: nn.Module) -> dict[str, tuple[int, ...]]:
        return {"qweight": tuple(linear_weight(module).shape)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = self.run_kernel(x)
        return self.reference_forward(x) if fast is None else fast

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize the weight, run ``F.linear``: the simulation every kernel is checked against."""
        x = self.quantize_input(x)
        return F.linear(
            x, self.qweight.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype)
        )

    def float_config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
        }


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` weight of ``nn.Linear`` or of Hugging Face's ``Conv1D`` (stored ``[in, out]``)."""
    if is_hf_conv1d(module):
        return module.weight.detach().t()
    return module.weight.detach()


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face GPT-2's ``Conv1D``: a linear layer whose weight is ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


# --- Conv ------------------------------------------------------------------------------------------


class QuantizedConv(QuantizedModule):
    """Conv1d / Conv2d with a packed kernel, stored as a ``[out, in/groups * prod(kernel)]`` matrix
    so that group-wise scales run along the real reduction dimension, as for a linear layer."""

    kind = "conv"

    def __init__(self, config: dict[str, Any], qweight: QuantizedWeight, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.config = config
        self.qweight = qweight
        self.bias = bias
        self._conv = F.conv1d if config["dims"] == 1 else F.conv2d

    @staticmethod
    def _config(module: nn.Conv1d | nn.Conv2d) -> dict[str, Any]:
        if module.padding_mode != "zeros":
            raise ValueError(f"padding_mode={module.padding_mode!r} is not supported (only 'zeros')")
        padding = module.padding if isinstance(module.padding, str) else list(module.padding)
        return {
            "dims": 1 if isinstance(module, nn.Conv1d) else 2,
            "in_channels": module.in_channels,
            "out_channels": module.out_channels,
            "kernel_size": list(module.kernel_size),
            "stride": list(module.stride),
            "padding": padding,
            "dilation": list(module.dilation),
            "groups": module.groups,
            "bias": module.bias is not None,
        }

    @classmethod
    def from_float(
        cls,
        module: nn.Conv1d | nn.Conv2d,
        spec: WeightSpec,
        name: str = "",
        qweight: QuantizedWeight | None = None,
    ) -> QuantizedConv:
        config = cls._config(module)
        matrix = module.weight.detach().reshape(module.out_channels, -1)
        qw = qweight if qweight is not None else quantize_weight(matrix, spec, f"layer {name or '?'} weight")
        return cls(config, qw, _float_bias(module.bias)).adopt(module)

    @classmethod
    def from_manifest(cls, module: nn.Conv1d | nn.Conv2d, entry: dict[str, Any]) -> QuantizedConv:
        qw = QuantizedWeight.empty(entry["weights"]["qweight"], module.weight.device)
        config = cls._config(module)
        bias = _loaded_bias(module.bias, entry, module.out_channels)
        config["bias"] = bias is not None
        return cls(config, qw, bias).adopt(module)

    @classmethod
    def float_weight_shapes(cls, module: nn.Module) -> dict[str, tuple[int, ...]]:
        w = module.weight
        return {"qweight": (w.shape[0], math.prod(w.shape[1:]))}

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized kernel ``[out, in / groups, *kernel_size]``, as the float layer's."""
        return self.qweight.dequantize(self.float_dtype).reshape(self.kernel_shape)

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        c = self.config
        return (c["out_channels"], c["in_channels"] // c["groups"], *c["kernel_size"])

    def _broadcast_smooth(self, smooth: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return smooth.to(x.dtype).reshape(1, -1, *([1] * (x.dim() - 2)))  # channels are dim 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The input size is remembered (plain attribute, not stored) so that kernel choice can
        # time this conv at the resolution it really runs at (calibration sets it).
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            self.last_input_size = tuple(int(d) for d in x.shape[2:])
        fast = self.run_kernel(x)
        return self.reference_forward(x) if fast is None else fast

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize the kernel, run ``F.conv1d`` / ``F.conv2d``: what every kernel is checked against."""
        x = self.quantize_input(x)
        c = self.config
        weight = self.qweight.dequantize(x.dtype).reshape(self.kernel_shape)
        padding = c["padding"] if isinstance(c["padding"], str) else tuple(c["padding"])
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return self._conv(x, weight, bias, tuple(c["stride"]), padding, tuple(c["dilation"]), c["groups"])

    def float_config(self) -> dict[str, Any]:
        return dict(self.config)


# --- Embedding -------------------------------------------------------------------------------------


class QuantizedEmbedding(QuantizedModule):
    """Lookup table with a packed ``[num_embeddings, embedding_dim]`` weight (no input quantization:
    the inputs are indices)."""

    kind = "embedding"

    @property
    def backend(self) -> str:
        """Lookups read only the packed rows they need: no kernel to choose, nothing simulated."""
        return "packed-lookup"

    def __init__(
        self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, qweight: QuantizedWeight
    ):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.qweight = qweight

    @staticmethod
    def _check(module: nn.Embedding) -> None:
        if module.max_norm is not None or module.sparse:
            raise ValueError("embeddings with max_norm or sparse gradients are not supported")

    @classmethod
    def from_float(
        cls, module: nn.Embedding, spec: WeightSpec, name: str = "", qweight: QuantizedWeight | None = None
    ) -> QuantizedEmbedding:
        cls._check(module)
        qw = (
            qweight
            if qweight is not None
            else quantize_weight(module.weight, spec, f"layer {name or '?'} weight")
        )
        return cls(module.num_embeddings, module.embedding_dim, module.padding_idx, qw).adopt(module)

    @classmethod
    def from_manifest(cls, module: nn.Embedding, entry: dict[str, Any]) -> QuantizedEmbedding:
        cls._check(module)
        qw = QuantizedWeight.empty(entry["weights"]["qweight"], module.weight.device)
        return cls(module.num_embeddings, module.embedding_dim, module.padding_idx, qw).adopt(module)

    @classmethod
    def float_weight_shapes(cls, module: nn.Module) -> dict[str, tuple[int, ...]]:
        return {"qweight": tuple(module.weight.shape)}

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table ``[num_embeddings, embedding_dim]`` (the whole table: forward
        itself only unpacks the rows it looks up)."""
        return self.qweight.dequantize(self.float_dtype)

    def set_activation(self, spec: Any, name: str = "") -> None:
        self.input_quant = None  # integer indices are never quantized

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Only the looked-up rows are unpacked: a 30k-row vocabulary is never dequantized whole.
        return self.qweight.dequantize_rows(ids)

    def float_config(self) -> dict[str, Any]:
        return {
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "padding_idx": self.padding_idx,
        }


# --- LSTM / GRU ------------------------------------------------------------------------------------


class QuantizedRNN(QuantizedModule):
    """LSTM or GRU with every ``weight_*`` matrix packed; biases stay float.

    The recurrence itself runs in PyTorch's float kernel on the dequantized weights (through a
    template module on the meta device, so no float copy of the weights is kept in memory).
    The input sequence is quantized when an activation spec is given; hidden states are not.
    """

    kind = "rnn"

    def __init__(
        self, config: dict[str, Any], weights: dict[str, QuantizedWeight], biases: dict[str, torch.Tensor]
    ):
        super().__init__()
        self.config = config
        self.weights = nn.ModuleDict(weights)
        for name, b in biases.items():
            self.register_parameter(name, nn.Parameter(b.detach().clone(), requires_grad=False))
        self.bias_names = list(biases)
        cls = nn.LSTM if config["mode"] == "LSTM" else nn.GRU
        kwargs = {k: v for k, v in config.items() if k != "mode"}
        self._template = [cls(**kwargs, device="meta")]  # a list: not a submodule, not in state_dict

    @staticmethod
    def _config(module: nn.LSTM | nn.GRU) -> dict[str, Any]:
        config = {
            "mode": module.mode,
            "input_size": module.input_size,
            "hidden_size": module.hidden_size,
            "num_layers": module.num_layers,
            "bias": module.bias,
            "batch_first": module.batch_first,
            "dropout": module.dropout,
            "bidirectional": module.bidirectional,
        }
        if getattr(module, "proj_size", 0):
            config["proj_size"] = module.proj_size
        return config

    @classmethod
    def from_float(
        cls,
        module: nn.LSTM | nn.GRU,
        spec: WeightSpec,
        name: str = "",
        qweight: dict[str, QuantizedWeight] | None = None,
    ) -> QuantizedRNN:
        """``qweight`` optionally supplies packed weights chosen elsewhere (QAT), keyed by parameter
        name (``weight_ih_l0``) or by path (``weights.weight_ih_l0``)."""
        given = {k.removeprefix("weights."): v for k, v in (qweight or {}).items()}
        weights, biases = {}, {}
        for pname, p in module.named_parameters():
            if pname.startswith("weight"):
                weights[pname] = given.get(pname) or quantize_weight(p, spec, f"layer {name or '?'} {pname}")
            else:
                biases[pname] = p
        return cls(cls._config(module), weights, biases).adopt(module)

    @classmethod
    def from_manifest(cls, module: nn.LSTM | nn.GRU, entry: dict[str, Any]) -> QuantizedRNN:
        device = next(module.parameters()).device
        weights = {
            n: QuantizedWeight.empty(spec, device)
            for n, spec in ((k.split(".", 1)[1], v) for k, v in entry["weights"].items())
        }
        biases = {n: p for n, p in module.named_parameters() if not n.startswith("weight")}
        return cls(cls._config(module), weights, biases).adopt(module)

    def __getattr__(self, name: str) -> Any:
        # ``weight_ih_l0`` ... read as on the float LSTM / GRU: the dequantized matrix.
        if name.startswith("weight_"):
            weights = self._modules.get("weights")
            if weights is not None and name in weights._modules:
                return weights._modules[name].dequantize(self.float_dtype)
        return super().__getattr__(name)

    @classmethod
    def float_weight_shapes(cls, module: nn.Module) -> dict[str, tuple[int, ...]]:
        return {
            f"weights.{n}": tuple(p.shape) for n, p in module.named_parameters() if n.startswith("weight")
        }

    def forward(self, x: Any, hx: Any = None) -> Any:
        if isinstance(x, torch.Tensor):
            x = self.quantize_input(x)
            dtype = x.dtype
        else:
            dtype = torch.float32  # a PackedSequence: its data is passed through unquantized
        params = {n: qw.dequantize(dtype) for n, qw in self.weights.items()}
        params.update({n: getattr(self, n) for n in self.bias_names})
        return functional_call(self._template[0], params, (x, hx))

    def float_config(self) -> dict[str, Any]:
        return dict(self.config)


QUANTIZED_CLASSES: dict[str, type[QuantizedModule]] = {
    "linear": QuantizedLinear,
    "conv": QuantizedConv,
    "embedding": QuantizedEmbedding,
    "rnn": QuantizedRNN,
}
