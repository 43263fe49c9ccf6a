"""Each layer's dynamic activation form, chosen from calibration measurements (``activation_plan: measured``).

Per-tensor dynamic activations are the fastest integer path (one scale per call: ONNX Runtime's
``DynamicQuantizeMatMul``, one quantization shared by every layer reading the input), but one
outlier channel spends the whole int8 range; per-token scales are robust and slower. SmoothQuant
(divide input channels by ``s``, multiply weight columns by ``s``) makes per-tensor work for most
linear layers, not for all: which ones is a property of the model's data, so it is measured, not
guessed from layer names.

For every group of linear layers that read one input tensor (q / k / v; gate / up), on the first
calibration batches (``PLAN_BATCHES``), lowbit measures each layer's relative output error
``|x W^T - Q(x) Q(W)^T| / |x W^T|`` for two forms:

- ``tensor``: the input divided by SmoothQuant's scales (``alpha``), quantized per tensor in the
  recipe's activation format; the weight multiplied by the scales, quantized as the recipe says;
- ``token``: the recipe's own (per-token) activation spec, unsmoothed.

The group takes the per-tensor form when every member's error is at most ``TOLERANCE`` times its
per-token error; otherwise it keeps per-token, unsmoothed. The outcome is an ordinary recipe (one
override per per-tensor layer, ``smoothquant_alpha`` and ``smoothquant_exclude`` set), so it is
stored in the artifact's manifest and printed as a table.

On the pretrained MiniLM this picks per-tensor for q / k / v, the attention output and the FFN
input projections and per-token for five of the six FFN output projections (the layers reading GELU
outputs), which is what the hand-tuned encoder recipe of issue 5 did by a name pattern.

>>> import torch
>>> from torch import nn
>>> from lowbit.recipes import resolve
>>> torch.manual_seed(0) and None
>>> model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)).eval()
>>> plan = measure_activation_plan(model, resolve("int8-dynamic"), [torch.randn(32, 16)])
>>> sorted(c.form for c in plan.choices)
['tensor', 'tensor']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit import formats
from lowbit.algorithms.rtn import choose_weight_qparams
from lowbit.algorithms.smoothquant import smoothquant_scales
from lowbit.batches import call_model, run_with_pre_hooks
from lowbit.granularity import PerToken, parse
from lowbit.nn.activation import ActivationQuantizer
from lowbit.primitives import dequantize, quantize
from lowbit.ptq.matrices import Matrix, read
from lowbit.ptq.plan import LayerPlan, plan_model
from lowbit.recipes.spec import LayerRule, Recipe

PLAN_BATCHES = 4  # calibration batches measured (two passes each: input maxima, then errors)
TOLERANCE = 1.5  # per-tensor is taken when its output error is at most this times per-token's
DEFAULT_ALPHA = 0.7  # SmoothQuant strength when the recipe sets none (measured on MiniLM, issue 5)
MAX_ROWS = 1024  # input rows per layer and batch used for the error (the maxima use every row)


@dataclass
class LayerChoice:
    """One layer's measured errors (relative output error) and the form it gets."""

    name: str
    group: int
    tensor_error: float
    token_error: float
    form: str = "token"


@dataclass
class ActivationPlan:
    """The measured choice for every candidate layer (``q.lowbit_activation_plan``)."""

    alpha: float
    choices: list[LayerChoice] = field(default_factory=list)

    def per_tensor(self) -> list[str]:
        return [c.name for c in self.choices if c.form == "tensor"]

    def per_token(self) -> list[str]:
        return [c.name for c in self.choices if c.form == "token"]

    def summary(self) -> str:
        return (
            f"activations measured per layer: {len(self.per_tensor())} per tensor (SmoothQuant "
            f"alpha {self.alpha}), {len(self.per_token())} per token"
        )

    def table(self) -> str:
        """Markdown table of the measurements (what ``quantize`` prints with ``progress``)."""
        lines = ["| layer | per-tensor error | per-token error | ratio | form |", "|---|---|---|---|---|"]
        for c in self.choices:
            ratio = c.tensor_error / c.token_error if c.token_error > 0 else float("inf")
            lines.append(
                f"| {c.name} | {c.tensor_error:.4f} | {c.token_error:.4f} | {ratio:.2f} | {c.form} |"
            )
        return "\n".join(lines)


def candidates(model: nn.Module, recipe: Recipe) -> list[LayerPlan]:
    """Linear layers whose recipe activation is dynamic and per token (the ones a plan can speed up)."""
    out = []
    for layer in plan_model(model, recipe).layers:
        act = layer.activation
        if layer.kind == "linear" and act.mode == "dynamic" and isinstance(parse(act.granularity), PerToken):
            out.append(layer)
    return out


def _exact(name: str) -> str:
    """An fnmatch pattern matching exactly ``name``."""
    return "".join(f"[{c}]" if c in "[]*?" else c for c in name)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1, x.shape[-1]).float()


def _input_groups(
    model: nn.Module, layers: list[LayerPlan], batches: Sequence[Any]
) -> tuple[list[list[int]], dict[int, torch.Tensor]]:
    """Groups of layers reading the very same input tensor in a call (by index) and every layer's
    per-channel ``max |x|`` over all rows of ``batches``."""
    absmax: dict[int, torch.Tensor] = {}
    parent = list(range(len(layers)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    seen: dict[int, tuple[torch.Tensor, int]] = {}  # id(input) -> (input kept alive, first reader)

    def hook(i: int):
        def pre(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0]
            m = _rows(x).abs().amax(0)
            absmax[i] = m if i not in absmax else torch.maximum(absmax[i], m)
            if id(x) in seen and seen[id(x)][0] is x:
                parent[root(i)] = root(seen[id(x)][1])
            else:
                seen[id(x)] = (x, i)

        return pre

    handles = [layer.module.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for batch in batches:
                seen.clear()
                call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
        seen.clear()
    groups: dict[int, list[int]] = {}
    for i in range(len(layers)):
        if i in absmax:
            groups.setdefault(root(i), []).append(i)
    return list(groups.values()), absmax


def _quantized_weight(layer: LayerPlan, w: torch.Tensor) -> torch.Tensor:
    """``w`` ``[out, in]`` after round to nearest in the layer's weight spec (float32)."""
    spec = layer.weight
    if spec is None:
        return w
    fmt = formats.get(spec.format)
    qp = choose_weight_qparams(
        w, fmt, parse(spec.granularity), symmetric=bool(spec.symmetric), algorithm="rtn"
    )
    return dequantize(quantize(w, fmt, qp), fmt, qp)


def measure_activation_plan(
    model: nn.Module, recipe: Recipe, calibration: Sequence[Any], alpha: float | None = None
) -> ActivationPlan:
    """Measure per-tensor (smoothed) against per-token activations for every candidate layer.

    ``model`` is the float model (it is only run, never changed); ``calibration`` its batches.
    See the module docstring for what is measured and how the form is chosen.
    """
    alpha = recipe.smoothquant_alpha if alpha is None else alpha
    alpha = DEFAULT_ALPHA if alpha is None else alpha
    layers = candidates(model, recipe)
    plan = ActivationPlan(alpha)
    if not layers:
        return plan
    batches = list(calibration)[:PLAN_BATCHES]
    groups, absmax = _input_groups(model, layers, batches)

    # No weight copies are kept (a large model would need three): each is read, quantized both
    # ways and dropped inside the hook; only the per-channel scales stay.
    def weight(i: int) -> torch.Tensor:
        return read(layers[i], Matrix("weight", "x"))

    scales: dict[int, torch.Tensor] = {}
    for g in groups:
        s = smoothquant_scales(absmax[g[0]], [weight(i) for i in g], alpha)
        for i in g:
            scales[i] = s
    sums = {i: [0.0, 0.0, 0.0] for i in scales}  # tensor error², token error², reference²
    token_q = {i: ActivationQuantizer(layers[i].activation) for i in scales}
    tensor_q = {
        i: ActivationQuantizer(dataclasses.replace(layers[i].activation, granularity="tensor"))
        for i in scales
    }

    def hook(i: int):
        def pre(module: nn.Module, args: tuple[Any, ...]) -> None:
            if i not in sums or not args or not isinstance(args[0], torch.Tensor):
                return
            w = weight(i)
            x = _rows(args[0])[:MAX_ROWS].to(w.device)
            ref = x @ w.T
            s = scales[i].to(w.device)
            by_tensor = tensor_q[i](x / s) @ _quantized_weight(layers[i], w * s).T
            by_token = token_q[i](x) @ _quantized_weight(layers[i], w).T
            sums[i][0] += float((by_tensor - ref).pow(2).sum())
            sums[i][1] += float((by_token - ref).pow(2).sum())
            sums[i][2] += float(ref.pow(2).sum())

        return pre

    run_with_pre_hooks(model, batches, {layer.module: hook(i) for i, layer in enumerate(layers)})
    for gi, g in enumerate(groups):
        members = []
        for i in g:
            t, k, r = sums[i]
            r = max(r, torch.finfo(torch.float32).tiny)
            members.append(LayerChoice(layers[i].name, gi, (t / r) ** 0.5, (k / r) ** 0.5))
        if all(c.tensor_error <= TOLERANCE * c.token_error for c in members):
            for c in members:
                c.form = "tensor"
        plan.choices.extend(members)
    order = {layer.name: n for n, layer in enumerate(layers)}
    plan.choices.sort(key=lambda c: order[c.name])
    return plan


def apply_activation_plan(model: nn.Module, recipe: Recipe, plan: ActivationPlan) -> Recipe:
    """``recipe`` made concrete: per-tensor overrides for the chosen layers, SmoothQuant on them only.

    Every other linear layer with quantized activations is left unsmoothed (in
    ``smoothquant_exclude``). The result has ``activation_plan: fixed`` (it *is* the plan), so
    quantizing with it again, or with the recipe stored in an artifact, repeats these choices.
    """
    fixed = dataclasses.replace(
        recipe, activation_plan="fixed", description=f"{recipe.description}; {plan.summary()}"
    )
    chosen = plan.per_tensor()
    if not chosen:
        return fixed
    rules = []
    for name in chosen:
        specs = recipe.specs_for(name)
        assert specs is not None  # a candidate is selected by the recipe
        rules.append(
            LayerRule(pattern=_exact(name), activation=dataclasses.replace(specs[1], granularity="tensor"))
        )
    keep = set(chosen)
    others = tuple(
        _exact(layer.name)
        for layer in plan_model(model, recipe).layers
        if layer.kind == "linear" and layer.activation.enabled and layer.name not in keep
    )
    return dataclasses.replace(
        fixed,
        overrides=recipe.overrides + tuple(rules),
        smoothquant_alpha=plan.alpha,
        smoothquant_exclude=recipe.smoothquant_exclude + others,
    )


__all__ = [
    "DEFAULT_ALPHA",
    "PLAN_BATCHES",
    "TOLERANCE",
    "ActivationPlan",
    "LayerChoice",
    "apply_activation_plan",
    "candidates",
    "measure_activation_plan",
]
