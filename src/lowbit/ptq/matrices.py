"""Every quantizable layer as weight matrices ``[out, in]`` and the input rows that multiply them.

GPTQ, AWQ, SmoothQuant and bias correction are written for ``y = x W^T``. This module is the thin
adapter that lets them see every layer kind that way:

- ``nn.Linear`` / Hugging Face ``Conv1D``: one matrix, rows = the input's last dimension;
- ``nn.Conv1d`` / ``nn.Conv2d``: the kernel flattened per output channel, rows = the input
  unfolded into receptive fields (one matrix per group for grouped convolutions);
- ``nn.LSTM`` / ``nn.GRU``: every ``weight_ih_l{k}`` multiplies the input of layer ``k`` (the
  sequence, or the outputs of layer ``k - 1``) and every ``weight_hh_l{k}`` the hidden states that
  direction of layer ``k`` reads (its initial state, then its own outputs), recomputed here;
- ``nn.Embedding``: one matrix and no input rows (a lookup has nothing to compensate).

>>> import torch
>>> from lowbit.ptq.plan import LayerPlan
>>> from lowbit.recipes import ActivationSpec
>>> lstm = torch.nn.LSTM(4, 3, num_layers=2)
>>> layer = LayerPlan("rnn", lstm, "rnn", None, ActivationSpec())
>>> [(m.param, m.source) for m in matrices(layer)][:3]
[('weight_ih_l0', 'in_l0'), ('weight_hh_l0', 'hh_l0'), ('weight_ih_l1', 'in_l1')]
>>> {k: tuple(v.shape) for k, v in input_rows(layer, (torch.randn(5, 2, 4),), {}).items()}
{'in_l0': (10, 4), 'hh_l0': (10, 3), 'in_l1': (10, 3), 'hh_l1': (10, 3)}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from lowbit.algorithms.gptq import conv_input_rows
from lowbit.nn.layers import is_hf_conv1d
from lowbit.ptq.plan import LayerPlan


@dataclass(frozen=True)
class Matrix:
    """One weight matrix of a layer.

    Attributes:
        param: the module's parameter (``weight``, ``weight_ih_l0``).
        source: which input rows multiply it (``x``; ``g3`` for group 3 of a grouped conv;
            ``in_l1`` / ``hh_l0_reverse`` for RNNs); matrices with one source share statistics.
        rows: grouped convolutions: the output channels ``(start, stop)`` of this group.
        smoothable: the rows are the layer's own input, so ``x / s`` can run before the layer
            (SmoothQuant, AWQ); hidden states and inner RNN layers cannot be divided at run time.
        taps: columns per input channel (a conv's kernel size); a per-channel divisor repeats.
    """

    param: str
    source: str | None
    rows: tuple[int, int] | None = None
    smoothable: bool = False
    taps: int = 1


def matrices(layer: LayerPlan) -> list[Matrix]:
    """The weight matrices of ``layer`` (see the module docstring)."""
    module = layer.module
    if layer.kind == "linear":
        return [Matrix("weight", "x", smoothable=True)]
    if layer.kind == "conv":
        taps = math.prod(module.kernel_size)
        if module.groups == 1:
            return [Matrix("weight", "x", smoothable=True, taps=taps)]
        per = module.out_channels // module.groups
        return [Matrix("weight", f"g{g}", rows=(g * per, (g + 1) * per)) for g in range(module.groups)]
    if layer.kind == "rnn":
        out = []
        for name, _ in module.named_parameters():
            if not name.startswith("weight_"):
                continue
            kind, _, rest = name[len("weight_") :].partition("_l")  # ih / hh, "0" or "0_reverse"
            depth = rest.split("_", 1)[0]
            source = f"in_l{depth}" if kind == "ih" else f"hh_l{rest}"
            out.append(Matrix(name, source, smoothable=source == "in_l0"))
        return out
    return [Matrix("weight", None)]


def read(layer: LayerPlan, m: Matrix) -> torch.Tensor:
    """The matrix ``[out, in]`` (float32 copy)."""
    w = getattr(layer.module, m.param).detach()
    if is_hf_conv1d(layer.module):  # Hugging Face Conv1D stores the weight transposed
        w = w.t()
    w = w.reshape(w.shape[0], -1).float().clone()
    return w if m.rows is None else w[m.rows[0] : m.rows[1]]


def write(layer: LayerPlan, m: Matrix, value: torch.Tensor) -> None:
    """Put ``value`` (``[out, in]``, as ``read`` returns it) back into the float module."""
    p = getattr(layer.module, m.param)
    with torch.no_grad():
        if is_hf_conv1d(layer.module):
            p.copy_(value.t().to(p.dtype))
        elif m.rows is not None:
            p.view(p.shape[0], -1)[m.rows[0] : m.rows[1]] = value.to(p.dtype)
        else:
            p.copy_(value.reshape(p.shape).to(p.dtype))


def channel_dim(layer: LayerPlan) -> int:
    """Where the input channels are in the layer's input (1 for convolutions, else last)."""
    return 1 if layer.kind == "conv" else -1


def input_rows(layer: LayerPlan, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Rows ``[n, in]`` for every source of ``layer`` from one call's arguments."""
    x = args[0] if args else next(iter(kwargs.values()), None)
    if not isinstance(x, torch.Tensor):
        raise ValueError(
            f"layer {layer.name} was called with {type(x).__name__} instead of a tensor; data-aware "
            "algorithms need its input tensor (exclude the layer or give it algorithm rtn)"
        )
    module = layer.module
    if layer.kind == "linear":
        return {"x": x.reshape(-1, x.shape[-1])}
    if layer.kind == "conv":
        rows = conv_input_rows(x, module, all_groups=True)
        if module.groups == 1:
            return {"x": rows}
        width = rows.shape[1] // module.groups
        return {f"g{g}": rows[:, g * width : (g + 1) * width] for g in range(module.groups)}
    if layer.kind == "rnn":
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        return _rnn_rows(layer.name, module, x, hx)
    return {}


def _rnn_rows(name: str, rnn: nn.LSTM | nn.GRU, x: torch.Tensor, hx: Any) -> dict[str, torch.Tensor]:
    """Replay the RNN one layer and direction at a time to record what each weight multiplies."""
    if getattr(rnn, "proj_size", 0):
        raise ValueError(f"layer {name}: LSTM with proj_size is not supported by GPTQ / AWQ; use rtn for it")
    if rnn.batch_first and x.dim() == 3:
        x = x.transpose(0, 1)
    if x.dim() == 2:  # unbatched input [T, F]
        x = x.unsqueeze(1)
        hx = (
            None
            if hx is None
            else tuple(h.unsqueeze(1) for h in hx)
            if isinstance(hx, tuple)
            else hx.unsqueeze(1)
        )
    directions = 2 if rnn.bidirectional else 1
    lstm = rnn.mode == "LSTM"
    h0 = hx[0] if lstm and hx is not None else hx
    c0 = hx[1] if lstm and hx is not None else None
    out: dict[str, torch.Tensor] = {}
    layer_input = x
    for k in range(rnn.num_layers):
        out[f"in_l{k}"] = layer_input.reshape(-1, layer_input.shape[-1])
        outputs = []
        for d in range(directions):
            sfx = "_reverse" if d else ""
            single = type(rnn)(layer_input.shape[-1], rnn.hidden_size, bias=rnn.bias, device="meta")
            params = {
                f"{p}_l0": getattr(rnn, f"{p}_l{k}{sfx}")
                for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
                if hasattr(rnn, f"{p}_l{k}{sfx}")
            }
            seq = layer_input.flip(0) if d else layer_input
            batch = seq.shape[1]
            zeros = seq.new_zeros(1, batch, rnn.hidden_size)
            h_init = zeros if h0 is None else h0[k * directions + d].unsqueeze(0)
            state: Any = h_init
            if lstm:
                state = (h_init, zeros if c0 is None else c0[k * directions + d].unsqueeze(0))
            y, _ = functional_call(single, params, (seq, state))
            # The hidden state step t reads is the initial one, then the output of step t - 1.
            out[f"hh_l{k}{sfx}"] = torch.cat([h_init, y[:-1]]).reshape(-1, rnn.hidden_size)
            outputs.append(y.flip(0) if d else y)
        layer_input = torch.cat(outputs, dim=-1)
    return out
