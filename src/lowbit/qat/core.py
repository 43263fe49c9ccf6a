"""Quantization-aware training: ``prepare`` -> train with any loop -> ``convert``.

``prepare(model, recipe)`` swaps every layer the recipe selects for a QAT layer (float weights,
fake-quantized weight and input); train it like the float model; ``convert(model)`` returns the same
packed quantized model ``lowbit.quantize`` would build (``QuantizedLinear`` ... with frozen input
ranges), so ``lowbit.save`` / ``load`` / export work unchanged. The converted model's output equals the
QAT model's eval-mode output exactly.

Calling ``calibrate(model, batches)`` before training initialises the activation ranges (and the
weight scales are initialised by ``prepare``) exactly as ``lowbit.quantize`` chooses them for the
same recipe, so training starts from the same-recipe PTQ model, output for output.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
>>> qat_model = prepare(model, recipe(4))
>>> opt = torch.optim.SGD(qat_model.parameters(), lr=0.1)
>>> for _ in range(3):
...     loss = qat_model(torch.randn(16, 8)).pow(2).mean()
...     opt.zero_grad(); loss.backward(); opt.step()
>>> q = convert(qat_model)
>>> x = torch.randn(4, 8)
>>> type(q[0]).__name__, torch.equal(q(x), qat_model.eval()(x))
('QuantizedLinear', True)
"""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lowbit.modelcheck import require_module
from lowbit.nn.layers import QuantizedRNN
from lowbit.ptq.convert import model_device, set_submodule, to_device
from lowbit.ptq.convert import prepare as ptq_prepare
from lowbit.ptq.plan import plan_model
from lowbit.qat.batchnorm import MODES as BN_MODES
from lowbit.qat.batchnorm import BatchNormMode, prepare_batchnorm, reestimate_batchnorm, restore_batchnorm
from lowbit.qat.edges import is_low_bit
from lowbit.qat.edges import keep_edges as _keep_edges
from lowbit.qat.fake_quant import ActFakeQuant, WeightFakeQuant
from lowbit.qat.modules import QAT_CLASSES, QATModule
from lowbit.recipes import resolve
from lowbit.recipes.spec import ActivationSpec, Recipe, WeightSpec
from lowbit.zoo.base import call_model


def recipe(bits: int | str = 4, activation_bits: int | None | str = "same") -> Recipe:
    """A QAT recipe: ``intN`` symmetric weights per output channel (MSE-initialised scale) and
    static ``uintN`` asymmetric activations per tensor (zero point: right for post-ReLU inputs).

    ``bits`` is 2..8, or a weight format name such as ``"binary"`` / ``"ternary"`` (then activations
    default to 8 bits). ``activation_bits=None`` keeps activations float (weight-only QAT).

    >>> r = recipe(2)
    >>> r.weight.format, r.activation.format, r.activation.mode
    ('int2', 'uint2', 'static')
    >>> recipe("ternary").activation.format
    'uint8'
    """
    if isinstance(bits, str):
        weight = WeightSpec(format=bits, granularity="channel")
        act_bits: int | None = 8 if activation_bits == "same" else activation_bits  # type: ignore[assignment]
        name = f"qat-{bits}"
    else:
        if not 2 <= bits <= 8:
            raise ValueError(
                f"QAT integer recipes have 2..8 bits, got {bits}; use 'binary' or 'ternary' below 2"
            )
        weight = WeightSpec(format=f"int{bits}", granularity="channel", symmetric=True, algorithm="mse")
        act_bits = bits if activation_bits == "same" else activation_bits  # type: ignore[assignment]
        name = f"qat-w{bits}"
    if act_bits is None:
        activation = ActivationSpec()
        name += "-weight-only"
    else:
        if not isinstance(act_bits, int) or not 2 <= act_bits <= 8:
            raise ValueError(f"activation_bits must be 2..8 or None, got {act_bits!r}")
        activation = ActivationSpec(
            mode="static",
            format=f"uint{act_bits}",
            granularity="tensor",
            symmetric=False,
            observer="minmax" if act_bits == 8 else "mse",  # low widths need clipped ranges
        )
        name += f"a{act_bits}"
    act_text = activation.format if activation.enabled else "float"
    return Recipe(
        name=name,
        description=f"quantization-aware training: {weight.format} weights, {act_text} activations",
        weight=weight,
        activation=activation,
    )


def prepare(
    model: nn.Module,
    recipe: str | Recipe | dict[str, Any],
    lsq: bool = False,
    inplace: bool = False,
    *,
    batchnorm: BatchNormMode = "auto",
    keep_edges: bool | None = None,
    clip_latent: bool | None = None,
    example: Any = None,
    progress: bool = True,
) -> nn.Module:
    """Insert fake quantization into every layer ``recipe`` selects (see the module docstring).

    ``lsq=True`` learns the weight scales (one per output channel for ``channel`` weights) and the
    activation scales with LSQ; otherwise scales follow the weights and activation ranges an EMA (STE).
    The returned model trains with any optimizer / loop.

    ``batchnorm`` says what happens to BatchNorm layers (``lowbit.qat.batchnorm``): ``"fold"`` them
    into the conv / linear layer before them, wherever they sit (the rest frozen), ``"freeze"`` their
    statistics, or let them ``"train"``; ``"auto"`` folds when their statistics were trained (a
    fine-tune) and trains them otherwise (from scratch, or binary / ternary weights, which the
    BatchNorm rescales per channel as in XNOR-Net; re-estimate them with ``convert(model,
    reestimate=batches)``). ``example`` (an input batch) finds the pairs in models ``torch.fx``
    cannot trace. What was folded is ``model.lowbit_folded``, kept by ``convert`` so the artifact
    loads into the unfolded model.

    ``keep_edges`` keeps the first and last layers at int8 weights (``lowbit.qat.edges``);
    ``clip_latent`` clamps the float (latent) weights, in training mode, to 3x their row's mean
    |w| (as BinaryConnect clips them to [-1, 1]); ``None`` (both): on for binary / ternary weights.
    ``progress`` prints every choice.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    >>> _ = net.train()(torch.randn(8, 1, 6, 6))  # trained statistics: "auto" folds
    >>> prepare(net, recipe(8), progress=False).lowbit_folded
    {'1': '0'}
    """
    require_module(model, "qat.prepare")
    recipe = resolve(recipe)
    if recipe.smoothquant_alpha is not None or recipe.bias_correction:
        raise ValueError(
            f"recipe {recipe.name!r} uses smoothquant_alpha / bias_correction, which are post-training "
            "corrections; QAT learns them away: drop them from the recipe"
        )
    if batchnorm not in BN_MODES:
        raise ValueError(f"batchnorm must be one of {', '.join(BN_MODES)}; got {batchnorm!r}")
    if not inplace:
        model = copy.deepcopy(model)
    if any(isinstance(m, QATModule) for m in model.modules()):
        raise ValueError("the model already contains QAT layers; call lowbit.qat.convert(model) first")
    # Folded before planning: the layers QAT trains are the folded ones, with their new biases.
    low_bit = is_low_bit(recipe.weight)
    folded, note = prepare_batchnorm(model, batchnorm, example, low_bit=low_bit)
    notes = [note] if note else []
    if keep_edges or (keep_edges is None and low_bit):
        recipe, edges = _keep_edges(model, recipe)
        if edges:
            notes.append(
                f"first and last layers {', '.join(edges)} keep int8 weights (low-bit practice; "
                "keep_edges=False quantizes them too)"
            )
    clip = bool(clip_latent) if clip_latent is not None else low_bit
    if clip:
        notes.append("latent weights clipped to 3x their row's mean |w| (clip_latent=False: not)")
    if progress:
        for line in notes:
            print(f"lowbit: qat: {line}", file=sys.stderr)
    plan = plan_model(model, recipe)
    if not plan.layers:
        raise ValueError(f"recipe {recipe.name!r} selects no layer of this model; nothing to train")
    for message in plan.warnings():
        warnings.warn(f"lowbit: {message}", stacklevel=2)
    for layer in plan.layers:
        assert layer.weight is not None
        qlayer = QAT_CLASSES[layer.kind](layer.module, layer.weight, layer.activation, lsq, layer.name)
        for fq in qlayer.modules():
            if isinstance(fq, WeightFakeQuant):
                fq.clip_latent = clip
        set_submodule(model, layer.name, qlayer)
    model.lowbit_recipe = recipe
    model.lowbit_qat_lsq = lsq
    if folded:
        model.lowbit_folded = {**getattr(model, "lowbit_folded", {}), **folded}
    return model


def qat_layers(model: nn.Module) -> dict[str, QATModule]:
    """Every QAT layer of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QATModule)}


def calibrate(model: nn.Module, batches: Iterable[Any]) -> None:
    """Initialise the static activation ranges from ``batches`` the way ``lowbit.quantize`` calibrates:
    each input is observed unquantized by the recipe's observer (``mse``: histogram, MSE-optimal
    clip) over all batches, and that range becomes the start of the EMA (STE) or the initial learned
    scale and zero point (LSQ). Weights are fake-quantized as in PTQ, so before any training the QAT
    model computes what the same-recipe PTQ model computes. The rest of the model runs in eval mode
    (BatchNorm statistics and dropout untouched)."""
    quantizers = [m for m in model.modules() if isinstance(m, ActFakeQuant)]
    was_training = model.training
    device = model_device(model)
    count = 0
    model.eval()
    for q in quantizers:
        q.begin_calibration()
    try:
        with torch.no_grad():
            for batch in batches:
                call_model(model, to_device(batch, device))
                count += 1
    finally:
        model.train(was_training)
        if count:
            for q in quantizers:
                q.end_calibration()
        else:
            for q in quantizers:
                q.observer = None
    if count == 0:
        raise ValueError("calibrate needs at least one input batch")


def freeze_observers(model: nn.Module, frozen: bool = True) -> None:
    """Stop (or resume) updating the EMA activation ranges while training continues.

    Freezing for the last epoch lets the weights adapt to the ranges the converted model will use.
    """
    for m in model.modules():
        if isinstance(m, ActFakeQuant):
            m.observe = not frozen


def convert(model: nn.Module, reestimate: Iterable[Any] | None = None, *, progress: bool = True) -> nn.Module:
    """The packed quantized model for a trained QAT model (a new model; ``model`` is unchanged).

    Layers become ``QuantizedLinear`` / ``QuantizedConv`` / ``QuantizedEmbedding`` / ``QuantizedRNN``
    with the codes and scales the fake-quantizers used, and static input ranges frozen. Returned in
    eval mode, with ``lowbit_recipe`` set, ready for ``lowbit.save``; each layer runs the fastest
    accurate kernel of this machine (``lowbit.backends.use_kernels``, choices in ``lowbit_kernels``).

    ``reestimate`` (input batches, e.g. the calibration data) recomputes the statistics of every
    BatchNorm left in the converted model (``reestimate_batchnorm``), for those that trained
    (``batchnorm="train"``): their running averages lag the weights, which move most at 1-2 bits.
    The output then differs from the QAT model's; without it, it is the same.
    """
    layers = qat_layers(model)
    if not layers:
        raise ValueError("the model has no QAT layers; build it with lowbit.qat.prepare(model, recipe)")
    recipe = getattr(model, "lowbit_recipe", None)
    if not isinstance(recipe, Recipe):
        raise ValueError("the model has no lowbit_recipe; build it with lowbit.qat.prepare(model, recipe)")
    weights: dict[str, dict[str, Any]] = {name: layer.quantized_weights() for name, layer in layers.items()}
    ranges = {
        name: layer.input_quant.frozen()
        for name, layer in layers.items()
        if layer.input_quant is not None and layer.input_quant.spec.mode == "static"
    }
    float_model = copy.deepcopy(model)
    restore_batchnorm(float_model)  # frozen BatchNorms are plain ones again in the deployed model
    for name, layer in layers.items():
        set_submodule(float_model, name, layer.to_float())
    single = {name: w["qweight"] for name, w in weights.items() if "qweight" in w}
    qmodel = ptq_prepare(float_model, recipe, inplace=True, weights=single, warn=False)
    for name in layers:
        qlayer = qmodel.get_submodule(name)
        if isinstance(qlayer, QuantizedRNN):
            # QuantizedRNN.from_float re-quantizes its matrices itself: put the QAT codes in place.
            for path, qw in weights[name].items():
                qlayer.weights[path.split(".", 1)[1]] = qw
        if name in ranges:
            if qlayer.input_quant is None:
                raise ValueError(f"layer {name}: the recipe changed between prepare and convert")
            qlayer.input_quant.set_qparams(*ranges[name])
    for attr in ("lowbit_qat_lsq",):
        if hasattr(qmodel, attr):
            delattr(qmodel, attr)
    if reestimate is not None:
        count = reestimate_batchnorm(qmodel, reestimate)
        if progress and count:
            print(f"lowbit: qat: BatchNorm statistics of {count} layers re-estimated", file=sys.stderr)
    from lowbit.backends import use_kernels  # the backends import the layers built here

    use_kernels(qmodel)
    return qmodel.eval()
