"""Calibration diagnostics: is there enough calibration data, and does it look like the real inputs?

Static activation ranges are only as good as the batches they were measured on. Three symptoms
are cheap to detect while calibrating:

- ``too_few_samples``: fewer examples than ``min_samples`` (a few hundred is the usual advice).
- ``ranges_still_changing``: a layer's range after *all* batches differs from its range after the
  first half by more than ``tolerance`` of its width; more data would move it further.
- ``never_activated``: a layer's observer saw nothing (a branch the batches never reach); its
  range cannot be set and the quantized model would fail or guess.
- ``outside_range`` (when ``data`` is given): real inputs push a layer's range further than
  ``tolerance`` beyond what calibration saw, so they would be clipped: unrepresentative batches.

Each warning carries a suggested sample count. ``check_calibration`` runs everything on its own;
``snapshot_ranges`` + ``diagnose`` are the two halves for code that drives calibration itself
(``lowbit.calibrate``): snapshot after the first half of the batches, diagnose at the end.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> warnings = check_calibration(model, [torch.randn(4, 8) for _ in range(2)])
>>> [w.kind for w in warnings][:1]
['too_few_samples']
>>> warnings[0].suggested_samples
128
"""

from __future__ import annotations

import math
import warnings as pywarnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from lowbit.analysis.common import halve_batch
from lowbit.nn.activation import ActivationQuantizer
from lowbit.ptq.convert import prepare, run_batches
from lowbit.recipes import resolve
from lowbit.recipes.spec import ActivationSpec, Recipe

MIN_SAMPLES = 128
# Min-max ranges of unbounded data always grow a little with more data (a Gaussian's extremes move
# ~8% of the width per doubling at a thousand values), so only a clearly larger move is flagged.
TOLERANCE = 0.1


@dataclass(frozen=True)
class CalibrationWarning:
    """One finding; ``str(w)`` is the message for users."""

    kind: str  # too_few_samples | ranges_still_changing | never_activated | outside_range
    message: str
    layers: tuple[str, ...] = ()
    suggested_samples: int | None = None

    def __str__(self) -> str:
        return self.message


def count_samples(batch: Any) -> int:
    """Examples in one batch: the first dimension of its first tensor.

    >>> count_samples({"input_ids": torch.zeros(3, 7)}), count_samples((torch.zeros(5, 2), 1))
    (3, 5)
    """
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ()
    for v in values:
        if isinstance(v, torch.Tensor):
            return count_samples(v)
    return 1


def snapshot_ranges(model: nn.Module) -> dict[str, tuple[float, float]]:
    """The current ``(low, high)`` range of every observing activation quantizer, by layer name;
    layers whose observer has seen nothing yet are left out."""
    out = {}
    for name, aq in _observing(model).items():
        obs = aq.observer
        if obs is None or obs.count == 0:
            continue
        # ``_range`` is the observer contract (see lowbit.observers.base): the range it would use.
        lo, hi = obs._range(aq.fmt, aq.spec.symmetric)
        out[name] = (float(lo.min()), float(hi.max()))
    return out


def diagnose(
    model: nn.Module,
    half: dict[str, tuple[float, float]],
    samples: int,
    *,
    min_samples: int = MIN_SAMPLES,
    tolerance: float = TOLERANCE,
) -> list[CalibrationWarning]:
    """Warnings for a model whose observers have seen all ``samples`` calibration examples, given
    the ``snapshot_ranges`` taken after the first half of them."""
    found: list[CalibrationWarning] = []
    quantizers = _observing(model)
    if samples < min_samples:
        found.append(
            CalibrationWarning(
                "too_few_samples",
                f"calibration used {samples} examples; use at least {min_samples} "
                "(static ranges from few examples miss the tails of the activations)",
                suggested_samples=min_samples,
            )
        )
    never = tuple(n for n, aq in quantizers.items() if aq.observer is not None and aq.observer.count == 0)
    if never:
        found.append(
            CalibrationWarning(
                "never_activated",
                f"{len(never)} layer(s) never received calibration data: {_list(never)}; the batches do "
                "not exercise them (add inputs that reach them, or exclude them from the recipe)",
                layers=never,
            )
        )
    full = snapshot_ranges(model)
    moving = {n: _relative_change(half[n], full[n]) for n in full if n in half}
    moving = {n: c for n, c in moving.items() if c > tolerance}
    if moving:
        worst = max(moving.values())
        # Extremes grow roughly by a constant amount per doubling of the data: ask for enough
        # doublings that the last one moves the range less than ``tolerance``.
        doublings = min(4, max(1, math.ceil(math.log2(worst / tolerance))))
        suggested = max(min_samples, samples * 2**doublings)
        names = sorted(moving, key=lambda n: -moving[n])
        found.append(
            CalibrationWarning(
                "ranges_still_changing",
                f"activation ranges were still changing when calibration ended in {len(names)} layer(s) "
                f"(the second half of {samples} examples moved them by up to {worst:.0%} of their width: "
                f"{_list(tuple(names))}); try about {suggested} examples",
                layers=tuple(names),
                suggested_samples=suggested,
            )
        )
    return found


def check_calibration(
    model: nn.Module,
    calibration: Sequence[Any],
    recipe: str | Recipe | dict[str, Any] = "int8-static",
    *,
    data: Sequence[Any] | None = None,
    min_samples: int = MIN_SAMPLES,
    tolerance: float = TOLERANCE,
) -> list[CalibrationWarning]:
    """Calibrate a copy of ``model`` as ``recipe`` would (activations made static if they are not)
    and return what looks wrong; an empty list means nothing was found.

    ``data``: optional input batches of the real task (no labels); inputs that leave the calibrated
    ranges by more than ``tolerance`` signal unrepresentative calibration data.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    >>> check_calibration(model, [torch.rand(64, 8) for _ in range(4)])  # bounded inputs settle fast
    []
    """
    recipe = _static(resolve(recipe))
    batches = list(calibration)
    if not batches:
        raise ValueError("the calibration data is empty: pass at least one input batch")
    if len(batches) == 1:
        batches = list(halve_batch(batches[0])) if count_samples(batches[0]) >= 2 else batches
    with pywarnings.catch_warnings():
        pywarnings.simplefilter("ignore")  # plan warnings belong to quantize(), not to a diagnosis
        qmodel = prepare(model, recipe)
    if not _observing(qmodel):
        return []
    first = batches[: max(1, len(batches) // 2)]
    run_batches(qmodel, first, progress=False)
    half = snapshot_ranges(qmodel)
    run_batches(qmodel, batches[len(first) :], progress=False)
    samples = sum(count_samples(b) for b in batches)
    found = diagnose(qmodel, half, samples, min_samples=min_samples, tolerance=tolerance)
    if data:
        calibrated = snapshot_ranges(qmodel)
        run_batches(qmodel, list(data), progress=False)
        after = snapshot_ranges(qmodel)
        outside = {n: _relative_change(calibrated[n], after[n]) for n in calibrated if n in after}
        outside = {n: c for n, c in outside.items() if c > tolerance}
        if outside:
            names = tuple(sorted(outside, key=lambda n: -outside[n]))
            found.append(
                CalibrationWarning(
                    "outside_range",
                    f"real inputs exceed the calibrated ranges by up to {max(outside.values()):.0%} in "
                    f"{len(names)} layer(s) ({_list(names)}): the calibration batches are not "
                    "representative; draw them from the same distribution as the inputs",
                    layers=names,
                    suggested_samples=max(min_samples, samples * 2),
                )
            )
    return found


def _static(recipe: Recipe) -> Recipe:
    """The recipe with static activations wherever it quantizes weights (dynamic -> static)."""
    act = recipe.activation
    if act.mode != "static":
        act = ActivationSpec(mode="static", format="uint8", symmetric=False, observer="minmax")
    rules = tuple(
        replace(r, activation=act) if r.activation is not None and r.activation.mode != "static" else r
        for r in recipe.overrides
    )
    return replace(recipe, activation=act, overrides=rules)


def _observing(model: nn.Module) -> dict[str, ActivationQuantizer]:
    return {
        (m.name or n): m
        for n, m in model.named_modules()
        if isinstance(m, ActivationQuantizer) and m.state == "observing"
    }


def _relative_change(before: tuple[float, float], after: tuple[float, float]) -> float:
    width = max(after[1] - after[0], before[1] - before[0], 1e-12)
    return (abs(after[0] - before[0]) + abs(after[1] - before[1])) / width


def _list(names: tuple[str, ...], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
