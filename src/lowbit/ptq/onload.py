"""Onloading: quantize a Hugging Face checkpoint directory without the whole float model in memory.

::

    config.json -> the model built on the meta device (shapes, no values; buffers such as rotary
                   frequencies are computed as usual)
    preflight   -> predicted peak memory, printed; refused when max_memory is below it
    shards      -> the sequential pipeline (lowbit.ptq.pipeline) loads each stage's float weights
                   just before the stage runs, quantizes it, frees the float weights; the probe and
                   capture passes load each module's weights for its own call only
    output      -> the quantized layers plus the small float parts (norms), saved with lowbit.save

The artifact is byte-identical to ``lowbit.save(lowbit.quantize(model, recipe, calibration,
inplace=True), out)`` on the fully loaded model: the same pipeline makes the same choices on the
same numbers; only where the float weights live differs. Tensors are read one at a time with
``safetensors`` (memory-mapped: a tensor's pages are read when it is first used and go when it
is freed). Tied weights (an output head sharing the embedding's table) are loaded once, for
both users, and stay loaded.

>>> import tempfile, torch, transformers, lowbit
>>> torch.manual_seed(0) and None
>>> config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
>>> ckpt = tempfile.mkdtemp()
>>> transformers.LlamaForCausalLM(config).save_pretrained(ckpt)
>>> calibration = [torch.randint(0, 256, (2, 32)) for _ in range(4)]
>>> out = tempfile.mkdtemp() + "/q"
>>> done = lowbit.quantize_checkpoint(ckpt, "int4-gptq", calibration, out, max_memory="64MB",
...     progress=False, report=False)
>>> done.manifest["recipe"]["name"], done.preflight.stages
('int4-gptq', 2)
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import BudgetError, CheckpointError, DataError, ModelError
from lowbit.ptq.checkpoint import Checkpoint
from lowbit.recipes.spec import Recipe

SMALL_TENSOR = 1 << 20  # bytes: tensors below this are copied out of the memory-mapped shard


@contextlib.contextmanager
def empty_parameters() -> Iterator[None]:
    """Build modules with their parameters on the meta device and their buffers real (what
    ``accelerate.init_empty_weights`` does): buffers computed in ``__init__`` (rotary
    frequencies) are not in checkpoints, so they must be computed as usual."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            p = module._parameters[name]
            assert p is not None
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def build_skeleton(checkpoint: Checkpoint) -> nn.Module:
    """The checkpoint's model from its ``config.json``, parameters on the meta device, in eval mode:
    a causal LM (``*ForCausalLM`` / ``*LMHeadModel``) or else the bare ``AutoModel``; the dtype
    is the config's, as ``from_pretrained`` gives. Never runs code from the checkpoint."""
    from lowbit.zoo.text import import_transformers

    transformers = import_transformers()
    directory = str(checkpoint.directory)
    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    except (ValueError, OSError, KeyError) as err:
        raise CheckpointError(f"{directory}/config.json: transformers cannot read it ({err})") from None
    architectures = getattr(config, "architectures", None) or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    with empty_parameters():
        model = auto.from_config(config)
    return model.eval()


@dataclass
class _Param:
    """One parameter (shared by every module that ties it) and where it comes from."""

    original: nn.Parameter  # on the meta device; put back when a streamed load ends
    owners: list[tuple[nn.Module, str]]
    names: list[str]
    key: str = ""  # its name in the checkpoint

    def current(self) -> torch.Tensor:
        module, attr = self.owners[0]
        return module._parameters[attr]  # type: ignore[return-value]

    def assign(self, value: nn.Parameter) -> None:
        for module, attr in self.owners:
            module._parameters[attr] = value


def _under(name: str, prefix: str) -> bool:
    return not prefix or name == prefix or name.startswith(f"{prefix}.")


class Onloader:
    """A meta-device model's parameters, filled from a ``Checkpoint`` when asked (the pipeline's
    ``WeightSource``). Built once: every parameter must be in the checkpoint with its shape
    (else ``CheckpointError`` naming it), checked before anything is loaded. ``finite`` says
    which parameters must hold no NaN / Inf (``ModelError`` naming the tensor as it loads)."""

    def __init__(
        self, model: nn.Module, checkpoint: Checkpoint, device: torch.device, finite: tuple[str, ...] = ("",)
    ) -> None:
        self.model, self.checkpoint, self.device, self.finite = model, checkpoint, device, finite
        by_id: dict[int, _Param] = {}
        self.owned: dict[int, list[_Param]] = {}  # module id -> its own parameters
        for module_name, module in model.named_modules(remove_duplicate=False):
            for attr, p in module._parameters.items():
                if p is None:
                    continue
                entry = by_id.setdefault(id(p), _Param(p, [], []))
                entry.owners.append((module, attr))
                entry.names.append(f"{module_name}.{attr}" if module_name else attr)
                self.owned.setdefault(id(module), []).append(entry)
        self.params = list(by_id.values())
        prefix = getattr(model, "base_model_prefix", "") or ""
        for entry in self.params:
            entry.key = self._key(entry, prefix)
        self.streamed: set[int] = set()  # loaded for one call only (ids of _Param)
        self._load_buffers()

    def _key(self, entry: _Param, prefix: str) -> str:
        # transformers saves a model under its own names; a base model's checkpoint lacks the
        # head model's prefix ("model."), which from_pretrained adds or strips the same way.
        tries = []
        for name in entry.names:
            tries += [name, name.removeprefix(f"{prefix}.") if prefix else name, f"{prefix}.{name}"]
        key = next((k for k in tries if k in self.checkpoint), None)
        if key is None:
            tied = f" (tied to {', '.join(entry.names[1:])})" if len(entry.names) > 1 else ""
            raise CheckpointError(
                f"{self.checkpoint.directory}: parameter {entry.names[0]}{tied} is not in the checkpoint; "
                "is config.json the one these weights were saved with?"
            )
        shape, want = self.checkpoint.shape(key), tuple(entry.original.shape)
        if shape != want:
            raise CheckpointError(
                f"shard {self.checkpoint.file_of(key)}: tensor {key!r} has shape {list(shape)}, the model "
                f"built from config.json expects {list(want)}"
            )
        return key

    def _load_buffers(self) -> None:
        """Buffers to the device; persistent ones the checkpoint holds are read from it."""
        for module_name, module in self.model.named_modules():
            for attr, b in list(module._buffers.items()):
                if b is None:
                    continue
                name = f"{module_name}.{attr}" if module_name else attr
                if attr not in module._non_persistent_buffers_set and name in self.checkpoint:
                    b = self.checkpoint.tensor(name).to(b.dtype)
                module._buffers[attr] = b.to(self.device)

    # --- loading -----------------------------------------------------------------------------------

    def nbytes(self, prefix: str = "") -> int:
        """Float bytes of the parameters under ``prefix`` (as loaded, in the model's dtype)."""
        return sum(
            p.original.numel() * p.original.element_size()
            for p in self.params
            if any(_under(n, prefix) for n in p.names)
        )

    def _materialize(self, entry: _Param) -> bool:
        if entry.current() is not entry.original:
            return False  # loaded already, or released by the pipeline (a placeholder)
        t = self.checkpoint.tensor(entry.key).to(device=self.device, dtype=entry.original.dtype)
        if t.untyped_storage().nbytes() < SMALL_TENSOR and t.device.type == "cpu":
            # A small tensor kept to the end (a norm's weight) would keep its shard's mapping and
            # the pages read around it in RSS (~0.5 MiB per Llama block, measured): copy it out.
            t = t.clone()
        if t.is_floating_point() and any(_under(n, f) for n in entry.names for f in self.finite):
            _check_finite(t, entry.names[0], self.checkpoint.file_of(entry.key))
        entry.assign(nn.Parameter(t, requires_grad=entry.original.requires_grad))
        return True

    def load(self, prefix: str) -> None:
        """Load every parameter under the module ``prefix`` ("": all) that is not loaded yet;
        it stays loaded (a streamed load of it becomes permanent)."""
        for entry in self.params:
            if any(_under(n, prefix) for n in entry.names):
                self._materialize(entry)
                self.streamed.discard(id(entry))

    def _unload(self, entry: _Param) -> None:
        if id(entry) in self.streamed:
            self.streamed.discard(id(entry))
            entry.assign(entry.original)

    @contextlib.contextmanager
    def streaming(self) -> Iterator[None]:
        """Forward passes in this context load each module's own parameters just before its call
        and free them after it (those loaded with ``load`` stay)."""
        stack: list[list[_Param]] = []

        def pre(module: nn.Module, _args: Any) -> None:
            loaded = [e for e in self.owned.get(id(module), []) if self._materialize(e)]
            self.streamed.update(id(e) for e in loaded)
            stack.append(loaded)

        def post(_module: nn.Module, _args: Any, _out: Any) -> None:
            for entry in stack.pop() if stack else []:
                self._unload(entry)

        handles = []
        for module in self.model.modules():
            if self.owned.get(id(module)):
                handles.append(module.register_forward_pre_hook(pre))
                handles.append(module.register_forward_hook(post, always_call=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for entry in self.params:  # a pass stopped early (the capture) skips some post hooks
                self._unload(entry)


def _check_finite(t: torch.Tensor, name: str, file: Path) -> None:
    # A finite sum proves every value finite without isfinite's temporaries (as check_finite_weights).
    if bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all()):
        return
    nan = int(torch.isnan(t).sum())
    raise ModelError(
        f"NaN or Inf values in parameter {name} ({nan} NaN, {int((~torch.isfinite(t)).sum()) - nan} Inf), "
        f"read from {file}; clean or retrain the model before quantizing (one NaN poisons every scale "
        "it shares)"
    )


# --- the front door -------------------------------------------------------------------------------


@dataclass
class QuantizedCheckpoint:
    """What ``quantize_checkpoint`` made: the quantized model (quantized layers and the float parts,
    nothing else in memory), the artifact's manifest (``None`` without ``output``), the preflight
    prediction and the measured peak (process RSS above what it held before the call)."""

    model: nn.Module
    manifest: dict[str, Any] | None
    preflight: Any  # lowbit.ptq.preflight.Preflight
    peak_memory_bytes: int


def _refuse_unsupported(recipe: Recipe, model: nn.Module) -> None:
    from lowbit.ptq.distributed import world

    if recipe.rotation != "none":
        raise ModelError(
            f"rotation: {recipe.rotation} rotates every layer's weights before calibration, which onloading "
            "does not do yet; quantize the model in memory (lowbit.quantize)"
        )
    if recipe.activation_plan == "measured":
        raise ModelError(
            "activation_plan: measured runs the whole float model first, which onloading does not do; "
            "set the activation formats in the recipe, or quantize the model in memory"
        )
    if world()[1] > 1:
        raise ModelError("onloading runs in one process; torch.distributed calibration needs lowbit.quantize")
    if recipe.needs_calibration and any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()
    ):
        raise ModelError(
            "static activations fold BatchNorms into convolutions first, which onloading does not do; "
            "quantize this model in memory (lowbit.quantize)"
        )


def _data_free(model: nn.Module, recipe: Recipe, source: Onloader, progress: bool) -> dict[str, Any]:
    """Weight-only, data-free recipes: each layer's weight loaded, quantized as ``prepare`` would
    (``from_float``), freed; ``prepare`` then takes the packed weights."""
    import warnings

    from tqdm.auto import tqdm

    from lowbit.nn.layers import QUANTIZED_CLASSES
    from lowbit.ptq.checks import saturation
    from lowbit.ptq.pipeline import _release, _tied, trim_heap
    from lowbit.ptq.plan import Plan, plan_model

    layers = plan_model(model, recipe).layers
    tied = _tied(layers)
    weights: dict[str, Any] = {}
    for layer in tqdm(layers, desc="quantizing", unit="layer", disable=not progress, leave=False):
        source.load(layer.name)
        if layer.kind not in ("linear", "conv", "embedding"):
            continue  # RNNs: prepare quantizes them from the loaded weights
        found = saturation(Plan([layer]))
        if found and not recipe.allow_saturation:
            raise ModelError(
                f"{found[0]}; choose a format with a scale (int8, fp8_e4m3 ...) or set allow_saturation: true"
            )
        for message in found:
            warnings.warn(f"lowbit: {message}", stacklevel=3)
        assert layer.weight is not None
        qmodule = QUANTIZED_CLASSES[layer.kind].from_float(layer.module, layer.weight, name=layer.name)
        weights[layer.name] = qmodule.qweight
        del qmodule
        if layer.name not in tied:
            _release(layer)
        trim_heap()
    return weights


def quantize_checkpoint(
    checkpoint: str | Path,
    recipe: str | Recipe | dict[str, Any],
    calibration: Iterable[Any] | None = None,
    output: str | Path | None = None,
    *,
    max_memory: int | str | None = None,
    cache_bytes: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    report: bool = True,
    kernels: str = "reference",
    force: bool = False,
) -> QuantizedCheckpoint:
    """Quantize the Hugging Face checkpoint directory ``checkpoint`` (``config.json`` and safetensors
    shards) without loading the whole float model, and save the artifact to ``output``.

    The result is the artifact ``lowbit.save(lowbit.quantize(model, recipe, calibration,
    inplace=True), output)`` writes for the fully loaded model, byte for byte (module docstring).
    Before any work the predicted peak memory is printed to stderr (``report``; see
    ``lowbit.ptq.preflight``); ``max_memory`` (bytes, or ``"4GB"`` / ``"512MiB"``: the memory this
    call may add to what the process holds when it starts) refuses a run predicted above it with
    ``BudgetError`` naming the bytes needed, and sizes the activation cache (``cache_bytes``,
    default: what the budget leaves, the rest spills to disk) to fit. ``device`` is where the
    weights are loaded and the work runs. ``kernels`` picks what runs the returned model
    (``lowbit.backends.use_kernels``) after the artifact is written; the default ``"reference"``
    holds nothing more, ``"auto"`` adds the fast kernels' repacked copies of the weights (about
    twice the quantized bytes for int4; ``lowbit.load`` of the artifact chooses them as well).

    Refused before any work: a missing or truncated shard, a parameter absent from the checkpoint
    or of another shape (``CheckpointError`` naming the file), recipes that need the whole float
    model at once (rotations, a measured activation plan, data-aware output heads).

    >>> done = lowbit.quantize_checkpoint("llama-dir/", "int4-gptq", batches, "out/",
    ...     max_memory="4GB")  # doctest: +SKIP
    >>> done.preflight.peak_bytes <= 4e9, done.manifest["totals"]["bits_per_param"]  # doctest: +SKIP
    """
    from lowbit.api import data_aware_steps
    from lowbit.backends import use_kernels
    from lowbit.export.artifact import save
    from lowbit.export.atomic import ARTIFACT_MARKERS, _check_target
    from lowbit.ptq.checks import check_calibration
    from lowbit.ptq.convert import calibrate, convert, prepare
    from lowbit.ptq.pipeline import _max_rss, _rss, calibrate_weights, trim_heap
    from lowbit.ptq.plan import plan_model
    from lowbit.ptq.preflight import parse_bytes, predict
    from lowbit.recipes import resolve

    baseline, hwm_before = _rss(), _max_rss()
    recipe = resolve(recipe)
    budget = parse_bytes(max_memory) if max_memory is not None else None
    batches = list(calibration) if calibration is not None else None
    if output is not None:  # a directory in the way is refused now, not after the work
        _check_target(Path(output).expanduser().resolve(), ARTIFACT_MARKERS, "lowbit artifact", force)
    ckpt = Checkpoint(checkpoint)  # every shard's header: a missing or truncated file stops here
    model = build_skeleton(ckpt)
    _refuse_unsupported(recipe, model)
    steps = data_aware_steps(recipe)
    edges = recipe.embeddings_and_head != "recipe"
    if (steps or edges) and not batches:
        needs = ", ".join(steps) if steps else f"embeddings_and_head={recipe.embeddings_and_head!r}"
        raise DataError(f"{needs} needs calibration data: pass calibration=[batch, ...]")
    if recipe.needs_calibration and not batches:  # said now, not after every weight was read
        raise DataError(
            f"recipe {recipe.name!r} calibrates activations (static mode) and needs calibration data: "
            "pass calibration=[batch, ...]"
        )
    uses_data = bool(steps) or edges or recipe.needs_calibration
    if uses_data and batches:
        check_calibration(batches)
    plan = plan_model(model, recipe)
    # As lowbit.quantize: calibration reads every parameter, else only the quantized layers'.
    finite = ("",) if uses_data else tuple(layer.name for layer in plan.layers)
    source = Onloader(model, ckpt, torch.device(device), finite)
    preflight = predict(
        model, source, plan, recipe, batches or [], cache_bytes, budget, pipeline=bool(steps or edges)
    )
    if report:
        print(preflight.report(), file=sys.stderr)
    if budget is not None and preflight.peak_bytes > budget:
        raise BudgetError(preflight.refusal(budget))

    extra: dict[str, Any] = {}
    result = None
    if steps or edges:
        result = calibrate_weights(
            model, recipe, batches or [], progress=progress, cache_bytes=preflight.cache_bytes, source=source
        )
        recipe = result.recipe
        extra = {"weights": result.weights, "input_smooth": result.input_smooth}
        if report:
            for note in result.notes:
                print(f"lowbit: {note}", file=sys.stderr)
    else:
        extra = {"weights": _data_free(model, recipe, source, progress)}
    source.load("")  # what stays float in the artifact (norms, layers the recipe leaves out)
    trim_heap()
    qmodel = prepare(model, recipe, inplace=True, **extra)
    calibrate(qmodel, batches, progress=progress)  # static activations: on the quantized model
    convert(qmodel)
    if result is not None:
        result.weights, result.input_smooth = {}, {}
        qmodel.lowbit_calibration = result
    # Streamed to disk (the serialised file is not held in memory), and before the kernels are
    # chosen: they change no stored byte, and their repacked weights need not be there yet.
    manifest = save(qmodel, output, force=force, stream=True) if output is not None else None
    peaks = [s.peak_memory_bytes for s in result.stages] if result is not None else []
    peak = max([*peaks, _rss(), _max_rss() if _max_rss() > hwm_before else 0]) - baseline
    use_kernels(qmodel, kernels)
    return QuantizedCheckpoint(qmodel, manifest, preflight, peak)


__all__ = ["Onloader", "QuantizedCheckpoint", "build_skeleton", "empty_parameters", "quantize_checkpoint"]
