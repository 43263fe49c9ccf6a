"""Compare several techniques on one model: quantize each, evaluate each against one float baseline.

A ``Technique`` is a name plus a function that turns a ``ZooModel`` into a quantized model, so a
row can be a preset recipe, a QAT run, or anything a later module adds (see ``lowbit.demo``).

>>> import torch
>>> from lowbit.zoo import ZooModel
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 4))
>>> zm = ZooModel(name="lin", model=model, calibration=[torch.randn(4, 8)])
>>> recs = compare(zm, [FLOAT, recipe_technique("int8-weight-only")], repeats=2)
>>> [r.name for r in recs], recs[0].metric
(['float', 'int8-weight-only'], None)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from lowbit.eval.evaluate import Baseline, EvalRecord, evaluate
from lowbit.zoo.base import ZooModel


@dataclass(frozen=True)
class Technique:
    """One row of a comparison: ``build(zoo_model)`` returns the model to evaluate."""

    name: str
    build: Callable[[ZooModel], nn.Module]
    description: str = ""


FLOAT = Technique("float", lambda zm: zm.model, "the float32 model itself (baseline)")


def recipe_technique(recipe: str, name: str | None = None, progress: bool = False) -> Technique:
    """A technique that runs ``lowbit.quantize`` with a preset name or recipe file.

    >>> recipe_technique("nf4").name
    'nf4'
    """
    from lowbit.api import quantize

    def build(zm: ZooModel) -> nn.Module:
        return quantize(zm.model, recipe, calibration=zm.calibration or None, progress=progress)

    return Technique(name or recipe, build, f"lowbit.quantize(model, {recipe!r})")


def evaluation_data(zm: ZooModel) -> tuple[list[Any], str | None]:
    """The data and metric to evaluate ``zm`` on: its held-out data, else its calibration inputs
    with no task metric (output error only)."""
    if zm.eval_data:
        return list(zm.eval_data), zm.metric
    if zm.calibration:
        return list(zm.calibration), None
    raise ValueError(
        f"model {zm.name!r} comes without data; pass evaluation or calibration data "
        "(CLI: --data FILE or --calib FILE)"
    )


def compare(
    zm: ZooModel,
    techniques: Sequence[Technique],
    *,
    repeats: int = 20,
    latency: bool = True,
    layer_batches: int | None = None,
    ort: bool = False,
    on_row: Callable[[EvalRecord], None] | None = None,
    data: Sequence[Any] | None = None,
    metric: str | None = None,
) -> list[EvalRecord]:
    """Build and evaluate every technique against ``zm.model``; ``on_row`` sees each record as it
    is done (to print progress). ``data`` / ``metric`` override ``evaluation_data(zm)``."""
    if data is None:
        data, metric = evaluation_data(zm)
    baseline = Baseline.measure(zm.model, data, metric)
    records = []
    for tech in techniques:
        started = time.perf_counter()
        qmodel = tech.build(zm)
        built = time.perf_counter() - started
        rec = evaluate(
            zm.model,
            qmodel,
            data,
            metric,
            name=tech.name,
            repeats=repeats,
            latency=latency,
            layer_batches=layer_batches,
            ort=ort,
            baseline=baseline,
        )
        rec.seconds["quantize"] = built
        records.append(rec)
        if on_row is not None:
            on_row(rec)
    return records
