"""First and last layers at 8 bits when the rest is binary / ternary (XNOR-Net, TWN, DoReFa and
LSQ all do this): the first layer sees raw inputs through few channels and the last one decides the
classes, so their few weights cost little at 8 bits and much at 1-2.

The layers are first / last in the order the forward calls them (a ``torch.fx`` trace), else
in the order the model registers them.

>>> from torch import nn
>>> from lowbit.qat.core import recipe
>>> from lowbit.ptq.plan import plan_model
>>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
>>> r, names = keep_edges(m, recipe("binary"))
>>> names, [p.weight.format for p in plan_model(m, r).layers]
(['0', '3'], ['int8', 'binary', 'int8'])
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lowbit import formats
from lowbit.ptq.plan import plan_model
from lowbit.recipes.spec import LayerRule, Recipe, WeightSpec

# At most this many values counts as "low-bit" (binary, ternary): the defaults the binary /
# ternary literature uses apply to them. int2 (4 values) keeps the integer defaults; pass
# keep_edges / clip_latent / batchnorm="train" to prepare to get them there.
LOW_BIT_LEVELS = 3
EDGE_WEIGHT = WeightSpec(format="int8", granularity="channel", symmetric=True)


def is_low_bit(spec: WeightSpec | None) -> bool:
    """Whether ``spec``'s format has ``LOW_BIT_LEVELS`` values or fewer (binary, ternary).

    >>> is_low_bit(WeightSpec(format="ternary")), is_low_bit(WeightSpec(format="int2"))
    (True, False)
    """
    if spec is None:
        return False
    fmt = formats.get(spec.format)
    # A plain grid lists every value; a sign-magnitude one (minifloats) lists magnitudes only.
    values = len(fmt.grid) if fmt.family == "grid" and not fmt.sign_magnitude else fmt.levels
    return values <= LOW_BIT_LEVELS


def _call_order(model: nn.Module) -> list[str] | None:
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # any Python the tracer cannot follow: registration order instead
        return None
    return [str(node.target) for node in graph.nodes if node.op == "call_module"]


def keep_edges(model: nn.Module, recipe: Recipe) -> tuple[Recipe, list[str]]:
    """``recipe`` with the first and last low-bit layers of ``model`` at int8 weights (an override
    per layer, so the artifact's recipe says so), and their names (empty: nothing changed)."""
    low = [p.name for p in plan_model(model, recipe).layers if is_low_bit(p.weight)]
    if not low:
        return recipe, []
    order = _call_order(model)
    if order is not None:
        called = [name for name in order if name in low]
        low = called or low  # layers the trace sees as calls; else (all hidden) registration order
    edges = list(dict.fromkeys([low[0], low[-1]]))
    rules = tuple(LayerRule(name, weight=EDGE_WEIGHT) for name in edges)
    return dataclasses.replace(recipe, overrides=recipe.overrides + rules), edges
