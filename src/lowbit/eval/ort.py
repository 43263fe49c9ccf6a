"""Optional ONNX Runtime latency: export float and quantized model, time both sessions interleaved.

This is where a quantized model can really be faster: ONNX Runtime runs lowbit's codes with integer
kernels (``lowbit.export.onnx``). The float model is exported and timed the same way in the same
run, so the speed-up compares ORT with ORT. Returns ``None`` when ONNX support is not installed.

>>> import torch, lowbit
>>> m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
>>> q = lowbit.quantize(m, "int8-dynamic", progress=False)
>>> r = ort_latency(m, q, torch.randn(8, 64), repeats=3)
>>> r is None or sorted(r)[:3] == ["backend", "float_ms", "kernels"]
True
"""

from __future__ import annotations

import contextlib
import io
import os
import statistics
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from lowbit.eval.latency import NOISY_SPREAD, interleaved_ms, spread


def available() -> bool:
    """Whether lowbit's ONNX export and runtime (and onnxruntime itself) can be imported.

    >>> isinstance(available(), bool)
    True
    """
    try:
        import onnxruntime  # noqa: F401

        import lowbit.export.onnx  # noqa: F401
        import lowbit.runtime  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence C++ warnings written straight to file descriptor 2 (the TorchScript exporter warns
    about the unused custom opset of a model with no quantized layer); Python errors still raise."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _as_args(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(batch, dict):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def ort_latency(
    float_model: nn.Module,
    qmodel: nn.Module,
    batch: Any,
    repeats: int = 20,
    warmup: int = 3,
    openvino: bool = False,
) -> dict[str, Any] | None:
    """ORT milliseconds (medians, interleaved) of the float and quantized exports on ``batch``.

    Returns ``None`` without ONNX support, ``{"error": ...}`` when export fails (the message says
    which layer), else ``float_ms``, ``quant_ms``, ``speedup``, ``backend``, ``kernels`` (count per
    ONNX kernel of the quantized layers) and ``onnx_bytes``.
    """
    if not available():
        return None
    from lowbit.export.onnx import export_onnx
    from lowbit.runtime import load

    args, kwargs = _as_args(batch)
    example = kwargs if kwargs else args
    with tempfile.TemporaryDirectory(prefix="lowbit-ort-") as tmp:
        try:
            # torch's exporter prints the whole IR graph to stdout when it fails (a detector's
            # data-dependent NMS): the error message below says what failed, in one line.
            with _quiet_native_stderr(), contextlib.redirect_stdout(io.StringIO()):
                export_onnx(float_model, Path(tmp) / "float.onnx", example)
            with contextlib.redirect_stdout(io.StringIO()):
                report = export_onnx(qmodel, Path(tmp) / "quant.onnx", example)
            # No spinning worker threads: they would keep burning the cores and slow whatever is
            # timed next (PyTorch rows included).
            sessions = [
                load(Path(tmp) / "float.onnx", spin=False),
                load(Path(tmp) / "quant.onnx", spin=False),
            ]
        except Exception as err:  # export support differs per format; report it, do not crash a table
            return {"error": f"{type(err).__name__}: {err}".splitlines()[0][:300]}
        feeds = [s.feeds(*args, **kwargs) for s in sessions]
        f_times, q_times = interleaved_ms(
            [lambda: sessions[0].run_feeds(feeds[0]), lambda: sessions[1].run_feeds(feeds[1])],
            repeats=repeats,
            warmup=warmup,
        )
        ov = _openvino_latency(Path(tmp), feeds, sessions[1].threads, repeats, warmup) if openvino else None
    float_ms, quant_ms = statistics.median(f_times), statistics.median(q_times)
    noise = max(spread(f_times), spread(q_times))
    kernels = dict(Counter(layer.kernel for layer in report.layers))
    return {
        "backend": f"{sessions[1].backend} ({', '.join(f'{k} x{n}' for k, n in kernels.items()) or 'float'})",
        "float_ms": float_ms,
        "quant_ms": quant_ms,
        "speedup": float_ms / quant_ms if quant_ms > 0 else None,
        "kernels": kernels,
        "onnx_bytes": report.file_bytes,
        "threads": sessions[1].threads,
        "repeats": len(f_times),
        "spread": noise,
        "noisy": noise > NOISY_SPREAD,
        **({"openvino": ov} if ov is not None else {}),
    }


def _openvino_latency(
    folder: Path, feeds: list[dict[str, Any]], threads: int, repeats: int, warmup: int
) -> dict[str, Any] | None:
    """OpenVINO medians of ``folder``'s float.onnx and quant.onnx (``None`` when not installed)."""
    from lowbit.eval.openvino import OpenVinoModel

    if not OpenVinoModel.available():
        return None
    try:
        models = [
            OpenVinoModel(folder / "float.onnx", threads),
            OpenVinoModel(folder / "quant.onnx", threads),
        ]
        for model, feed in zip(models, feeds, strict=True):
            model.check(feed)
    except Exception as err:  # OpenVINO refusing a graph (contrib ops) is a finding, not a crash
        return {"error": (str(err).strip().splitlines() or [type(err).__name__])[-1][:200]}
    f_times, q_times = interleaved_ms(
        [lambda: models[0].run_feeds(feeds[0]), lambda: models[1].run_feeds(feeds[1])],
        repeats=repeats,
        warmup=warmup,
    )
    float_ms, quant_ms = statistics.median(f_times), statistics.median(q_times)
    noise = max(spread(f_times), spread(q_times))
    return {
        "backend": f"{OpenVinoModel.backend} ({models[1].precision})",
        "float_ms": float_ms,
        "quant_ms": quant_ms,
        "speedup": float_ms / quant_ms if quant_ms > 0 else None,
        "repeats": len(f_times),
        "spread": noise,
        "noisy": noise > NOISY_SPREAD,
    }
