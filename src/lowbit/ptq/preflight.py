"""Preflight: the peak memory an onloaded run will need, predicted from shapes before any work.

Onloading (``lowbit.ptq.onload``) holds, at its busiest moment, one of:

- **the probe**: one calibration batch through the whole model, one module's weights at a time,
  with the output logits (batch x tokens x vocabulary);
- **a stage**: its float weights, the statistics its layers gather (``X^T X`` per layer input,
  float64: counted once per data-aware layer, an upper bound where layers share an input, as
  q / k / v do), the solver's temporaries for its largest layer (GPTQ: float32 copies of the
  weight and the Hessian), the cached activations in memory (inputs and outputs of the stage,
  capped by ``cache_bytes``; the rest spills to disk), one batch's intermediates, the quantized
  weights made so far (the output) and the float parts kept throughout (tied weights, norms);
- **the save**: the quantized model (its tensor file is streamed to disk).

The largest of the three is the prediction. Mixture-of-experts blocks (a ``ModuleList`` of
same-class expert modules inside a stage) are named: how many tokens each expert sees depends on
the router, which only running tells; experts that see none are reported after calibration.

>>> parse_bytes("4GB"), parse_bytes("512MiB"), parse_bytes(1024)
(4000000000, 536870912, 1024)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit import formats
from lowbit.granularity import PerChannel, PerGroup, parse
from lowbit.ptq.modifiers import layer_sequence, needs_data
from lowbit.ptq.plan import LayerPlan, Plan, row_length
from lowbit.ptq.stages import candidates, expert_lists
from lowbit.recipes.spec import Recipe, WeightSpec

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


# What a run holds beyond the tensors counted here (allocator free lists, per-thread arenas,
# Python objects, first-use buffers of torch's kernels): measured 15-19 MiB above the tensors
# on a 32-block Llama of 84 MiB (tests/test_onload.py); with it that run's prediction was 54.1 MiB
# for a measured 53.6 MiB.
RUNTIME_OVERHEAD = 16 << 20


def parse_bytes(value: int | str) -> int:
    """Bytes from an int or a size: ``"4GB"`` (10**9), ``"4GiB"`` (2**30), ``"512MB"``, ``"1.5G"``."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"max_memory must be >= 0 bytes, got {value}")
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {value!r} as a size; write e.g. 4GB, 512MiB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def human(n: float) -> str:
    """``1.5 GiB``-style sizes for the report."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def count_tokens(batch: Any) -> int:
    """Token positions in a batch: ``input_ids`` (or the first tensor) of a dict, an integer
    tensor's elements, or a float tensor's rows (all dimensions but the last).

    >>> count_tokens({"input_ids": torch.zeros(2, 8, dtype=torch.long)}), count_tokens(torch.zeros(4, 16, 32))
    (16, 64)
    """
    if isinstance(batch, dict):
        t = batch.get("input_ids")
        if not isinstance(t, torch.Tensor):
            t = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
    elif isinstance(batch, tuple | list):
        t = next((v for v in batch if isinstance(v, torch.Tensor)), None)
    else:
        t = batch
    if not isinstance(t, torch.Tensor):
        return 0
    if t.is_floating_point() and t.dim() > 1:
        return t.numel() // t.shape[-1]
    return t.numel()


def quantized_bytes(layer: LayerPlan, spec: WeightSpec | None = None) -> int:
    """Stored bytes of a layer's quantized weight: codes at the format's bits, one float32 scale
    (and zero point when asymmetric) per group / channel."""
    spec = spec or layer.weight
    assert spec is not None
    w = layer.module.weight
    numel, rows = w.numel(), int(w.shape[0])
    fmt = formats.get(spec.format)
    if fmt.family == "float":  # a cast (fp16 / bf16): no scales
        return numel * fmt.bits // 8
    g = parse(spec.granularity)
    scales = 1
    if isinstance(g, PerChannel):
        scales = rows
    elif isinstance(g, PerGroup):
        scales = rows * math.ceil(numel // max(rows, 1) / g.size)
    per_scale = 4 * (1 if spec.symmetric else 2)
    return math.ceil(numel * fmt.bits / 8) + scales * per_scale


def _hessian_width(layer: LayerPlan) -> tuple[int, int]:
    """(columns of one ``X^T X``, how many of them) for a layer's input statistics."""
    if layer.kind == "conv":
        groups = int(getattr(layer.module, "groups", 1))
        return row_length(layer.module), groups
    if layer.kind == "rnn":
        return int(layer.module.input_size + layer.module.hidden_size), 1
    return row_length(layer.module), 1


@dataclass
class StageNeeds:
    name: str
    weights: int  # float bytes of every parameter in the stage
    hessians: int  # X^T X (float64) of its data-aware layers, one per layer (an upper bound)
    solver: int  # temporaries of the largest data-aware layer's solve
    kept: int  # float bytes that stay after the stage (norms, layers left float)
    output: int  # quantized bytes of its layers
    experts: str | None = None


@dataclass
class Preflight:
    """The prediction (bytes) and what it is made of; ``report()`` prints it, ``refusal`` words a
    budget that is too small."""

    layout: str
    stages: int
    largest: StageNeeds | None
    activations: int  # cached stage activations held in memory (inputs + outputs)
    spilled: int  # of the stage activations, what goes to disk
    batch_work: int  # one batch's intermediates inside a stage
    probe: int  # the probe pass
    save: int  # the save at the end
    output: int  # all quantized weights
    resident: int  # float weights kept for the whole run (tied weights, norms, float layers)
    outside: int  # float weights outside the stages (embeddings, head), until the capture is done
    tokens: int
    batches: int
    cache_bytes: int
    peak_bytes: int
    phase: str
    float_bytes: int
    experts: list[str] = field(default_factory=list)

    def components(self) -> list[tuple[str, int]]:
        s = self.largest
        rows = [
            ("largest stage's float weights" + (f" ({s.name})" if s else ""), s.weights if s else 0),
            ("its statistics (X^T X per layer input, float64)", s.hessians if s else 0),
            ("solver temporaries (largest layer)", s.solver if s else 0),
            (f"cached activations in memory (cache {human(self.cache_bytes)})", self.activations),
            ("one batch through a stage", self.batch_work),
            ("output buffer (quantized weights)", self.output),
            ("resident float weights outside stages (tied, norms)", self.resident),
            ("runtime overhead (allocator, Python objects; measured)", RUNTIME_OVERHEAD),
        ]
        return rows

    def report(self) -> str:
        lines = [
            f"lowbit preflight: predicted peak {human(self.peak_bytes)} above the process's memory now "
            f"(at the {self.phase}); the float model is {human(self.float_bytes)}",
            f"  {self.stages} stages ({self.layout}); calibration: {self.tokens:,} tokens in "
            f"{self.batches} batches",
        ]
        lines += [f"  {name:<62} {human(n):>10}" for name, n in self.components()]
        lines.append(
            f"  {'probe pass (one batch, one module at a time, logits)':<62} {human(self.probe):>10}"
        )
        lines.append(
            f"  {'save (the quantized model; its file is streamed to disk)':<62} {human(self.save):>10}"
        )
        if self.spilled:
            lines.append(f"  activations spilled to disk per stage: {human(self.spilled)}")
        lines += [f"  {note}" for note in self.experts]
        return "\n".join(lines)

    def refusal(self, budget: int) -> str:
        top = ", ".join(f"{name} {human(n)}" for name, n in self.components() if n)
        return (
            f"max_memory {human(budget)} is below the {human(self.peak_bytes)} ({self.peak_bytes:,} bytes) "
            f"this run needs at the {self.phase} (with the activation cache at {human(self.cache_bytes)}, "
            f"the rest on disk): {top}; raise max_memory to at least {self.peak_bytes:,} bytes, or "
            "calibrate on smaller batches"
        )


def _stage_layout(model: nn.Module, plan: Plan, recipe: Recipe) -> tuple[str, list[tuple[str, nn.Module]]]:
    """The stages the pipeline will most likely use (its first candidate; the probe confirms)."""
    layouts = candidates(model, recipe.sequential_targets, [layer.name for layer in plan.layers])
    if not layouts:
        return "model", []
    return layouts[0].mode, layouts[0].stages


def _experts(prefix: str, stage: nn.Module, planned: set[str], tokens: int) -> str | None:
    for name in expert_lists([(prefix, stage)]):
        if any(p.startswith(f"{name}.") for p in planned):
            n = len(stage.get_submodule(name.removeprefix(prefix).lstrip(".")))
            return (
                f"{name}: {n} experts; which tokens reach each is the router's choice, known only by "
                f"running ({tokens:,} tokens in all, {tokens // n:,} per expert if spread evenly); experts "
                "that see none are quantized round-to-nearest and named after calibration"
            )
    return None


def predict(
    model: nn.Module,
    source: Any,
    plan: Plan,
    recipe: Recipe,
    batches: list[Any],
    cache_bytes: int | None,
    budget: int | None,
    pipeline: bool = True,
) -> Preflight:
    """The preflight for onloading ``model`` (meta device; ``source`` an ``Onloader``) under
    ``recipe`` on ``batches`` (see the module docstring). ``cache_bytes=None``: the pipeline's
    default, or with a ``budget`` what the budget leaves for activations."""
    from lowbit.ptq.pipeline import default_cache_bytes

    layers = plan.layers
    planned = {layer.name for layer in layers}
    mode, stages = _stage_layout(model, plan, recipe)
    stage_names = [name for name, _ in stages]
    tokens = sum(count_tokens(b) for b in batches)
    largest_batch = max((count_tokens(b) for b in batches), default=0)
    elem = next((p.original.element_size() for p in source.params), 4)

    def in_stage(name: str) -> str | None:
        return next((s for s in stage_names if name == s or name.startswith(f"{s}.")), None)

    edge_int8 = pipeline and recipe.embeddings_and_head == "int8"
    edge_float = pipeline and recipe.embeddings_and_head == "float"
    from lowbit.ptq.pipeline import EDGE_INT8

    def out_bytes(layer: LayerPlan) -> int:
        edge = layer.kind == "embedding" or (in_stage(layer.name) is None and layer.kind == "linear")
        if edge and edge_float:
            return layer.module.weight.numel() * elem
        return quantized_bytes(layer, EDGE_INT8 if edge and edge_int8 else None)

    output = sum(out_bytes(layer) for layer in layers)
    float_bytes = source.nbytes("")
    tied = sum(p.original.numel() * p.original.element_size() for p in source.params if len(p.names) > 1)
    quantized_params = {f"{layer.name}.weight" for layer in layers}
    kept_float = sum(
        p.original.numel() * p.original.element_size()
        for p in source.params
        if not any(n in quantized_params for n in p.names)
    )
    outside = sum(
        p.original.numel() * p.original.element_size()
        for p in source.params
        if all(in_stage(n) is None for n in p.names)
    )
    resident = tied + sum(
        p.original.numel() * p.original.element_size()
        for p in source.params
        if all(in_stage(n) is None for n in p.names) and not any(n in quantized_params for n in p.names)
    )

    needs: list[StageNeeds] = []
    hidden = 0
    for name, stage in stages:
        inside = [layer for layer in layers if in_stage(layer.name) == name]
        data = [layer for layer in inside if pipeline and needs_data(layer_sequence(layer, recipe))]
        hessians, solver = 0, 0
        for layer in data:
            cols, count = _hessian_width(layer)
            hessians += count * (cols * cols * 8 + 4 * cols * 8)  # X^T X and the per-column moments
            w = layer.module.weight.numel()
            # GPTQ (lowbit.algorithms.gptq), measured: X^T X / n (float64), its float32 copy, then
            # the float64 copy, damped copy and Cholesky factor alive together (36 bytes per
            # Hessian entry); the weight as float32 copies, float32 codes and the float64 error
            # terms of the report (30 bytes per weight).
            solver = max(solver, 30 * w + 36 * count * cols * cols)
        if inside and not hidden:
            first = inside[0].module
            hidden = int(getattr(first, "in_features", 0) or row_length(first))
        weights = source.nbytes(name)
        kept = weights - sum(layer.module.weight.numel() * elem for layer in inside)
        needs.append(
            StageNeeds(
                name,
                weights,
                hessians,
                solver,
                kept,
                sum(out_bytes(layer) for layer in inside),
                _experts(name, stage, planned, tokens),
            )
        )
    # A stage's busiest moment: its weights, statistics and solve on top of what is kept.
    largest = max(needs, key=lambda s: s.weights + s.hessians + s.solver, default=None)
    stage_kept = sum(s.kept for s in needs)

    width = max((int(getattr(layer.module, "out_features", 0) or 0) for layer in layers), default=hidden)
    ffn = max((row_length(layer.module) for layer in layers if in_stage(layer.name)), default=hidden)
    act_batch = largest_batch * hidden * elem
    act_total = tokens * hidden * elem
    # Attention scores and the MLP's intermediates of one batch, plus the float64 rows the
    # statistics hooks make of a layer input.
    batch_work = largest_batch * (6 * hidden + 4 * ffn) * 4 + largest_batch * ffn * 8 * 2
    seq = _sequence_length(batches)
    heads = int(getattr(getattr(model, "config", None), "num_attention_heads", 0) or 0)
    if seq and heads:
        batch_work += (largest_batch // seq) * heads * seq * seq * 4

    unit = max(
        (sum(p.original.numel() * p.original.element_size() for p in ps) for ps in source.owned.values()),
        default=0,
    )
    # The probe: one batch through the whole model, one module's weights at a time, its logits.
    probe = (resident + unit + largest_batch * width * 4 + batch_work) if pipeline else 0
    # The quantized model; its tensor file is streamed to disk (lowbit.save(stream=True)) and
    # hashed back in chunks of 16 MiB.
    save = output + kept_float + (16 << 20)

    def activations(cache: int) -> int:
        """Stage inputs and outputs in memory (outputs replace inputs batch by batch), the batch
        being read back from disk and its copy for the stage."""
        return (min(cache, act_total + act_batch) + 2 * act_batch) if largest and pipeline else 0

    def phases(cache: int) -> dict[str, int]:
        out = {"probe pass": probe, "save": save}
        if pipeline and largest is not None:
            held = output + resident + stage_kept + activations(cache) + batch_work
            out[f"stage {largest.name}"] = held + largest.weights + largest.hessians + largest.solver
            # Embeddings and head (quantized, dequantized in place) until stage 1's inputs are cached.
            out["capture of the first stage's inputs"] = outside + min(cache, act_total) + act_batch
        if not pipeline:
            biggest = max((s.weights for s in needs), default=0)
            out["quantization of the largest layer"] = resident + output + biggest
        return {k: v + RUNTIME_OVERHEAD for k, v in out.items()}

    if cache_bytes is None:
        cache_bytes = default_cache_bytes(model)
        if budget is not None:  # what the budget leaves; spilled activations give the same bytes
            cache_bytes = max(0, min(cache_bytes, budget - max(phases(0).values())))
    predicted = phases(cache_bytes)
    phase = max(predicted, key=lambda k: predicted[k])
    spilled = max(0, act_total + act_batch - cache_bytes) if largest and pipeline else 0
    experts = [s.experts for s in needs if s.experts]
    if len(experts) > 1:  # every block of a MoE model has them: one line says it
        experts = [experts[0], f"(and the same in {len(experts) - 1} more stages)"]
    return Preflight(
        mode,
        len(stages),
        largest,
        activations(cache_bytes),
        spilled,
        batch_work,
        probe,
        save,
        output,
        resident + stage_kept,
        outside,
        tokens,
        len(batches),
        cache_bytes,
        predicted[phase],
        phase,
        float_bytes,
        experts,
    )


def _sequence_length(batches: list[Any]) -> int:
    if not batches:
        return 0
    b = batches[0]
    t = b.get("input_ids") if isinstance(b, dict) else b[0] if isinstance(b, tuple | list) else b
    return int(t.shape[-1]) if isinstance(t, torch.Tensor) and t.dim() >= 2 else 0


__all__ = [
    "RUNTIME_OVERHEAD",
    "Preflight",
    "count_tokens",
    "human",
    "parse_bytes",
    "predict",
    "quantized_bytes",
]
