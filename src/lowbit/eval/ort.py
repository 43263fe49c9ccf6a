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


def export_float(float_model: nn.Module, batch: Any, path: Path) -> str | None:
    """Export ``float_model`` to ``path`` once, for several ``ort_latency(..., float_onnx=path)``
    calls; returns the one-line error instead when it does not export.

    >>> import tempfile, torch
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     export_float(torch.nn.Linear(4, 2), torch.randn(3, 4), Path(tmp) / "f.onnx") is None
    True
    """
    from lowbit.export.onnx import export_onnx

    args, kwargs = _as_args(batch)
    try:
        # For a model with no quantized layer, torch's exporter warns about the unused custom
        # opset on fd 2; a failure's message below says what failed, in one line.
        with _quiet_native_stderr():
            export_onnx(float_model, path, kwargs if kwargs else args)
    except Exception as err:  # export support differs per model; report it, do not crash a table
        return _one_line(err)
    return None


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0][:300]


def ort_latency(
    float_model: nn.Module,
    qmodel: nn.Module,
    batch: Any,
    repeats: int = 20,
    warmup: int = 3,
    openvino: bool = False,
    float_onnx: Path | None = None,
) -> dict[str, Any] | None:
    """ORT milliseconds (medians, interleaved) of the float and quantized exports on ``batch``.

    Returns ``None`` without ONNX support, ``{"error": ...}`` when export fails (the message says
    which layer), else ``float_ms``, ``quant_ms``, ``speedup``, ``backend``, ``kernels`` (count per
    ONNX kernel of the quantized layers) and ``onnx_bytes``. ``float_onnx``: the float model already
    exported on this batch by ``export_float`` (a bench timing many variants of one model); with
    ``qmodel is float_model`` that file is timed against itself.
    """
    if not available():
        return None
    from lowbit.export.onnx import export_onnx
    from lowbit.runtime import load

    args, kwargs = _as_args(batch)
    with tempfile.TemporaryDirectory(prefix="lowbit-ort-") as tmp:
        float_path = Path(float_onnx) if float_onnx is not None else Path(tmp) / "float.onnx"
        quant_path = Path(tmp) / "quant.onnx"
        kernels: dict[str, int] = {}
        if float_onnx is None and (error := export_float(float_model, batch, float_path)):
            return {"error": error}
        try:
            if qmodel is float_model:
                quant_path = float_path
            else:
                report = export_onnx(qmodel, quant_path, kwargs if kwargs else args)
                kernels = dict(Counter(layer.kernel for layer in report.layers))
            # No spinning worker threads: they would keep burning the cores and slow whatever is
            # timed next (PyTorch rows included).
            sessions = [load(float_path, spin=False), load(quant_path, spin=False)]
        except Exception as err:  # export support differs per format; report it, do not crash a table
            return {"error": _one_line(err)}
        feeds = [s.feeds(*args, **kwargs) for s in sessions]
        f_times, q_times = interleaved_ms(
            [lambda: sessions[0].run_feeds(feeds[0]), lambda: sessions[1].run_feeds(feeds[1])],
            repeats=repeats,
            warmup=warmup,
        )
        ov = (
            _openvino_latency((float_path, quant_path), feeds, sessions[1].threads, repeats, warmup)
            if openvino
            else None
        )
        onnx_bytes = quant_path.stat().st_size
    float_ms, quant_ms = statistics.median(f_times), statistics.median(q_times)
    noise = max(spread(f_times), spread(q_times))
    return {
        "backend": f"{sessions[1].backend} ({', '.join(f'{k} x{n}' for k, n in kernels.items()) or 'float'})",
        "float_ms": float_ms,
        "quant_ms": quant_ms,
        "speedup": float_ms / quant_ms if quant_ms > 0 else None,
        "kernels": kernels,
        "onnx_bytes": onnx_bytes,
        "threads": sessions[1].threads,
        "repeats": len(f_times),
        "spread": noise,
        "noisy": noise > NOISY_SPREAD,
        **({"openvino": ov} if ov is not None else {}),
    }


def _openvino_latency(
    paths: tuple[Path, Path], feeds: list[dict[str, Any]], threads: int, repeats: int, warmup: int
) -> dict[str, Any] | None:
    """OpenVINO medians of the float and quantized ONNX files (``None`` when not installed)."""
    from lowbit.eval.openvino import OpenVinoModel

    if not OpenVinoModel.available():
        return None
    try:
        models = [OpenVinoModel(path, threads) for path in paths]
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
