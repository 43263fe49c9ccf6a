"""Judging candidate weights at the output of the module that encloses a layer group (AWQ).

AWQ's paper and AutoAWQ search the scale shared by layers that read one input (q / k / v, gate /
up) by the error at the output of the module around them (the attention, the MLP), not at each
linear layer's output: what matters is what the attention or the MLP computes from the
quantized projections. The enclosing module is found from structure: the smallest common
ancestor of the group's layers inside the stage (``enclosing``; never layer names).

The pipeline records that module's inputs on a few calibration batches of the stage
(``record``), and ``ModuleJudge.error`` then reruns only that module with candidate weights in
place of the group's float ones, against its output with the float weights at the time of the
search (so layers of the module quantized earlier in the stage are not counted as the group's
error). Everything runs on one thread: the choice must not depend on thread count.

>>> import torch
>>> from torch import nn
>>> from lowbit.ptq.matrices import matrices
>>> from lowbit.ptq.plan import plan_model
>>> from lowbit.recipes import Recipe
>>> mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
>>> stage = nn.Sequential(mlp)
>>> enclosing("", stage, ["0.0", "0.2"])[0]
'0'
>>> layers = {p.name: p for p in plan_model(stage, Recipe()).layers}
>>> judge = ModuleJudge("0", mlp)
>>> record(stage, [((torch.randn(3, 4),), {})], [judge])
>>> m = matrices(layers["0.0"])[0]
>>> judge.error([(layers["0.0"], m, torch.zeros(8, 4))]) > 0, judge.error([])
(True, 0.0)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lowbit.ptq.matrices import Matrix, read, write
from lowbit.ptq.plan import LayerPlan
from lowbit.ptq.stages import hidden_of
from lowbit.threads import single_thread


def enclosing(stage_name: str, stage: nn.Module, layer_names: Sequence[str]) -> tuple[str, nn.Module]:
    """``(name, module)`` of the smallest module inside ``stage`` that contains every layer in
    ``layer_names`` (qualified names from the model root; ``stage_name`` is the stage's own)."""
    prefix = f"{stage_name}." if stage_name else ""
    parts = [name.removeprefix(prefix).split(".") for name in layer_names]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if any(p != level[0] for p in level):
            break
        common.append(level[0])
    relative = ".".join(common)
    module = stage.get_submodule(relative) if relative else stage
    return prefix + relative if relative else stage_name, module


def judged_module(
    search: str, stage_name: str, stage: nn.Module, layer_names: Sequence[str]
) -> tuple[str, nn.Module] | None:
    """Where AWQ (``AWQOptions.search``) judges a group's candidate scales: ``None`` where that
    is each layer's own output (computed exactly from the input statistics, on every row)."""
    if search == "layer":
        return None
    if search == "stage":
        return stage_name, stage
    name, module = enclosing(stage_name, stage, layer_names)
    if len(layer_names) == 1 and name == layer_names[0]:
        if search == "module":
            return None
        prefix = f"{stage_name}." if stage_name else ""
        parent = name.removeprefix(prefix).rpartition(".")[0]
        return (prefix + parent, stage.get_submodule(parent)) if parent else (stage_name, stage)
    return name, module


def plan_judges(
    search: str, stage_name: str, stage: nn.Module, groups: Sequence[Any]
) -> dict[int, ModuleJudge]:
    """One ``ModuleJudge`` per judged module, by ``id(group)`` for the groups AWQ scales
    (linear layers only: convolutions and RNNs keep the layer-output search)."""
    judges: dict[str, ModuleJudge] = {}
    out: dict[int, ModuleJudge] = {}
    for group in groups:
        if "awq" not in group.sequence or any(layer.kind != "linear" for layer in group.layers):
            continue
        found = judged_module(search, stage_name, stage, group.names)
        if found is None:
            continue
        name, module = found
        out[id(group)] = judges.setdefault(name, ModuleJudge(name, module))
    return out


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple | list):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


class ModuleJudge:
    """A module's recorded calls, and the error of candidate weights at its output."""

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name, self.module = name, module
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        # The float output for one group's search (its key: the matrices it replaces); a later
        # group meets the module with the earlier groups quantized, so it gets its own.
        self._reference: tuple[tuple[Any, ...], list[torch.Tensor]] | None = None

    def _outputs(self) -> Iterator[torch.Tensor]:
        for args, kwargs in self.calls:
            # A copy per run: a module that edits its input in place must not change the record.
            out = hidden_of(self.module(*_clone(args), **_clone(kwargs)))
            if out is None:
                raise ValueError(f"module {self.name} returns no tensor, so AWQ cannot judge at its output")
            yield out

    def error(self, candidate: list[tuple[LayerPlan, Matrix, torch.Tensor]]) -> float:
        """Mean squared difference at the module's output between the weights in ``candidate``
        (layer, matrix, value) and the module's current ones, over the recorded calls. The
        current output is computed once per set of replaced matrices (one group's search)."""
        if not candidate or not self.calls:
            return 0.0
        key = tuple((layer.name, m.param, m.rows) for layer, m, _ in candidate)
        with torch.no_grad(), single_thread():
            if self._reference is None or self._reference[0] != key:
                self._reference = (key, list(self._outputs()))
            reference = self._reference[1]
            saved = [read(layer, m) for layer, m, _ in candidate]
            try:
                for layer, m, value in candidate:
                    write(layer, m, value)
                total, count = 0.0, 0
                for ref, out in zip(reference, self._outputs(), strict=True):
                    total += float(((out.double() - ref.double()) ** 2).sum())
                    count += ref.numel()
            finally:
                for (layer, m, _), value in zip(candidate, saved, strict=True):
                    write(layer, m, value)
        return total / max(count, 1)

    @property
    def nbytes(self) -> int:
        def size(v: Any) -> int:
            if isinstance(v, torch.Tensor):
                return v.numel() * v.element_size()
            if isinstance(v, tuple | list):
                return sum(size(x) for x in v)
            if isinstance(v, dict):
                return sum(size(x) for x in v.values())
            return 0

        return sum(size(a) + size(k) for a, k in self.calls)


@contextmanager
def _recording(judges: list[ModuleJudge]) -> Iterator[None]:
    def hook(judge: ModuleJudge):
        def record_call(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            judge.calls.append((_clone(args), _clone(kwargs)))

        return record_call

    handles = [j.module.register_forward_pre_hook(hook(j), with_kwargs=True) for j in judges]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def record(
    stage: nn.Module, inputs: Iterable[tuple[tuple[Any, ...], dict[str, Any]]], judges: Iterable[ModuleJudge]
) -> None:
    """Run ``stage`` on each ``(args, kwargs)`` and record every call of each judge's module."""
    with torch.no_grad(), _recording(list(judges)):
        for args, kwargs in inputs:
            stage(*args, **kwargs)
