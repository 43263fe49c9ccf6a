"""Which layers a recipe quantizes, and how: one ``LayerPlan`` per selected module.

Planning never changes the model. It also collects what the user must hear about: layers with
weights that lowbit cannot quantize (kept float), and include / exclude patterns that matched no
module (a typo would otherwise silently quantize everything, or nothing).

>>> import torch
>>> from lowbit.recipes import get
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
>>> [(p.name, p.kind) for p in plan_model(model, get("int8-dynamic")).layers]
[('0', 'linear'), ('2', 'linear')]
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from torch import nn

from lowbit import formats
from lowbit.nn.layers import is_hf_conv1d
from lowbit.recipes.spec import ActivationSpec, Recipe, WeightSpec

# Parameter-free or normalisation layers are kept float on purpose: they are tiny and precision-critical.
_FLOAT_BY_DESIGN = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.PReLU,
)


@dataclass
class LayerPlan:
    """One module to quantize."""

    name: str
    module: nn.Module
    kind: str
    weight: WeightSpec | None
    activation: ActivationSpec


@dataclass
class Plan:
    """The selected layers, plus what was left out and why."""

    layers: list[LayerPlan] = field(default_factory=list)
    unsupported: list[tuple[str, str]] = field(default_factory=list)  # (name, reason): kept float
    unmatched_patterns: list[str] = field(default_factory=list)

    def warnings(self) -> list[str]:
        """Human-readable warnings (empty when there is nothing to say)."""
        out = []
        if self.unsupported:
            listed = "; ".join(f"{n} ({why})" for n, why in self.unsupported[:12])
            more = f" and {len(self.unsupported) - 12} more" if len(self.unsupported) > 12 else ""
            out.append(f"{len(self.unsupported)} layer(s) with weights kept in float: {listed}{more}")
        for pattern in self.unmatched_patterns:
            out.append(
                f"recipe pattern {pattern!r} matches no module; check the layer names (lowbit inspect)"
            )
        return out


def module_kind(module: nn.Module) -> str | None:
    """``linear`` / ``conv`` / ``embedding`` / ``rnn`` for supported layers, else ``None``."""
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return "conv"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.LSTM, nn.GRU)):
        return "rnn"
    return None


_BASES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.LSTM, nn.GRU)


def custom_forward(module: nn.Module) -> str | None:
    """Why a subclass of a supported layer is kept float: it overrides ``forward`` (``None``: it does not).

    A quantized layer runs the base class's computation; a subclass with its own forward (a
    positional embedding that slices its table, a LoRA linear) would silently compute something else.

    >>> class Positions(nn.Embedding):
    ...     def forward(self, ids):
    ...         return self.weight[: ids.shape[1]]
    >>> custom_forward(Positions(8, 4))
    'Positions overrides nn.Embedding.forward'
    >>> custom_forward(nn.Embedding(8, 4)) is None
    True
    """
    base = next((b for b in _BASES if isinstance(module, b)), None)
    if base is None or type(module).forward is base.forward:
        return None
    return f"{type(module).__name__} overrides nn.{base.__name__}.forward"


def _unsupported_reason(module: nn.Module) -> str | None:
    """Why a module with its own weights cannot be quantized (``None``: nothing to report)."""
    own = [p for _, p in module.named_parameters(recurse=False) if p.dim() >= 2]
    if not own or isinstance(module, _FLOAT_BY_DESIGN):
        return None
    return f"{type(module).__name__} is not supported"


# Weight rows shorter than this keep int8 under ``short_rows: int8`` (see ``Recipe``).
SHORT_ROW = 16
SHORT_ROW_INT8 = WeightSpec(format="int8", granularity="channel", symmetric=True, algorithm="rtn")


def row_length(module: nn.Module) -> int:
    """Values per output row of a linear / conv weight (the length of each dot product).

    >>> row_length(nn.Conv2d(8, 8, 3, groups=8)), row_length(nn.Linear(64, 2))
    (9, 64)
    """
    if is_hf_conv1d(module):
        return int(module.weight.shape[0])  # HF Conv1D stores [in, out]
    return int(module.weight[0].numel())


def short_row_weight(module: nn.Module, weight: WeightSpec) -> WeightSpec:
    """``SHORT_ROW_INT8`` for a layer with rows shorter than ``SHORT_ROW`` under a weight format
    below 8 bits, else ``weight`` unchanged."""
    if formats.get(weight.format).bits < 8 and row_length(module) < SHORT_ROW:
        return SHORT_ROW_INT8
    return weight


def plan_model(model: nn.Module, recipe: Recipe) -> Plan:
    """Select the modules ``recipe`` quantizes (see the module docstring)."""
    plan = Plan()
    names = [name for name, _ in model.named_modules() if name]
    for kind_patterns in (recipe.include, recipe.exclude):
        for pattern in kind_patterns:
            if pattern != "*" and not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                plan.unmatched_patterns.append(pattern)
    for rule in recipe.overrides:
        if not any(rule.matches(n) for n in names):
            plan.unmatched_patterns.append(rule.pattern)

    inside_attention: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            # MultiheadAttention reads out_proj.weight directly in its fused kernel: replacing the
            # submodule would silently bypass quantization, so the whole block stays float.
            inside_attention.update(n for n, _ in module.named_modules(prefix=name))
            plan.unsupported.append((name, "nn.MultiheadAttention uses its weights in a fused kernel"))
    for name, module in model.named_modules():
        if not name or name in inside_attention:
            continue
        kind = module_kind(module)
        if kind is None:
            reason = _unsupported_reason(module)
            if reason and recipe.specs_for(name) is not None:
                plan.unsupported.append((name, reason))
            continue
        if kind not in recipe.modules:
            continue
        specs = recipe.specs_for(name)
        if specs is None:
            continue
        custom = custom_forward(module)
        if custom is not None:
            plan.unsupported.append((name, f"{custom}; quantizing it would change what it computes"))
            continue
        weight, activation = specs
        if weight is not None and recipe.short_rows == "int8" and kind in ("linear", "conv"):
            weight = short_row_weight(module, weight)
        if kind == "conv" and getattr(module, "padding_mode", "zeros") != "zeros":
            plan.unsupported.append((name, f"padding_mode={module.padding_mode!r}"))
            continue
        if kind == "embedding" and (module.max_norm is not None or module.sparse):
            plan.unsupported.append((name, "Embedding with max_norm or sparse gradients"))
            continue
        if weight is None:
            continue  # weights stay float: nothing to store, and activation-only needs no module swap
        plan.layers.append(LayerPlan(name, module, kind, weight, activation))
    return plan
