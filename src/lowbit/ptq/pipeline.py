"""The sequential calibration pipeline: one data flow for every data-aware algorithm.

::

    calibration batches -> capture the inputs of stage 1 (the forward stops there)
      -> for each stage (a transformer layer, a block, a child):
           run it on the cached inputs; hooks gather each layer group's input statistics
           -> modifiers in recipe order (smoothquant | awq | gptq | rtn | bias_correction),
              or AutoRound's learned rounding against the float stage's output (``ptq.tuning``)
           -> write the quantized weights back -> run it again: its outputs, computed with the
              quantized weights, are the next stage's cached inputs (spilled to disk past a budget)
      -> layers outside the stages: before the first one, from a pass that stops at stage 1;
         after the last one (an output head), from one pass of the whole, already quantized model

So each stage runs at most twice per batch and the model is never re-run from its start per
layer; later layers see, and compensate, the errors of earlier ones, as in the GPTQ and AWQ
papers. How stages are found: ``lowbit.ptq.stages``. The model passed in is changed in place:
its float weights become the dequantized ones (``lowbit.quantize`` works on a copy).

>>> import torch, lowbit
>>> from torch import nn
>>> torch.manual_seed(0) and None
>>> model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
>>> q = lowbit.quantize(model, "int4-gptq", calibration=[torch.randn(64, 32)], progress=False)
>>> q[0].qweight.algorithm, q[0].qweight.info["gptq_error"] <= q[0].qweight.info["rtn_error"]
('gptq', True)
>>> q[4].qweight.fmt.name  # the output head stays at int8 in the data-aware presets
'int8'
>>> [(s.name, s.runs) for s in q.lowbit_calibration.stages]  # statistics, then outputs for the next
[('0', 2), ('1', 1), ('2', 1)]
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import resource
import time
import warnings
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import ModelError
from lowbit.ptq.cache import ActivationCache, MemoryBudget
from lowbit.ptq.convert import model_device, to_device
from lowbit.ptq.distributed import reduce_statistics, world
from lowbit.ptq.judge import ModuleJudge, plan_judges, record
from lowbit.ptq.matrices import write
from lowbit.ptq.modifiers import LayerResult, Notes, apply_group, layer_sequence, needs_data, quantize_rtn
from lowbit.ptq.plan import LayerPlan, plan_model
from lowbit.ptq.stages import Probe, Slot, expert_lists, hidden_of, model_call, probe_model
from lowbit.ptq.stats import StageObserver
from lowbit.ptq.tuning import stage_deadline, tune_stage
from lowbit.recipes import LayerRule, Recipe, WeightSpec, resolve

DEFAULT_CACHE_BYTES = 2 << 30  # most activations kept in memory before spilling to disk
# Without an explicit ``cache_bytes`` the budget is sized from the model: an eighth of its float
# bytes (floored, capped by DEFAULT_CACHE_BYTES), so the cache never dominates a small model's
# footprint (a 134M Llama on 128 x 512 tokens has 0.37x its own size in activations per stage;
# with a quarter in memory its peak RSS was 1.47-1.61x the model, the goal is 1.5x).
CACHE_MODEL_SHARE = 0.125
MIN_CACHE_BYTES = 64 << 20
# What ``embeddings_and_head: int8`` gives those layers: 8 bits per output channel, round to nearest.
EDGE_INT8 = WeightSpec(format="int8", granularity="channel", symmetric=True, algorithm="rtn")


@dataclass
class StageReport:
    """One stage of a calibration run."""

    name: str
    layers: int  # layers calibrated in this stage
    groups: list[list[str]]  # layers that shared one input (and one set of statistics)
    runs: int  # passes of the stage over the calibration batches (statistics, then outputs)
    seconds: float
    peak_memory_bytes: int  # process RSS (CPU) or allocated CUDA memory, highest seen in the stage
    cached_bytes: int  # activations held in memory at the stage's end
    spilled_bytes: int  # activations written to disk by this stage
    stats_bytes: int  # statistics (Hessians, ...) held while the stage was quantized
    stats_seconds: float = 0.0  # of ``seconds``: accumulating the statistics (X^T X, ...)
    quantize_seconds: float = 0.0  # of ``seconds``: the modifiers (GPTQ, AWQ searches, ...)


@dataclass
class CalibrationResult:
    """What ``calibrate_weights`` chose, and how the run went."""

    recipe: Recipe  # the recipe as applied (the embeddings / head choice made explicit)
    weights: dict[str, Any]  # layer name -> QuantizedWeight (RNNs: dict by parameter)
    input_smooth: dict[str, torch.Tensor]
    layout: str  # how stages were found: targets | blocks | children | model
    stages: list[StageReport] = field(default_factory=list)
    model_passes: int = 0  # passes of the whole model over the batches (capture, outside layers)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line per stage (for logs and reports)."""
        lines = [f"{len(self.stages)} stages ({self.layout}), {self.model_passes} passes of the whole model"]
        for s in self.stages:
            lines.append(
                f"  {s.name}: {s.layers} layers in {len(s.groups)} groups, {s.runs} runs, {s.seconds:.2f} s "
                f"(statistics {s.stats_seconds:.2f}, modifiers {s.quantize_seconds:.2f}), "
                f"peak {s.peak_memory_bytes / 2**20:.0f} MiB, spilled {s.spilled_bytes / 2**20:.0f} MiB"
            )
        return "\n".join(lines)


class WeightSource(Protocol):
    """Where a model's float weights come from when they are not all in memory (onloading,
    ``lowbit.ptq.onload``): the pipeline asks for a module's weights just before it needs them and
    frees the quantized layers' weights itself, as with ``release_weights``."""

    device: torch.device  # where the weights go (the model's own parameters are on the meta device)

    def load(self, prefix: str) -> None:
        """Make every parameter under the module called ``prefix`` real (and keep it so)."""

    def streaming(self) -> AbstractContextManager[None]:
        """A context in which a forward pass loads each module's weights for its call only."""


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the first stage has its input."""


def _stop(*_: Any) -> None:
    raise _StopForward


class _MemoryMeter:
    """Highest memory seen during a stage: CUDA's allocator peak, or this process's RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        self.max_rss_before = _max_rss()
        self.peak = _rss()

    def sample(self) -> None:
        if not self.cuda:
            self.peak = max(self.peak, _rss())

    def result(self) -> int:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        now = _max_rss()
        # The process-wide high-water mark rose during this stage: that is the stage's peak.
        return max(self.peak, now) if now > self.max_rss_before else self.peak


def _load_trim() -> Any:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim  # glibc only; elsewhere nothing to do
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_trim()


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    glibc raises its mmap threshold after a large block is freed, so later blocks of a few MB
    (per-batch activations, weight chunks) come from the heap, and freed ones stay in the
    process's RSS: 145 MB after quantizing one 32000 x 768 head. The pipeline trims after
    each stage, so that what one stage freed does not add to the next one's peak.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _max_rss()


def _with_hidden(shared: tuple[tuple[Any, ...], dict[str, Any]], slot: Slot | None, x: Any):
    args, kwargs = shared
    if slot is None:
        return args, kwargs
    if isinstance(slot, int):
        return args[:slot] + (x,) + args[slot + 1 :], kwargs
    return args, {**kwargs, slot: x}


def edge_recipe(recipe: Recipe, layers: list[LayerPlan], probe: Probe, notes: list[str]) -> Recipe:
    """``recipe`` with its ``embeddings_and_head`` choice made explicit as per-layer overrides."""
    policy = recipe.embeddings_and_head
    if policy == "recipe":
        return recipe
    planned = {layer.name for layer in layers}
    embeddings = [layer.name for layer in layers if layer.kind == "embedding"]
    head = [name for name in probe.head if name in planned and name not in embeddings]
    kept = "float" if policy == "float" else "int8 (per channel, round to nearest)"
    notes.append(
        f"embeddings ({', '.join(embeddings) or 'none'}) and output head ({', '.join(head) or 'none found'}) "
        f"kept at {kept}: embeddings_and_head={policy!r}; 'recipe' quantizes them like the other layers"
    )
    rules = tuple(
        LayerRule(glob.escape(name), skip=True)
        if policy == "float"
        else LayerRule(glob.escape(name), weight=EDGE_INT8)
        for name in embeddings + head
    )
    return dataclasses.replace(recipe, overrides=recipe.overrides + rules, embeddings_and_head="recipe")


def _tied(layers: list[LayerPlan]) -> set[str]:
    """Layers whose weight tensor another planned layer also uses (GPT-2's embedding and head)."""
    owners: dict[int, list[str]] = {}
    for layer in layers:
        for p in layer.module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(layer.name)
    return {name for names in owners.values() if len(names) > 1 for name in names}


def default_cache_bytes(model: nn.Module) -> int:
    """The activation budget used when none is given: ``CACHE_MODEL_SHARE`` of the model's float
    bytes, at least ``MIN_CACHE_BYTES``, at most ``DEFAULT_CACHE_BYTES``.

    >>> default_cache_bytes(nn.Linear(16, 16)) == MIN_CACHE_BYTES
    True
    """
    nbytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return int(min(DEFAULT_CACHE_BYTES, max(MIN_CACHE_BYTES, CACHE_MODEL_SHARE * nbytes)))


def _release(layer: LayerPlan) -> None:
    """Drop a quantized layer's float weight (its packed weight is in the results): a zero-stride
    placeholder keeps the shape, dtype and device that ``prepare`` reads, in 1 element."""
    if layer.kind not in ("linear", "conv", "embedding"):
        return  # RNNs cache flat views of their weights; they are rarely the bulk of a model
    p = layer.module.weight
    if p.stride() == (0,) * p.dim():
        return
    layer.module.weight = nn.Parameter(p.new_zeros(()).expand(p.shape), requires_grad=False)


class _Pipeline:
    def __init__(
        self,
        model: nn.Module,
        recipe: Recipe,
        batches: list[Any],
        progress: bool,
        cache_bytes: int,
        release: bool = False,
        source: WeightSource | None = None,
    ):
        self.model, self.recipe, self.batches, self.progress = model, recipe, batches, progress
        self.device = model_device(model) if source is None else source.device
        self.budget = MemoryBudget(cache_bytes)
        self.release = release or source is not None  # free float weights once nothing runs them again
        self.source = source  # weights not in memory: loaded stage by stage (onloading)
        self.deferred: dict[str, list[LayerPlan]] = {}  # data-free layers quantized when their stage loads
        self.layers: list[LayerPlan] = []
        self.released: set[str] = set()
        self.stage_names: list[str] = []
        self.results: dict[str, LayerResult] = {}
        self.sequences: dict[str, tuple[str, ...]] = {}
        self.tied: set[str] = set()
        self.few_rows: list[tuple[str, int, int]] = []  # (layer, inputs, rows seen)
        self.experts: tuple[str, ...] = ()  # ModuleLists of experts (mixture-of-experts blocks)
        self.unrouted: list[str] = []  # expert layers no calibration token reached: round to nearest
        self.reports: list[StageReport] = []
        self.model_passes = 0
        self.tuning = False  # some layer learns its rounding (autoround): keep a float stream too
        self.tuning_started = 0.0

    # --- planning ------------------------------------------------------------------------------

    def _plan(self, recipe: Recipe, notes: Notes) -> list[LayerPlan]:
        layers = plan_model(self.model, recipe).layers
        self.sequences = {layer.name: layer_sequence(layer, recipe, notes) for layer in layers}
        return layers

    def run(self) -> CalibrationResult:
        notes = Notes()
        layers = self._plan(self.recipe, notes)  # every refusal happens here, before any forward pass
        with self._streaming():
            probe = probe_model(self.model, layers, self.batches[0], self.recipe.sequential_targets)
        trim_heap()  # the probe's logits (batch x tokens x vocabulary) must not stay in RSS
        edge_notes: list[str] = []
        recipe = edge_recipe(self.recipe, layers, probe, edge_notes)
        if recipe is not self.recipe:
            notes = Notes()
            layers = self._plan(recipe, notes)
        self.tied = _tied(layers)
        self.layers = layers
        data_layers = [layer for layer in layers if needs_data(self.sequences[layer.name])]
        self.experts = tuple(expert_lists(probe.layout.stages))
        # An expert the probe's batch did not reach may see tokens of later batches (else: RTN).
        missing = [
            layer.name
            for layer in data_layers
            if layer.name not in probe.first_call and not self._is_expert(layer.name)
        ]
        if missing:
            raise ValueError(
                f"layer {missing[0]} is never called on the calibration data, so it cannot be calibrated; "
                "exclude it from the recipe or give batches that reach it"
            )
        calibrated = {layer.name for layer in data_layers}
        stages = probe.layout.stages

        def stage_index(name: str) -> int | None:
            return next((i for i, (s, _) in enumerate(stages) if name == s or name.startswith(f"{s}.")), None)

        for layer in layers:  # data-free layers now: the stages then see their quantized outputs
            if layer.name not in calibrated:
                index = stage_index(layer.name)
                if self.source is not None and index is not None:  # its weights are loaded with its stage
                    self.deferred.setdefault(stages[index][0], []).append(layer)
                    continue
                self._rtn(layer)

        in_stage: list[list[LayerPlan]] = [[] for _ in stages]
        prefix, tail = [], []
        for layer in data_layers:
            index = stage_index(layer.name)
            if index is not None:
                in_stage[index].append(layer)
            elif stages and probe.first_call[layer.name] < probe.stage_first_call[0]:
                prefix.append(layer)
            else:
                tail.append(layer)
        prefix, tail = self._outside_stages(prefix, notes), self._outside_stages(tail, notes)
        self.tuning = any(self._tuned(layer) for layer in data_layers)
        if self.tuning and world()[1] > 1:
            raise ValueError(
                "autoround follows its own gradients on each rank's batches, so ranks would disagree "
                "under torch.distributed; run it in one process (or use gptq there)"
            )
        last = max((i for i, ls in enumerate(in_stage) if ls), default=-1)
        total = bool(prefix) + (last + 1) + bool(tail)
        # A pass of the whole model for the tail layers runs every stage again: keep the weights then.
        self.release = self.release and not tail
        if self.source is not None and tail:
            raise ModelError(
                f"layer {tail[0].name} is calibrated after the last stage, from a pass of the whole model, "
                "which onloading cannot run (the stages' weights are not kept); keep it data-free "
                "(e.g. embeddings_and_head: int8) or quantize the model in memory"
            )
        bar = tqdm(total=total, desc="calibrating", unit="stage", disable=not self.progress, leave=False)
        try:
            if prefix:
                bar.set_postfix_str("layers before the first stage")
                self._observe_model("(before the first stage)", prefix, stop_at=stages[0][1])
                bar.update()
            if last >= 0:
                self._run_stages(stages[: last + 1], in_stage, probe.layout.slot, bar)
            if tail:
                name = "(whole model)" if not stages else "(after the last stage)"
                bar.set_postfix_str(name)
                self._observe_model(name, tail, stop_at=None)
                bar.update()
            for stage_name in list(self.deferred):  # onloading: stages no data-aware layer needed
                self._load_stage(stage_name)
                self._release_done(stage_name)
        finally:
            bar.close()
            self.budget.close()
        self._warn_few_rows()
        unrouted = self._unrouted_note()
        if unrouted:
            warnings.warn(f"lowbit: {unrouted}", stacklevel=4)

        weights: dict[str, Any] = {}
        smooth: dict[str, torch.Tensor] = {}
        for layer in layers:
            r = self.results[layer.name]
            weights[layer.name] = r.weights if layer.kind == "rnn" else r.weights["weight"]
            if r.smooth is not None:
                smooth[layer.name] = r.smooth
        all_notes = edge_notes + notes.lines() + ([unrouted] if unrouted else [])
        if probe.layout.mode == "model" and probe.rejected and data_layers:
            all_notes.append(
                "calibrated the whole model in one pass (no chain of stages: "
                + "; ".join(probe.rejected)
                + ")"
            )
        return CalibrationResult(
            recipe, weights, smooth, probe.layout.mode, self.reports, self.model_passes, all_notes
        )

    def _tuned(self, layer: LayerPlan) -> bool:
        return self.sequences[layer.name][-1] == "autoround"

    def _outside_stages(self, layers: list[LayerPlan], notes: Notes) -> list[LayerPlan]:
        """AutoRound learns on a stage's output: layers outside every stage (an output head)
        get round to nearest with MSE-chosen clipping instead, now (they are data-free then), or
        GPTQ when the recipe starts AutoRound from GPTQ."""
        for layer in layers:  # [gptq, autoround]: GPTQ alone there
            if self.sequences[layer.name] == ("gptq", "autoround"):
                notes.add(
                    "autoround tunes the layers inside calibration stages; outside them: gptq", layer.name
                )
                self.sequences[layer.name] = ("gptq",)
        moved = [layer for layer in layers if self._tuned(layer)]
        for layer in moved:
            notes.add(
                "autoround tunes the layers inside calibration stages; outside them: round to "
                "nearest with MSE-chosen clipping",
                layer.name,
            )
            self.sequences[layer.name] = ("mse",)
            self._rtn(layer)
        return [layer for layer in layers if layer not in moved]

    # --- onloading -----------------------------------------------------------------------------

    def _streaming(self) -> AbstractContextManager[None]:
        return self.source.streaming() if self.source is not None else contextlib.nullcontext()

    def _rtn(self, layer: LayerPlan) -> None:
        if self.source is not None:
            self.source.load(layer.name)
        apply = layer.name not in self.tied  # else the float weight must stay for its other user
        self._keep(layer, quantize_rtn(layer, self.sequences[layer.name], apply=apply))
        trim_heap()  # one large table's temporaries must not add to the next one's

    def _load_stage(self, name: str) -> None:
        """Onloading: the stage's weights from the checkpoint, then its data-free layers."""
        if self.source is None:
            return
        self.source.load(name)
        for layer in self.deferred.pop(name, []):
            self._rtn(layer)

    # --- quantized layers ----------------------------------------------------------------------

    def _keep(self, layer: LayerPlan, result: LayerResult) -> None:
        """Record a layer's result and make the working model compute with its quantized weights."""
        self.results[layer.name] = result
        if layer.name not in self.tied:  # a shared weight must stay float for its other user
            for m, value in result.effective:
                write(layer, m, value)
        result.effective = []  # written into the model: a second float copy of it is not needed
        if result.bias_shift is not None:
            module = layer.module
            shift = result.bias_shift.to(module.weight.dtype)
            if module.bias is None:
                module.bias = nn.Parameter(shift.clone(), requires_grad=False)
            else:
                with torch.no_grad():
                    module.bias += shift

    def _quantize(
        self, observer: StageObserver, layers: list[LayerPlan], judges: dict[int, ModuleJudge] | None = None
    ) -> None:
        seen = {layer.name for g in observer.groups for layer in g.layers}
        for layer in layers:
            if layer.name not in seen and self._is_expert(layer.name):
                # The router sent no calibration token here: nothing to calibrate on.
                self.unrouted.append(layer.name)
                self._keep(layer, quantize_rtn(layer, ("rtn",), apply=layer.name not in self.tied))
            elif layer.name not in seen:
                raise ValueError(
                    f"layer {layer.name} is never called when its stage runs on the calibration data, so "
                    "it cannot be calibrated; exclude it from the recipe or set sequential_targets"
                )
        for group in observer.groups:
            for source, stats in group.stats.items():
                if stats.xtx is not None and stats.count < stats.cols:
                    self.few_rows.append(
                        (group.names[0] + (f" ({source})" if source != "x" else ""), stats.cols, stats.count)
                    )
            if group.sequence[-1] == "autoround":
                continue  # learned on the stage's output after the other groups (``_tune``)
            judge = (judges or {}).get(id(group))
            for name, result in apply_group(group, self.recipe, judge).items():
                self._keep(next(layer for layer in group.layers if layer.name == name), result)
            if self.source is not None:
                # Onloading runs close to a budget: one group's solver temporaries (GPTQ's float32
                # Hessian copies) must not stay in RSS under the next group's.
                trim_heap()

    def _is_expert(self, name: str) -> bool:
        return any(name.startswith(f"{e}.") for e in self.experts)

    def _unrouted_note(self) -> str | None:
        if not self.unrouted:
            return None
        shown = ", ".join(self.unrouted[:8]) + (
            f" and {len(self.unrouted) - 8} more" if len(self.unrouted) > 8 else ""
        )
        return (
            f"{len(self.unrouted)} expert layer(s) saw no calibration token (the router sent none there) "
            f"and were quantized round-to-nearest instead: {shown}; calibration data that reaches them "
            "lets them be calibrated"
        )

    def _warn_few_rows(self) -> None:
        if not self.few_rows:
            return
        name, cols, rows = max(self.few_rows, key=lambda t: t[1] - t[2])
        warnings.warn(
            f"lowbit: {len(self.few_rows)} layer input(s) saw fewer calibration rows (tokens or positions) "
            f"than they have channels, e.g. {name}: {rows} rows for {cols} inputs; their statistics are "
            f"rank-deficient and GPTQ / AWQ compensate less: give at least {cols} rows "
            "(sequences x tokens per sequence)",
            stacklevel=5,
        )

    def _release_done(self, stage: str | None) -> None:
        """Free the float weights of the layers that will not run again: those of ``stage`` after
        its last run, or (``None``) those outside every stage once the first stage's inputs are
        captured. Only with ``release`` (``lowbit.quantize`` swaps the layers out next)."""
        if not self.release:
            return
        for layer in self.layers:
            inside = stage is not None and (layer.name == stage or layer.name.startswith(f"{stage}."))
            outside = stage is None and not self._in_stage(layer.name)
            if (inside or outside) and layer.name in self.results and layer.name not in self.tied:
                _release(layer)
                self.released.add(layer.name)

    def _in_stage(self, name: str) -> bool:
        return any(name == s or name.startswith(f"{s}.") for s in self.stage_names)

    # --- passes --------------------------------------------------------------------------------

    def _call(self, batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return model_call(self.model, to_device(batch, self.device))

    def _observe_model(self, name: str, layers: list[LayerPlan], stop_at: nn.Module | None) -> None:
        """One pass of the whole model with hooks on ``layers`` (stopping at ``stop_at``), then
        quantize them."""
        started, meter = time.perf_counter(), _MemoryMeter(self.device)
        for layer in layers:  # onloading: they are quantized after the pass, so they stay loaded
            if self.source is not None:
                self.source.load(layer.name)
        observer = StageObserver(layers, self.sequences)
        handle = None
        if stop_at is not None:
            handle = stop_at.register_forward_pre_hook(_stop)
        try:
            with observer.hooks(), self._streaming():
                for batch in self.batches:
                    args, kwargs = self._call(batch)
                    try:
                        self.model(*args, **kwargs)
                    except _StopForward:
                        pass
                    observer.end_call()
                    meter.sample()
        finally:
            if handle is not None:
                handle.remove()
        self.model_passes += 1
        reduce_statistics(observer.groups, name)
        stats_bytes = observer.nbytes
        quantize_started = time.perf_counter()
        self._quantize(observer, layers)
        self.reports.append(
            StageReport(
                name,
                len(layers),
                [g.names for g in observer.groups],
                1,
                time.perf_counter() - started,
                meter.result(),
                self.budget.used,
                0,
                stats_bytes,
                observer.seconds,
                time.perf_counter() - quantize_started,
            )
        )

    def _capture(self, first: nn.Module, slot: Slot | None, cache: ActivationCache) -> list[tuple]:
        """Inputs of the first stage for every batch: the hidden state into ``cache``, the rest
        (masks, position embeddings: the same for every stage) returned by batch."""
        captured: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            captured.append((args, kwargs))
            raise _StopForward

        shared = []
        handle = first.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for index, batch in enumerate(self.batches):
                args, kwargs = self._call(batch)
                try:
                    self.model(*args, **kwargs)
                except _StopForward:
                    pass
                if len(captured) != 1:
                    raise ValueError("the first calibration stage was not reached on a calibration batch")
                args, kwargs = captured.pop()
                if slot is None:
                    shared.append((args, kwargs))
                    continue
                x = args[slot] if isinstance(slot, int) else kwargs[slot]
                cache.put(index, x.detach())
                shared.append(
                    (args[:slot] + (None,) + args[slot + 1 :], kwargs)
                    if isinstance(slot, int)
                    else (args, {k: v for k, v in kwargs.items() if k != slot})
                )
        finally:
            handle.remove()
        self.model_passes += 1
        return shared

    def _run_stages(self, stages, in_stage, slot: Slot | None, bar) -> None:
        cache = ActivationCache(self.budget)
        with self._streaming():
            shared = self._capture(stages[0][1], slot, cache)
        self.stage_names = [name for name, _ in stages]
        self._release_done(None)
        trim_heap()
        # AutoRound's targets: the float model's stage outputs, a second stream beside the
        # quantized one (both start from the captured inputs).
        float_targets = self.recipe.autoround.target == "float"
        floats = ActivationCache(self.budget) if self.tuning and slot is not None and float_targets else None
        if floats is not None:
            for index in range(len(self.batches)):
                floats.put(index, cache.get(index).clone())
        self.tuning_started = time.perf_counter()
        tuned_stages = sum(any(self._tuned(layer) for layer in ls) for ls in in_stage)

        def inputs(index: int, source: ActivationCache):
            if slot is None:
                return shared[index]
            # A copy: a stage that edits its input in place must not change the cached one.
            return _with_hidden(shared[index], slot, source.get(index).clone())

        for i, (name, stage) in enumerate(stages):
            started, meter = time.perf_counter(), _MemoryMeter(self.device)
            bar.set_postfix_str(name)
            self._load_stage(name)
            layers = in_stage[i]
            runs, stats_bytes, groups, stats_seconds, quantize_seconds = 0, 0, [], 0.0, 0.0
            targets = None
            if floats is not None or any(self._tuned(layer) for layer in layers):
                # The float stage's outputs, before any of its weights is quantized.
                targets = ActivationCache(self.budget)
                for index in range(len(self.batches)):
                    args, kwargs = inputs(index, floats if floats is not None else cache)
                    hidden = hidden_of(stage(*args, **kwargs))
                    assert hidden is not None
                    targets.put(index, hidden.detach())
                    meter.sample()
                runs += 1
            if layers:
                observer = StageObserver(layers, self.sequences)
                with observer.hooks():
                    for index in range(len(self.batches)):
                        args, kwargs = inputs(index, cache)
                        stage(*args, **kwargs)
                        observer.end_call()
                        meter.sample()
                runs += 1
                reduce_statistics(observer.groups, f"stage {name}")  # data-parallel: sum over ranks
                stats_bytes = observer.nbytes
                groups = [g.names for g in observer.groups]
                stats_seconds, quantize_started = observer.seconds, time.perf_counter()
                # AWQ judged at an enclosing module: record that module's inputs on a few batches.
                judges = plan_judges(self.recipe.awq.search, name, stage, observer.groups)
                if judges and world()[1] > 1:
                    raise ValueError(
                        f"awq.search: {self.recipe.awq.search} reruns modules on recorded batches, which "
                        "differ between ranks under torch.distributed; use awq.search: layer there"
                    )
                if judges:
                    unique = list({id(j): j for j in judges.values()}.values())
                    count = min(len(self.batches), self.recipe.awq.search_batches)
                    record(stage, (inputs(index, cache) for index in range(count)), unique)
                    runs += 1
                    stats_bytes += sum(j.nbytes for j in unique)
                self._quantize(observer, layers, judges)
                tuned = [layer for layer in layers if self._tuned(layer)]
                if tuned:
                    assert targets is not None
                    deadline = stage_deadline(
                        self.recipe.autoround.time_budget_s, self.tuning_started, tuned_stages
                    )
                    tuned_stages -= 1
                    steps = self.recipe.autoround.steps

                    def on_step(step: int, loss: float, name=name, steps=steps) -> None:
                        if step % 10 == 0 or step == steps - 1:
                            bar.set_postfix_str(f"{name}: autoround step {step + 1}/{steps}, loss {loss:.3g}")

                    starts = [g for g in observer.groups if g.sequence == ("gptq", "autoround")]
                    results = tune_stage(
                        stage,
                        name,
                        tuned,
                        self.recipe,
                        lambda index, cache=cache: inputs(index, cache),
                        targets.get,
                        len(self.batches),
                        deadline,
                        on_step,
                        hessians={
                            layer.name: group.stats["x"].gram().mul(2.0).float()
                            for group in starts
                            for layer in group.layers
                        },
                    )
                    for layer in tuned:
                        self._keep(layer, results[layer.name])
                    runs += -(-steps // len(self.batches))
                quantize_seconds = time.perf_counter() - quantize_started
                del observer, judges
            spilled = 0
            if i < len(stages) - 1:
                if slot is None:
                    raise RuntimeError("stages without a chained input cannot pass outputs on")
                outputs = ActivationCache(self.budget)
                for index in range(len(self.batches)):
                    args, kwargs = inputs(index, cache)
                    hidden = hidden_of(stage(*args, **kwargs))
                    assert hidden is not None
                    cache.drop(index)
                    outputs.put(index, hidden.detach())
                    meter.sample()
                runs += 1
                spilled = outputs.spilled_bytes
                cache.close()
                cache = outputs
            if targets is not None:  # float targets: the float stream moves on to the next stage
                if floats is not None:
                    floats.close()
                floats = targets if float_targets and slot is not None and i < len(stages) - 1 else None
                if floats is None:
                    targets.close()
            self._release_done(name)
            trim_heap()
            self.reports.append(
                StageReport(
                    name,
                    len(layers),
                    groups,
                    runs,
                    time.perf_counter() - started,
                    meter.result(),
                    self.budget.used,
                    spilled,
                    stats_bytes,
                    stats_seconds,
                    quantize_seconds,
                )
            )
            bar.update()
        cache.close()
        if floats is not None:
            floats.close()


def calibrate_weights(
    model: nn.Module,
    recipe: str | Recipe | dict[str, Any],
    calibration: Iterable[Any],
    *,
    progress: bool = True,
    cache_bytes: int | None = None,
    release_weights: bool = False,
    source: WeightSource | None = None,
) -> CalibrationResult:
    """Choose every planned layer's quantized weight with the sequential pipeline.

    ``model`` is changed in place (its float weights become the dequantized ones, biases gain
    their corrections), ready for ``lowbit.ptq.prepare(model, result.recipe, inplace=True,
    weights=result.weights, input_smooth=result.input_smooth)``, which is what
    ``lowbit.quantize`` does. ``cache_bytes`` caps the activations kept in memory (default:
    ``default_cache_bytes(model)``, an eighth of the model's float bytes within 64 MiB .. 2 GiB);
    the rest go to a temporary directory. ``release_weights=True`` frees each layer's float
    weight once no later pass runs it (a one-element placeholder of the same shape remains), for
    a caller that swaps the layers for ``result.weights`` next and needs no float model: the
    float copy then shrinks as the quantized weights accumulate. Kept when an output head is
    calibrated (its pass runs the whole model again). ``source`` (onloading: ``model``'s weights
    are on the meta device, ``lowbit.ptq.onload``) loads each stage's weights just before it runs
    and implies ``release_weights``.

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> r = calibrate_weights(model, "int4-gptq", [torch.randn(32, 16)], progress=False)
    >>> r.layout, sorted(r.weights), r.stages[0].groups
    ('children', ['0', '2'], [['0']])
    """
    recipe = resolve(recipe)
    batches = list(calibration)
    if not batches:
        raise ValueError("the calibration data is empty: pass at least one input batch")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            budget = default_cache_bytes(model) if cache_bytes is None else cache_bytes
            pipeline = _Pipeline(model, recipe, batches, progress, budget, release_weights, source)
            return pipeline.run()
    finally:
        model.train(was_training)


__all__ = [
    "CalibrationResult",
    "DEFAULT_CACHE_BYTES",
    "StageReport",
    "WeightSource",
    "calibrate_weights",
    "default_cache_bytes",
]
