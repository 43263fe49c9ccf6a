"""Checks made before any quantization work: a model or calibration data lowbit cannot use is
refused up front, with the layer (or the reason) named, instead of failing deep inside or, worse,
producing a quietly broken model.

- ``check_model``: parameters on the meta device; NaN / Inf in a weight or bias that quantization
  reads; ``fp16`` / ``bf16`` weight storage that would saturate (refused unless the recipe sets
  ``allow_saturation``, then returned as warnings with the counts). Raises ``ModelError``.
- ``check_calibration``: calibration data in which no input varies (all-zero, constant, or one
  repeated token) gives every activation range a single value; raises ``DataError``.

>>> import torch
>>> from lowbit.recipes import get
>>> from lowbit.ptq.plan import plan_model
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
>>> with torch.no_grad():
...     model[0].weight[0, :2] = 1e6  # fp16 tops out at 65504
>>> check_model(model, plan_model(model, get("fp16")), allow_saturation=True)
['layer 0 weight: 2 of 16 values exceed the fp16 range (|x| > 65504) and are stored as +-65504']
>>> check_calibration([torch.zeros(8, 4)])
Traceback (most recent call last):
...
lowbit.errors.DataError: the calibration data carries no range information: every input is constant ...
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lowbit import formats
from lowbit.errors import DataError, ModelError
from lowbit.ptq.plan import Plan

_LISTED = 5  # name this many offending tensors in one message, then count the rest


def _listing(items: list[str]) -> str:
    more = f"; and {len(items) - _LISTED} more" if len(items) > _LISTED else ""
    return "; ".join(items[:_LISTED]) + more


def _tensor_name(qualified: str) -> str:
    """``"2.bias"`` -> ``"layer 2 bias"`` (the wording of the other weight errors)."""
    layer, _, own = qualified.rpartition(".")
    return f"layer {layer} {own}" if layer else f"model parameter {own}"


def check_meta(model: nn.Module) -> None:
    """Refuse a model with parameters or buffers on the meta device (shapes without values)."""
    meta = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if meta:
        raise ModelError(
            f"the model has parameters on the meta device ({len(meta)} tensors, e.g. "
            f"{_tensor_name(meta[0])}): they have shapes but no values; load real weights first "
            "(model.to_empty(device='cpu') then load_state_dict, or from_pretrained without "
            "device_map='meta' / init_empty_weights)"
        )


def _checked_tensors(model: nn.Module, plan: Plan, whole_model: bool) -> Iterator[tuple[str, torch.Tensor]]:
    if whole_model:  # calibration runs the whole forward pass: every parameter is read
        yield from model.named_parameters()
        return
    for layer in plan.layers:
        for name, p in layer.module.named_parameters():
            yield f"{layer.name}.{name}", p


def check_finite_weights(model: nn.Module, plan: Plan, whole_model: bool = False) -> None:
    """Refuse NaN / Inf in the weights and biases of the planned layers (every parameter when
    ``whole_model``: calibration reads them all), naming each tensor with its counts."""
    bad = []
    for name, p in _checked_tensors(model, plan, whole_model):
        if not p.is_floating_point() or p.numel() == 0:
            continue
        # A NaN or Inf makes the sum NaN or Inf, so a finite sum proves every value finite without
        # isfinite's temporaries (1.7x the tensor: a 32000-token embedding is 98 MB); a sum that
        # overflowed is settled by the exact check.
        if bool(torch.isfinite(p.detach().sum())):
            continue
        finite = torch.isfinite(p.detach())
        if bool(finite.all()):
            continue
        nan = int(torch.isnan(p.detach()).sum())
        bad.append(f"{_tensor_name(name)} ({nan} NaN, {int((~finite).sum()) - nan} Inf)")
    if bad:
        raise ModelError(
            f"NaN or Inf values in {len(bad)} model tensor(s): {_listing(bad)}; clean or retrain the model "
            "before quantizing (one NaN poisons every scale it shares)"
        )


def saturation(plan: Plan) -> list[str]:
    """Per weight stored in ``fp16`` / ``bf16``: how many of its values exceed the format's range."""
    found = []
    for layer in plan.layers:
        fmt = formats.get(layer.weight.format) if layer.weight is not None else None
        if fmt is None or fmt.family != "float":
            continue
        fmax = torch.finfo(fmt.torch_dtype).max
        for name, p in layer.module.named_parameters():
            if not name.startswith("weight") or not p.is_floating_point() or p.numel() == 0:
                continue  # biases stay float32
            over = int((p.detach().abs() > fmax).sum())
            if over:
                found.append(
                    f"{_tensor_name(f'{layer.name}.{name}')}: {over:,} of {p.numel():,} values exceed the "
                    f"{fmt.name} range (|x| > {fmax:.6g}) and are stored as +-{fmax:.6g}"
                )
    return found


def check_model(model: nn.Module, plan: Plan, allow_saturation: bool, whole_model: bool = False) -> list[str]:
    """All model checks, in the order that keeps each one meaningful (meta first: nothing else can
    read a meta tensor). Returns the saturation warnings when ``allow_saturation`` permits them."""
    check_meta(model)
    check_finite_weights(model, plan, whole_model)
    saturated = saturation(plan)
    if saturated and not allow_saturation:
        raise ModelError(
            f"{len(saturated)} weight(s) overflow their float storage: {_listing(saturated)}; choose a "
            "format with a scale (int8, fp8_e4m3 ...) or set allow_saturation: true in the recipe"
        )
    return saturated


# --- calibration data --------------------------------------------------------------------------------


def _tensors(batch: Any, prefix: str = "input") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a batch (tensor, tuple / list, dict), named by where it sits."""
    if isinstance(batch, torch.Tensor):
        yield prefix, batch
    elif isinstance(batch, Mapping):
        for key, value in batch.items():
            yield from _tensors(value, str(key))
    elif isinstance(batch, (tuple, list)):
        for i, value in enumerate(batch):
            yield from _tensors(value, f"{prefix}[{i}]" if prefix != "input" else f"input {i}")


def check_calibration(batches: Sequence[Any]) -> None:
    """Refuse calibration batches in which no input varies: all-zero or constant data (or a single
    repeated token id) would calibrate every activation range to one point. One varying input is
    enough (a constant ``attention_mask`` beside varying ``input_ids`` is normal)."""
    ranges: dict[str, tuple[float, float]] = {}
    for batch in batches:
        for name, t in _tensors(batch):
            if t.numel() == 0 or t.is_meta or t.is_complex():
                continue
            values = t.detach()
            lo, hi = float(values.min()), float(values.max())
            if lo != hi or math.isnan(lo) or math.isnan(hi):  # NaN: the observers name the batch
                return
            old = ranges.get(name, (lo, hi))
            ranges[name] = (min(old[0], lo), max(old[1], hi))
            if ranges[name][0] != ranges[name][1]:
                return
    if not ranges:
        return  # no tensors to judge (custom batch objects): the model call will tell
    shown = ", ".join(f"{name} = {lo:g}" for name, (lo, _) in list(ranges.items())[:4])
    raise DataError(
        f"the calibration data carries no range information: every input is constant ({shown}) "
        f"across {len(batches)} batch(es); all-zero or constant data would calibrate every activation range "
        "to a single value. Pass representative inputs (real samples of what the model will see)"
    )
