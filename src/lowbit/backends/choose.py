"""Pick each quantized layer's kernel on *this* machine: measured once, cached, reported.

For every layer, the registered backends that can run it exactly as its recipe says are the
candidates (``lowbit.backends.registry``). The first time a (backend, layer shape, format) meets a
machine, a short micro-benchmark times it at batch 1 and batch 32 and measures its relative output
error against the reference path on a random probe; the result is cached in
``<cache dir>/kernels/<machine key>.json``, keyed by CPU features, torch version and thread count,
so later runs choose without timing anything. The fastest candidate within its tolerance wins if it
beats the reference path; otherwise the layer keeps the reference path and says why.

>>> import torch, lowbit
>>> q = lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(64, 64)), "int8-dynamic", progress=False)
>>> choices = use_kernels(q, "reference")
>>> q[0].backend, choices[0].backend
('reference', 'reference')
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.backends.base import Backend
from lowbit.backends.registry import BACKENDS, by_name
from lowbit.doctor import CpuFeatures, cpu_features

PROBE_BATCHES = (1, 32)  # rows of the micro-benchmark: decode (1 token) and a batch
CONV_PROBE_BATCHES = (1, 8)  # images: one, and a small batch (whole feature maps are large)
CONV_PROBE_SIZE = 32  # spatial size per dim for a conv that never saw an input (e.g. just loaded)
PROBE_REPEATS = 7
CACHE_VERSION = 1
POLICIES = ("auto", "reference")


@dataclass
class KernelChoice:
    """What one layer runs and why."""

    layer: str
    kind: str
    backend: str
    reason: str = ""  # why not faster (no candidate, slower than reference, too inaccurate)
    timings_ms: dict[str, list[float]] = field(default_factory=dict)  # backend -> ms per probe batch
    errors: dict[str, float] = field(default_factory=dict)  # backend -> relative error vs reference

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@functools.cache
def _code_digest() -> str:
    """Digest of the backends' own source: a changed kernel is measured again, not read from a
    cache another lowbit version (or branch) wrote."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*")):
        if path.suffix in (".py", ".cpp", ".h") and path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def machine_key(cpu: CpuFeatures | None = None) -> str:
    """What a cached timing depends on: CPU features, torch version, thread count, kernel code.

    >>> len(machine_key()) == 16
    True
    """
    cpu = cpu or cpu_features()
    parts = [asdict(cpu), torch.__version__, torch.get_num_threads(), _code_digest()]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _cache_path() -> Path:
    from lowbit.zoo.cache import cache_dir

    return cache_dir() / "kernels" / f"{machine_key()}.json"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def _write_cache(path: Path, entries: dict[str, Any]) -> None:
    """Merge ``entries`` into the cache file under a lock, atomically (a reader never sees half)."""
    from filelock import FileLock

    from lowbit.zoo.cache import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        merged = {**_read_cache(path), **entries}
        payload = {"version": CACHE_VERSION, "machine": asdict(cpu_features()), "entries": merged}
        atomic_write(path, json.dumps(payload, indent=1, sort_keys=True).encode())


def _shape_key(backend: Backend, layer: Any) -> str:
    qw = layer.qweight
    aq = layer.input_quant
    act = "none" if aq is None else f"{aq.spec.mode}-{aq.granularity}"
    key = f"{backend.name}|{qw.fmt.name}|{qw.granularity}|{'x'.join(map(str, qw.shape))}|{act}"
    if layer.kind == "conv":  # a conv's cost depends on its geometry and input size too
        c = layer.config
        geometry = [c["kernel_size"], c["stride"], c["padding"], c["dilation"], c["groups"]]
        key += f"|{json.dumps(geometry)}|{'x'.join(map(str, _probe_shape(layer, 1)[2:]))}"
    return key


def _probe_shape(layer: Any, rows: int) -> tuple[int, ...]:
    """The input of the micro-benchmark: ``rows`` tokens for a linear layer; for a conv, ``rows``
    images at the size it last ran at (calibration), else ``CONV_PROBE_SIZE`` per spatial dim."""
    if layer.kind != "conv":
        return (rows, layer.qweight.shape[1])
    c = layer.config
    size = getattr(layer, "last_input_size", None) or (CONV_PROBE_SIZE,) * len(c["kernel_size"])
    return (rows, c["in_channels"], *size)


def _probe_batches(layer: Any) -> tuple[int, ...]:
    return CONV_PROBE_BATCHES if layer.kind == "conv" else PROBE_BATCHES


def _median_ms(fn: Any, x: torch.Tensor) -> float:
    # CUDA launches are asynchronous: wait for each call, or the timing is the launch alone.
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with torch.inference_mode():
        for _ in range(2):
            fn(x)
        times = []
        for _ in range(PROBE_REPEATS):
            sync()
            start = time.perf_counter()
            fn(x)
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _reference(layer: Any) -> Any:
    """The layer's reference forward (kernel ignored), bias included."""
    return layer.reference_forward


def _with_bias(layer: Any, kernel: Any) -> Any:
    """The kernel's output with the layer's bias, as ``run_kernel`` adds it (unless fused)."""

    def run(x: torch.Tensor) -> torch.Tensor:
        y = kernel(_smoothed(layer, x))
        if layer.bias is None or getattr(kernel, "fuses_bias", False):
            return y
        return y + layer._broadcast_smooth(layer.bias, y)  # bias per channel, laid out as smoothing

    return run


def _smoothed(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """What the kernel computes on: the input rotated and smoothed as ``run_kernel`` does."""
    rotation = getattr(layer, "input_rotation", None)
    if rotation is not None:
        x = rotation(x)
    smooth = getattr(layer, "input_smooth", None)
    return x if smooth is None else x / layer._broadcast_smooth(smooth, x)


def measure(backend: Backend, layer: Any) -> dict[str, Any]:
    """Time ``backend`` and the reference path on ``layer`` and measure the backend's relative RMS
    error against the reference on a random probe (one fresh kernel, freed afterwards)."""
    device = layer.qweight.packed.device
    kernel = backend.prepare(layer)  # type: ignore[misc]
    batches = _probe_batches(layer)
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(_probe_shape(layer, batches[-1]), generator=generator).to(device)
    fast = _with_bias(layer, kernel)
    with torch.inference_mode():
        ref = _reference(layer)(probe).float()
        got = fast(probe).float()
        if layer.bias is not None:  # the error is measured on the product alone, bias excluded
            bias = layer._broadcast_smooth(layer.bias.float(), ref)
            ref, got = ref - bias, got - bias
        error = float((got - ref).norm() / ref.norm().clamp_min(1e-12))
    times, ref_times = [], []
    for rows in batches:
        x = probe[:rows].contiguous()
        times.append(_median_ms(fast, x))
        ref_times.append(_median_ms(_reference(layer), x))
    return {"ms": times, "reference_ms": ref_times, "error": error if math.isfinite(error) else 1e9}


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(max(v, 1e-9)) for v in values) / len(values))


def choose(layer: Any, name: str, cache: dict[str, Any], fresh: dict[str, Any]) -> KernelChoice:
    """The best backend for one layer (measuring what the cache lacks into ``fresh``)."""
    cpu = cpu_features()
    choice = KernelChoice(name, layer.kind, "reference")
    reasons = []
    candidates: list[tuple[float, Backend]] = []
    reference_ms: list[float] | None = None
    for backend in BACKENDS:
        if backend.kind != layer.kind:
            continue
        why = backend.reason_not(layer, cpu)
        if why:
            reasons.append(f"{backend.name}: {why}")
            continue
        key = _shape_key(backend, layer)
        entry = cache.get(key) or fresh.get(key)
        if entry is None:
            try:
                entry = measure(backend, layer)
            except (RuntimeError, NotImplementedError) as err:  # a kernel this build cannot run
                entry = {"ms": [], "reference_ms": [], "error": 1e9, "failed": str(err).splitlines()[0][:200]}
            fresh[key] = entry
        if entry.get("failed"):
            reasons.append(f"{backend.name}: failed here ({entry['failed']})")
            continue
        choice.timings_ms[backend.name] = entry["ms"]
        choice.errors[backend.name] = round(entry["error"], 6)
        reference_ms = entry["reference_ms"]
        if entry["error"] > backend.tolerance:
            reasons.append(f"{backend.name}: error {entry['error']:.3g} > tolerance {backend.tolerance}")
            continue
        candidates.append((_geomean(entry["ms"]), backend))
    if reference_ms is not None:
        choice.timings_ms["reference"] = reference_ms
    if not candidates:
        choice.reason = "; ".join(reasons) or "no backend runs this layer kind"
        return choice
    best_ms, best = min(candidates, key=lambda c: c[0])
    if reference_ms is not None and best_ms >= _geomean(reference_ms):
        choice.reason = f"{best.name} is not faster than the reference path here"
        return choice
    choice.backend = best.name
    return choice


def use_kernels(model: nn.Module, policy: str = "auto") -> list[KernelChoice]:
    """Give every quantized layer of ``model`` the fastest accurate kernel on this machine.

    ``policy``: ``"auto"`` (measure, cache, choose), ``"reference"`` (drop every kernel: the
    dequantize + float path), or a backend name (that backend wherever it can run, the reference
    path elsewhere; no timing). Returns one ``KernelChoice`` per quantized layer; each layer's
    ``backend`` attribute names what it runs. Set ``LOWBIT_KERNELS=reference`` to make ``auto``
    choose the reference path everywhere (e.g. to compare numerics).

    >>> import torch, lowbit
    >>> q = lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(64, 64)), "int8-dynamic", progress=False)
    >>> [c.backend for c in use_kernels(q, "torch-int-mm")]
    ['torch-int-mm']
    """
    from lowbit.nn.base import QuantizedModule

    if policy == "auto" and os.environ.get("LOWBIT_KERNELS", "").strip() == "reference":
        policy = "reference"
    forced = None if policy in POLICIES else by_name(policy)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedModule)]
    choices: list[KernelChoice] = []
    cache: dict[str, Any] = {}
    fresh: dict[str, Any] = {}
    if policy == "auto":
        cache = _read_cache(_cache_path())
    cpu = cpu_features()
    for name, layer in layers:
        layer.set_kernel(None)
        if layer.kind == "embedding":  # a packed row lookup already: nothing to choose
            choices.append(KernelChoice(name, layer.kind, layer.backend, "lookups read packed rows"))
            continue
        if policy == "reference" or not hasattr(layer, "qweight"):
            why = "" if policy == "reference" else "no kernel for this layer kind"
            choices.append(KernelChoice(name, layer.kind, "reference", why))
            continue
        if forced is not None:
            why = forced.reason_not(layer, cpu)
            choice = KernelChoice(name, layer.kind, "reference" if why else forced.name, why or "")
        else:
            choice = choose(layer, name, cache, fresh)
        if choice.backend != "reference":
            layer.set_kernel(by_name(choice.backend).prepare(layer))  # type: ignore[misc]
        choices.append(choice)
    if fresh:
        try:
            _write_cache(_cache_path(), fresh)
        except OSError:
            pass  # a read-only cache only costs re-measuring next time
    model.lowbit_kernels = choices
    return choices


def backend_table(cpu: CpuFeatures | None = None) -> list[dict[str, str]]:
    """Every registered backend: kind, whether it runs on ``cpu`` (``yes`` or why not), numerics.

    >>> rows = backend_table()
    >>> sorted(rows[0])
    ['available', 'description', 'kind', 'name', 'numerics']
    """
    cpu = cpu or cpu_features()
    return [
        {
            "name": b.name,
            "kind": b.kind,
            "available": b.unavailable(cpu) or "yes",
            "numerics": b.numerics,
            "description": b.description,
        }
        for b in BACKENDS
    ]


def kernel_summary(choices: list[KernelChoice]) -> str:
    """One line: how many layers run each backend.

    >>> kernel_summary([KernelChoice("a", "linear", "torch-int-mm"), KernelChoice("b", "conv", "reference")])
    'kernels: torch-int-mm x1, reference x1'
    """
    counts: dict[str, int] = {}
    for c in choices:
        counts[c.backend] = counts.get(c.backend, 0) + 1
    return "kernels: " + ", ".join(f"{k} x{v}" for k, v in counts.items())
