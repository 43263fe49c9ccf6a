"""Thin adapters that feed calibration data to the data-aware algorithms (pure math in
``lowbit.algorithms``): GPTQ, AWQ, SmoothQuant and bias correction.

GPTQ and AWQ run *sequentially*: layers are visited in the order the forward pass calls them, and
each layer's inputs are captured from a working copy in which every earlier layer is already
quantized, so each layer compensates the error of those before it. To capture one layer's inputs
the forward pass is stopped right after that layer is reached, so peak memory is the model plus one
layer's statistics (a Hessian, or a sample of inputs), never all activations.

Each adapter returns the keyword arguments of ``lowbit.ptq.prepare``: packed ``weights`` chosen
here, and ``input_smooth`` divisors whose inverse is already folded into those weights.

>>> import torch, lowbit
>>> torch.manual_seed(0) and None
>>> model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
>>> q = lowbit.quantize(model, "int4-gptq", calibration=[torch.randn(64, 32)], progress=False)
>>> q[0].qweight.algorithm, q[0].qweight.info["gptq_error"] <= q[0].qweight.info["rtn_error"]
('gptq', True)
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit import formats
from lowbit.algorithms.awq import awq_search_clip, awq_search_scales
from lowbit.algorithms.bias_correction import expected_output_shift
from lowbit.algorithms.gptq import HessianAccumulator, conv_input_rows, gptq_quantize, reconstruction_error
from lowbit.algorithms.smoothquant import channel_absmax, smoothquant_scales
from lowbit.granularity import parse
from lowbit.nn.base import QuantizedModule
from lowbit.nn.layers import is_hf_conv1d, linear_weight, quantize_weight
from lowbit.nn.qweight import QuantizedWeight
from lowbit.ptq.convert import model_device, to_device
from lowbit.ptq.plan import LayerPlan, plan_model
from lowbit.recipes.spec import Recipe
from lowbit.threads import single_thread
from lowbit.zoo.base import call_model

# AWQ measures each candidate scaling on a sample of the layer's input rows: enough rows to rank
# candidates reliably, few enough that the search costs milliseconds per layer.
AWQ_SAMPLE_ROWS = 4096


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has seen its input."""


def _run(
    model: nn.Module, batches: Sequence[Any], module: nn.Module, on_input: Callable[[torch.Tensor], None]
):
    """Call ``on_input`` with ``module``'s input for every batch, stopping each pass right there."""

    def hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
        on_input(args[0])
        raise _StopForward

    device = model_device(model)
    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    call_model(model, to_device(batch, device))
                except _StopForward:
                    pass
    finally:
        handle.remove()


def call_order(model: nn.Module, layers: list[LayerPlan], batch: Any) -> list[list[LayerPlan]]:
    """``layers`` in the order the forward pass first calls them, grouped: consecutive layers that
    read the very same input tensor (q, k and v projections) form one group, so their statistics
    come from one pass. Layers never called are an error."""
    first_call: dict[str, tuple[int, int]] = {}
    handles = []
    for layer in layers:

        def hook(_m: nn.Module, args: tuple[Any, ...], name: str = layer.name) -> None:
            x = args[0] if args else None
            ident = x.data_ptr() if isinstance(x, torch.Tensor) else id(x)
            first_call.setdefault(name, (len(first_call), ident))

        handles.append(layer.module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            call_model(model, to_device(batch, model_device(model)))
    finally:
        for h in handles:
            h.remove()
    missing = [layer.name for layer in layers if layer.name not in first_call]
    if missing:
        raise ValueError(
            f"layer {missing[0]} is never called on the calibration data, so it cannot be calibrated; "
            "exclude it from the recipe or give batches that reach it"
        )
    groups: list[list[LayerPlan]] = []
    for layer in sorted(layers, key=lambda p: first_call[p.name][0]):
        same_input = groups and first_call[groups[-1][0].name][1] == first_call[layer.name][1]
        if same_input and layer.kind == groups[-1][0].kind == "linear":
            groups[-1].append(layer)
        else:
            groups.append([layer])
    return groups


def _weight_matrix(layer: LayerPlan) -> torch.Tensor:
    if layer.kind == "conv":
        return layer.module.weight.detach().reshape(layer.module.out_channels, -1)
    return linear_weight(layer.module)


def _input_rows(layer: LayerPlan, x: torch.Tensor) -> torch.Tensor:
    """Rows that multiply the weight matrix: the input itself, or a conv input unfolded."""
    if layer.kind == "conv":
        return conv_input_rows(x, layer.module)
    return x.reshape(-1, x.shape[-1])


def _supports_matrix_algorithm(layer: LayerPlan) -> bool:
    """GPTQ / AWQ need a weight that multiplies input rows: linear, or conv without groups."""
    return layer.kind == "linear" or (layer.kind == "conv" and layer.module.groups == 1)


def _write_back(layer: LayerPlan, qweight: QuantizedWeight, smooth: torch.Tensor | None) -> None:
    """Put the quantized weight (dequantized, with any input smoothing folded back in) into the float
    layer of the working copy: later layers then see exactly the quantized output, at float speed."""
    w = qweight.dequantize()
    if smooth is not None:
        w = w / smooth  # (x / s) @ W_q^T == x @ (W_q / s)^T
    module = layer.module
    with torch.no_grad():
        if layer.kind == "conv":
            module.weight.copy_(w.reshape(module.weight.shape))
        elif is_hf_conv1d(module):  # Hugging Face Conv1D stores the weight transposed
            module.weight.copy_(w.t())
        else:
            module.weight.copy_(w)


def _sequential_groups(model: nn.Module, recipe: Recipe, algorithm: str, calibration: Sequence[Any]):
    """A working copy of the model and its layers that use ``algorithm``, grouped by shared input."""
    work = copy.deepcopy(model).eval()
    layers = [
        p for p in plan_model(work, recipe).layers if p.weight is not None and p.weight.algorithm == algorithm
    ]
    return work, call_order(work, layers, calibration[0]) if layers else []


def gptq_weights(
    model: nn.Module, recipe: Recipe, calibration: Sequence[Any], progress: bool = True
) -> dict[str, Any]:
    """GPTQ for every layer whose weight spec says ``algorithm: gptq`` (round to nearest for
    embeddings, RNNs and grouped convolutions, which have no input Hessian)."""
    work, groups = _sequential_groups(model, recipe, "gptq", calibration)
    weights: dict[str, QuantizedWeight] = {}
    bar = tqdm(
        total=sum(len(g) for g in groups), desc="GPTQ", unit="layer", disable=not progress, leave=False
    )
    for group in groups:
        first = group[0]
        hessian = None
        if _supports_matrix_algorithm(first):
            acc = HessianAccumulator(_weight_matrix(first).shape[1], device=first.module.weight.device)
            _run(work, calibration, first.module, lambda x, p=first, acc=acc: acc.update(_input_rows(p, x)))
            hessian = acc.hessian()  # shared by every layer of the group: they read the same input
        for layer in group:
            assert layer.weight is not None
            what = f"layer {layer.name} weight"
            if hessian is None:
                weights[layer.name] = quantize_weight(layer.module.weight, layer.weight, what)
                bar.update()
                continue
            fmt = formats.get(layer.weight.format)
            if fmt.family != "int":
                raise ValueError(
                    f"GPTQ needs an integer format (int2..int8, uint2..uint8); "
                    f"{layer.name} asks for {fmt.name}"
                )
            w = _weight_matrix(layer)
            g = parse(layer.weight.granularity)
            with single_thread():  # many small ops: a second thread only adds sync cost
                codes, qp = gptq_quantize(w, hessian, fmt, g, layer.weight.symmetric)
            qw = QuantizedWeight.from_codes(codes, fmt, qp, g, layer.weight.symmetric, tuple(w.shape))
            qw.algorithm = "gptq"
            rtn = quantize_weight(w, layer.weight, what)
            qw.info = {
                "gptq_error": reconstruction_error(w, qw.dequantize(), hessian),
                "rtn_error": reconstruction_error(w, rtn.dequantize(), hessian),
            }
            bar.set_postfix_str(
                f"{layer.name} err {qw.info['gptq_error']:.3g} (rtn {qw.info['rtn_error']:.3g})"
            )
            bar.update()
            weights[layer.name] = qw
            _write_back(layer, qw, None)
    bar.close()
    return {"weights": weights}


def awq_weights(
    model: nn.Module, recipe: Recipe, calibration: Sequence[Any], progress: bool = True
) -> dict[str, Any]:
    """AWQ for every linear layer whose weight spec says ``algorithm: awq``: per-input-channel
    scales searched on calibration inputs (shared by layers that read the same input, as q / k / v),
    then a clipping search per layer, then round to nearest."""
    work, groups = _sequential_groups(model, recipe, "awq", calibration)
    weights: dict[str, QuantizedWeight] = {}
    smooth: dict[str, torch.Tensor] = {}
    bar = tqdm(total=sum(len(g) for g in groups), desc="AWQ", unit="layer", disable=not progress, leave=False)
    for group in groups:
        first = group[0]
        assert first.weight is not None
        if first.kind != "linear":
            for layer in group:
                assert layer.weight is not None
                weights[layer.name] = quantize_weight(
                    layer.module.weight, layer.weight, f"layer {layer.name} weight"
                )
                bar.update()
            continue
        sample: list[torch.Tensor] = []
        totals: dict[str, Any] = {"abs": 0.0, "rows": 0}

        def collect(x: torch.Tensor, sample=sample, totals=totals) -> None:
            rows = x.detach().reshape(-1, x.shape[-1]).float()
            totals["abs"] = totals["abs"] + rows.abs().sum(dim=0)
            totals["rows"] += rows.shape[0]
            if sum(r.shape[0] for r in sample) < AWQ_SAMPLE_ROWS:
                sample.append(rows[:AWQ_SAMPLE_ROWS])

        _run(work, calibration, first.module, collect)
        x = torch.cat(sample)[:AWQ_SAMPLE_ROWS]
        act_mean = totals["abs"] / max(int(totals["rows"]), 1)
        fmt, g = formats.get(first.weight.format), parse(first.weight.granularity)
        matrices = [_weight_matrix(layer) for layer in group]
        s = awq_search_scales(matrices, x, fmt, g, first.weight.symmetric, act_mean=act_mean)
        for layer, w in zip(group, matrices, strict=True):
            assert layer.weight is not None
            lfmt, lg = formats.get(layer.weight.format), parse(layer.weight.granularity)
            scaled = w * s  # columns scaled up; the input is divided by s at run time
            qp = awq_search_clip(scaled, x / s, lfmt, lg, layer.weight.symmetric)
            qw = QuantizedWeight.from_float(
                scaled, lfmt, lg, layer.weight.symmetric, qparams=qp, what=f"layer {layer.name} weight"
            )
            qw.algorithm = "awq"
            weights[layer.name], smooth[layer.name] = qw, s
            _write_back(layer, qw, s)
            bar.update()
    bar.close()
    return {"weights": weights, "input_smooth": smooth}


def _observe_inputs(
    model: nn.Module,
    modules: dict[str, nn.Module],
    on_input: Callable[[str, torch.Tensor], None],
    calibration: Sequence[Any],
    desc: str,
    progress: bool,
) -> None:
    """One full pass over the calibration data, calling ``on_input(name, x)`` with the input of
    every module in ``modules`` (by name) each time it runs."""
    handles = [
        module.register_forward_pre_hook(lambda _m, args, name=name: on_input(name, args[0]))
        for name, module in modules.items()
    ]
    device = model_device(model)
    try:
        with torch.no_grad():
            for batch in tqdm(calibration, desc=desc, disable=not progress, leave=False):
                call_model(model, to_device(batch, device))
    finally:
        for h in handles:
            h.remove()


def smoothquant_weights(
    model: nn.Module, recipe: Recipe, calibration: Sequence[Any], progress: bool = True
) -> dict[str, Any]:
    """SmoothQuant: for every linear layer with quantized activations, move the input's outlier
    channels into the weight (``x / s``, ``w * s``) with the recipe's alpha, measured in one pass.

    Layers that read the same input (attention's q / k / v) share one ``s``, from their combined
    weight columns, as in the paper: the input is then scaled and quantized once for all of them,
    which lets the ONNX export run them as one fused GEMM."""
    alpha = recipe.smoothquant_alpha
    assert alpha is not None
    layers = [
        p
        for p in plan_model(model, recipe).layers
        if p.kind == "linear"
        and p.activation.enabled
        and not any(fnmatch.fnmatchcase(p.name, pattern) for pattern in recipe.smoothquant_exclude)
    ]
    if not layers:
        return {"weights": {}, "input_smooth": {}}
    maxima: dict[str, torch.Tensor] = {}

    def running_max(name: str, x: torch.Tensor) -> None:
        current = channel_absmax(x)
        maxima[name] = current if name not in maxima else torch.maximum(maxima[name], current)

    modules = {layer.name: layer.module for layer in layers}
    _observe_inputs(model, modules, running_max, calibration, "SmoothQuant", progress)
    weights, smooth = {}, {}
    for group in call_order(model, layers, calibration[0]):
        names = [layer.name for layer in group]
        if any(name not in maxima for name in names):
            raise ValueError(f"layer {names[0]} saw no calibration data; SmoothQuant cannot scale it")
        matrices = [_weight_matrix(layer) for layer in group]
        s = smoothquant_scales(maxima[names[0]], matrices, alpha)  # same input: same maxima
        for layer, w in zip(group, matrices, strict=True):
            assert layer.weight is not None
            weights[layer.name] = quantize_weight(w * s, layer.weight, f"layer {layer.name} weight")
            smooth[layer.name] = s
    return {"weights": weights, "input_smooth": smooth}


def correct_biases(
    float_model: nn.Module, qmodel: nn.Module, calibration: Sequence[Any], progress: bool = True
) -> dict[str, float]:
    """Bias correction: add to each quantized linear / conv bias the expected output shift its
    weight quantization causes, from the float model's input means on the calibration data.
    Returns the largest absolute correction per layer (for the report)."""
    targets = {
        name: m
        for name, m in qmodel.named_modules()
        if isinstance(m, QuantizedModule)
        and m.kind in ("linear", "conv")
        and getattr(m, "input_smooth", None) is None
    }
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def channel_sums(name: str, x: torch.Tensor) -> None:
        channel_dim = 1 if targets[name].kind == "conv" else -1
        rows = x.detach().float().movedim(channel_dim, -1)
        rows = rows.reshape(-1, rows.shape[-1])
        sums[name] = sums.get(name, 0) + rows.sum(dim=0)
        counts[name] = counts.get(name, 0) + rows.shape[0]

    modules = {name: float_model.get_submodule(name) for name in targets}
    _observe_inputs(float_model, modules, channel_sums, calibration, "bias correction", progress)
    applied = {}
    for name, qmodule in targets.items():
        if name not in sums:
            continue
        float_module = float_model.get_submodule(name)
        w = linear_weight(float_module) if qmodule.kind == "linear" else float_module.weight.detach()
        wq = qmodule.qweight.dequantize().reshape(w.shape)
        groups = float_module.groups if qmodule.kind == "conv" else 1
        shift = expected_output_shift(w, wq, sums[name] / counts[name], groups=groups)
        if qmodule.bias is None:
            qmodule.bias = nn.Parameter(torch.zeros_like(shift), requires_grad=False)
            if "bias" in getattr(qmodule, "config", {}):
                qmodule.config["bias"] = True
        with torch.no_grad():
            qmodule.bias += shift.to(qmodule.bias.dtype)
        applied[name] = float(shift.abs().max())
    return applied
