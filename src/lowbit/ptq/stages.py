"""Where the sequential pipeline cuts a model into stages, found from its structure.

Candidates, in order of preference:

1. ``recipe.sequential_targets``: the outermost modules whose name or class name matches;
2. repeated blocks: the largest ``ModuleList`` / ``Sequential`` whose children all have one class
   (a transformer's layers);
3. the top-level children, with every ``nn.Sequential`` among them opened into its children;
4. the whole model as one stage.

A candidate is used only if one probe forward pass (on the first calibration batch) shows that
its stages form a chain: each stage runs once, in some order, and reads the previous stage's
output (itself, or the first element of a tuple: the same object, checked with ``is``), with
every other argument (attention masks, position embeddings, flags) equal to the first stage's.
Then the cached output of stage ``i`` *is* the input of stage ``i + 1`` and no stage needs the
model to run from the start. The same probe records the order in which layers are first called
and finds the output head: the layer whose output tensor is the model's output, or a linear
layer that shares its weight with an embedding.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
>>> probe = probe_model(model, [], torch.randn(3, 4))
>>> probe.layout.mode, [name for name, _ in probe.layout.stages], probe.layout.slot
('children', ['0', '1', '2'], 0)
"""

from __future__ import annotations

import fnmatch
import inspect
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit.batches import call_args
from lowbit.ptq.plan import LayerPlan
from lowbit.zoo.base import Batch

Slot = int | str  # where the hidden state sits among a stage's inputs: argument index or keyword


@dataclass
class StageLayout:
    """The stages chosen: ``mode`` is ``targets``, ``blocks``, ``children`` or ``model``."""

    mode: str
    stages: list[tuple[str, nn.Module]]
    slot: Slot | None = None  # None with fewer than two stages


@dataclass
class Probe:
    """What one forward pass on the first calibration batch showed."""

    layout: StageLayout
    first_call: dict[str, int]  # layer name -> position of its first call among all hooked calls
    stage_first_call: list[int]  # the same for each stage of the layout
    head: list[str]  # output head layer names
    rejected: list[str] = field(default_factory=list)  # why other candidates were not used


def model_call(model: nn.Module, batch: Batch) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` to call ``model`` on ``batch`` (the zoo convention), with the key/value
    cache switched off where the model has one: every stage runs twice on the same inputs, and a
    cache would append to itself."""
    args, kwargs = call_args(model, batch)
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "use_cache" in params and "use_cache" not in kwargs:
        kwargs["use_cache"] = False
    return args, kwargs


def _outermost(found: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []
    for name, module in found:
        if not any(name.startswith(f"{kept}.") for kept, _ in out):
            out.append((name, module))
    return out


def _targets(model: nn.Module, patterns: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    found = [
        (name, m)
        for name, m in model.named_modules()
        if name and any(fnmatch.fnmatchcase(name, p) or type(m).__name__ == p for p in patterns)
    ]
    if not found:
        raise ValueError(
            f"sequential_targets {list(patterns)} match no module name or class name of the model; "
            "list the names with `lowbit inspect` (or leave sequential_targets empty)"
        )
    return _outermost(found)


def _repeated_blocks(model: nn.Module, layer_names: list[str]) -> list[tuple[str, nn.Module]]:
    """Children of the largest ModuleList / Sequential of one class that holds planned layers."""
    best: tuple[int, list[tuple[str, nn.Module]]] | None = None
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList | nn.Sequential):
            continue
        children = list(m.named_children())
        if len(children) < 2 or len({type(c) for _, c in children}) != 1:
            continue
        prefix = f"{name}." if name else ""
        if not any(n.startswith(prefix) for n in layer_names):
            continue
        size = sum(p.numel() for p in m.parameters())
        if best is None or size > best[0]:
            best = (size, [(f"{prefix}{child}", c) for child, c in children])
    return [] if best is None else best[1]


def _children(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Top-level children, every ``nn.Sequential`` opened (its children are a chain by definition)."""

    def expand(name: str, m: nn.Module) -> list[tuple[str, nn.Module]]:
        if isinstance(m, nn.Sequential):
            return [
                s for child, c in m.named_children() for s in expand(f"{name}.{child}" if name else child, c)
            ]
        return [(name, m)]

    if isinstance(model, nn.Sequential):
        return expand("", model)
    return [s for child, c in model.named_children() for s in expand(child, c)]


def candidates(model: nn.Module, targets: tuple[str, ...], layer_names: list[str]) -> list[StageLayout]:
    """Stage layouts to try, best first (the whole model is the implicit last resort)."""
    if targets:
        return [StageLayout("targets", _targets(model, targets))]
    out = []
    blocks = _repeated_blocks(model, layer_names)
    if blocks:
        out.append(StageLayout("blocks", blocks))
    children = _children(model)
    if children and [n for n, _ in children] != [n for n, _ in blocks]:
        out.append(StageLayout("children", children))
    return out


def expert_lists(stages: list[tuple[str, nn.Module]]) -> list[str]:
    """Mixture-of-experts blocks inside the stages: every ``ModuleList`` below a stage whose
    children (two or more) share one class. Which tokens reach each expert is the router's choice,
    so an expert may see none of the calibration data.

    >>> block = nn.Module()
    >>> block.experts = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
    >>> expert_lists([("layers.0", block)])
    ['layers.0.experts']
    """
    found = []
    for prefix, stage in stages:
        for name, m in stage.named_modules(prefix=prefix):
            if (
                name != prefix
                and isinstance(m, nn.ModuleList)
                and len(m) >= 2
                and len({type(c) for c in m}) == 1
            ):
                found.append(name)
    return found


def hidden_of(output: Any) -> torch.Tensor | None:
    """The tensor a stage passes on: its output, or the first element of a tuple / list."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a, b))
        )
    if isinstance(a, tuple | list) and type(a) is type(b):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, bool | int | float | str | type(None)) and type(a) is type(b):
        return a == b
    return False


def _find_slot(args: tuple[Any, ...], kwargs: dict[str, Any], x: torch.Tensor) -> Slot | None:
    for i, a in enumerate(args):
        if a is x:
            return i
    return next((k for k, v in kwargs.items() if v is x), None)


def _without(args: tuple[Any, ...], kwargs: dict[str, Any], slot: Slot) -> tuple[tuple[Any, ...], dict]:
    if isinstance(slot, int):
        return args[:slot] + (None,) + args[slot + 1 :], kwargs
    return args, {k: v for k, v in kwargs.items() if k != slot}


class _ChainCheck:
    """Watches one candidate layout during the probe pass (see the module docstring)."""

    def __init__(self, layout: StageLayout) -> None:
        self.layout = layout
        self.order: list[int] = []
        self.first: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self.hidden: torch.Tensor | None = None
        self.slot: Slot | None = None
        self.version = -1
        self.error: str | None = None

    def name(self, i: int) -> str:
        return self.layout.stages[i][0] or "the model"

    def pre(self, i: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.error:
            return
        if i in self.order:
            self.error = f"{self.name(i)} runs more than once per forward pass"
            return
        if self.order:
            previous = self.name(self.order[-1])
            slot = None if self.hidden is None else _find_slot(args, kwargs, self.hidden)
            if slot is None:
                self.error = f"{self.name(i)} does not read the output of {previous}"
                return
            assert self.first is not None and self.hidden is not None
            if self.hidden._version != self.version:
                self.error = f"the output of {previous} is changed in place before {self.name(i)} reads it"
                return
            if self.slot is None:
                self.slot = slot
                if not isinstance(_value_at(self.first, slot), torch.Tensor):
                    self.error = f"the first stage takes no tensor where {self.name(i)} takes its input"
                    return
            if slot != self.slot or not _same(_without(*self.first, slot), _without(args, kwargs, slot)):
                self.error = f"{self.name(i)} is called with other arguments than the first stage"
                return
        else:
            self.first = (args, kwargs)
        self.order.append(i)

    def post(self, output: Any) -> None:
        self.hidden = hidden_of(output)
        self.version = -1 if self.hidden is None else self.hidden._version  # in-place edits bump it


def _value_at(inputs: tuple[tuple[Any, ...], dict[str, Any]], slot: Slot) -> Any:
    args, kwargs = inputs
    if isinstance(slot, int):
        return args[slot] if slot < len(args) else None
    return kwargs.get(slot)


def _main_output(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        logits = out.get("logits")
        if isinstance(logits, torch.Tensor):
            return logits
        return next((v for v in out.values() if isinstance(v, torch.Tensor)), None)
    if isinstance(out, tuple | list):
        return next((v for v in out if isinstance(v, torch.Tensor)), None)
    return None


def probe_model(
    model: nn.Module, layers: list[LayerPlan], batch: Batch, targets: tuple[str, ...] = ()
) -> Probe:
    """Run ``model`` once on ``batch`` with hooks and choose the stage layout (module docstring)."""
    from lowbit.ptq.convert import model_device, to_device

    layouts = candidates(model, targets, [layer.name for layer in layers])
    checks = [_ChainCheck(layout) for layout in layouts]
    counter = [0]
    first_call: dict[str, int] = {}
    stage_first: dict[int, dict[int, int]] = {k: {} for k in range(len(checks))}
    outputs: dict[str, weakref.ref[torch.Tensor]] = {}
    handles = []

    def tick() -> int:
        counter[0] += 1
        return counter[0]

    for layer in layers:

        def layer_pre(_m: nn.Module, _args: Any, name: str = layer.name) -> None:
            first_call.setdefault(name, tick())

        def layer_post(_m: nn.Module, _args: Any, out: Any, name: str = layer.name) -> None:
            if isinstance(out, torch.Tensor):
                outputs[name] = weakref.ref(out)

        handles.append(layer.module.register_forward_pre_hook(layer_pre))
        handles.append(layer.module.register_forward_hook(layer_post))
    for k, check in enumerate(checks):
        for i, (_, stage) in enumerate(check.layout.stages):

            def stage_pre(_m: nn.Module, args: Any, kwargs: Any, k: int = k, i: int = i) -> None:
                stage_first[k].setdefault(i, tick())
                checks[k].pre(i, args, kwargs)

            def stage_post(_m: nn.Module, _args: Any, out: Any, k: int = k) -> None:
                checks[k].post(out)

            handles.append(stage.register_forward_pre_hook(stage_pre, with_kwargs=True))
            handles.append(stage.register_forward_hook(stage_post))
    try:
        args, kwargs = model_call(model, to_device(batch, model_device(model)))
        with torch.no_grad():
            out = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()

    main = _main_output(out)
    head = [name for name, ref in outputs.items() if main is not None and ref() is main]
    embedding_weights = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    for layer in layers:
        w = getattr(layer.module, "weight", None)
        if layer.kind == "linear" and layer.name not in head and any(w is e for e in embedding_weights):
            head.append(layer.name)  # tied to the embedding: it is the output projection

    rejected = []
    for k, check in enumerate(checks):
        if check.error is None and check.order:
            ordered = [check.layout.stages[i] for i in check.order]
            layout = StageLayout(check.layout.mode, ordered, check.slot if len(ordered) > 1 else None)
            firsts = [stage_first[k][i] for i in check.order]
            return Probe(layout, first_call, firsts, head, rejected)
        why = check.error or "no stage ran"
        if check.layout.mode == "targets":
            raise ValueError(
                f"sequential_targets cannot be calibrated one after another: {why}; choose "
                "modules that pass their output straight to the next one (or leave it empty)"
            )
        rejected.append(f"{check.layout.mode}: {why}")
    return Probe(StageLayout("model", []), first_call, [], head, rejected)
