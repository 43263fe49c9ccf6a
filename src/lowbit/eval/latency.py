"""Latency, measured honestly: median of repeats, float baseline in the same run, backend named.

The float and the quantized model are timed *interleaved* (float, quantized, float, ...), so a
machine that gets busier halfway through slows both alike instead of flattering one of them.

A quantized layer's ``backend`` says which code path ran. The reference path (dequantize the
weight, then the float op) is a simulation of the arithmetic, not a kernel: its speed-up is never
reported (``speedup is None``), whatever the stopwatch says, and its label says what it is.

>>> import torch, lowbit
>>> model = torch.nn.Sequential(torch.nn.Linear(32, 32))
>>> q = lowbit.quantize(model, "int8-weight-only", progress=False)
>>> r = compare_latency(model, q, torch.randn(4, 32), repeats=3)
>>> r.backend, r.speedup
('pytorch-reference (dequantize+float)', None)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lowbit.nn.base import QuantizedModule
from lowbit.ptq.convert import model_device, to_device
from lowbit.zoo.base import call_model

FLOAT_BACKEND = "pytorch-float32"
REFERENCE_BACKEND = "pytorch-reference (dequantize+float)"
# Backend attribute of a quantized layer -> what users see. Backends not listed are shown as
# "pytorch (<name>)"; anything other than "reference" counts as a real kernel (lowbit.backends).
LOOKUP_BACKEND = "pytorch (packed row lookup)"
BACKEND_LABELS = {"reference": REFERENCE_BACKEND, "packed-lookup": LOOKUP_BACKEND}
# Relative interquartile range above which a timing is flagged as noisy in reports.
NOISY_SPREAD = 0.25


def backend_of(model: nn.Module) -> str:
    """Which execution path ``model`` runs: float, the reference simulation, or named kernels.

    >>> backend_of(torch.nn.Linear(2, 2))
    'pytorch-float32'
    """
    backends = sorted({m.backend for m in model.modules() if isinstance(m, QuantizedModule)})
    if not backends:
        return FLOAT_BACKEND
    return " + ".join(BACKEND_LABELS.get(b, f"pytorch ({b})") for b in backends)


def is_real_kernel(backend: str) -> bool:
    """Whether a speed-up measured on ``backend`` may be reported: at least one compute layer runs
    a real kernel. Layers left on the reference path only slow a model down, so a model mixing
    both is timed honestly; a model whose compute is all reference (or float) never gets one.

    >>> is_real_kernel(REFERENCE_BACKEND), is_real_kernel("onnxruntime (MatMulInteger)")
    (False, True)
    >>> is_real_kernel(f"{LOOKUP_BACKEND} + {REFERENCE_BACKEND}")  # quantized embeddings alone
    False
    """
    not_compute = (REFERENCE_BACKEND, FLOAT_BACKEND, LOOKUP_BACKEND)
    return any(part not in not_compute and "reference" not in part for part in backend.split(" + "))


@dataclass
class Latency:
    """Median milliseconds per call of the float and the quantized model on one batch."""

    float_ms: float
    quant_ms: float
    backend: str  # what ran for the quantized model
    float_backend: str
    repeats: int
    threads: int
    device: str
    batch: str  # shape of the timed batch, for the record
    spread: float = 0.0  # the larger relative interquartile range of the two timings

    @property
    def noisy(self) -> bool:
        """Timings too scattered to trust (a busy machine): reports flag them."""
        return self.spread > NOISY_SPREAD

    @property
    def ratio(self) -> float:
        """float time / quantized time, as measured (> 1 means the quantized model took less time)."""
        return self.float_ms / self.quant_ms if self.quant_ms > 0 else float("nan")

    @property
    def speedup(self) -> float | None:
        """The speed-up, only when a real kernel ran; ``None`` for the reference simulation."""
        return self.ratio if is_real_kernel(self.backend) else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        d["speedup"] = self.speedup
        d["noisy"] = self.noisy
        return d


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], Any], repeats: int = 20, warmup: int = 3, device: str = "cpu") -> float:
    """Median wall-clock milliseconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls.

    >>> median_ms(lambda: None, repeats=3) >= 0
    True
    """
    dev = torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(repeats, 1)):
        _sync(dev)
        start = time.perf_counter()
        fn()
        _sync(dev)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def _describe(batch: Any) -> str:
    if isinstance(batch, torch.Tensor):
        return "x".join(str(s) for s in batch.shape)
    if isinstance(batch, dict):
        return ", ".join(f"{k}={_describe(v)}" for k, v in batch.items())
    if isinstance(batch, (tuple, list)):
        return "(" + ", ".join(_describe(v) for v in batch) + ")"
    return type(batch).__name__


def spread(times: list[float]) -> float:
    """Interquartile range relative to the median: how noisy a set of timings is.

    >>> spread([1.0, 1.0, 1.0, 1.0]), round(spread([1.0, 2.0, 3.0, 4.0]), 2)
    (0.0, 1.0)
    """
    if len(times) < 4:
        return 0.0
    q = statistics.quantiles(times, n=4)
    med = statistics.median(times)
    return (q[2] - q[0]) / med if med > 0 else 0.0


def interleaved_ms(
    fns: list[Callable[[], Any]],
    repeats: int = 20,
    warmup: int = 3,
    min_seconds: float = 0.5,
    max_repeats: int = 2000,
    sync: Callable[[], None] = lambda: None,
) -> list[list[float]]:
    """Milliseconds of every call of each ``fns[i]``, called in turn (0, 1, 0, 1, ...).

    At least ``repeats`` rounds, and more (up to ``max_repeats``) until ``min_seconds`` of timed
    calls have passed: fast models get many samples, so one scheduler hiccup on a busy machine
    cannot decide their median.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    spent = 0.0
    rounds = 0
    while rounds < max(repeats, 1) or (spent < min_seconds * 1000.0 and rounds < max_repeats):
        for fn, out in zip(fns, times, strict=True):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            out.append((time.perf_counter() - start) * 1000.0)
            spent += out[-1]
        rounds += 1
    return times


def compare_latency(
    float_model: nn.Module,
    qmodel: nn.Module,
    batch: Any,
    repeats: int = 20,
    warmup: int = 3,
    min_seconds: float = 0.5,
) -> Latency:
    """Time ``float_model`` and ``qmodel`` on ``batch``, interleaved; medians of at least ``repeats``
    calls each (more for fast models, see ``interleaved_ms``)."""
    fdev, qdev = model_device(float_model), model_device(qmodel)
    fbatch, qbatch = to_device(batch, fdev), to_device(batch, qdev)

    def sync() -> None:
        _sync(fdev)
        _sync(qdev)

    with torch.no_grad():
        f_times, q_times = interleaved_ms(
            [lambda: call_model(float_model, fbatch), lambda: call_model(qmodel, qbatch)],
            repeats=repeats,
            warmup=warmup,
            min_seconds=min_seconds,
            sync=sync,
        )
    return Latency(
        float_ms=statistics.median(f_times),
        quant_ms=statistics.median(q_times),
        backend=backend_of(qmodel),
        float_backend=backend_of(float_model),
        repeats=len(f_times),
        threads=torch.get_num_threads(),
        device=str(qdev),
        batch=_describe(batch),
        spread=max(spread(f_times), spread(q_times)),
    )
