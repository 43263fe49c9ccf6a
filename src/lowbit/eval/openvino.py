"""OpenVINO as an optional runtime for lowbit's ONNX files (it runs QDQ graphs on its int8 kernels).

OpenVINO's CPU plugin runs float graphs in bf16 on CPUs with native bf16 unless told otherwise; the
benchmark asks for ``f32`` so its float row is the float model. Graphs with ONNX Runtime contrib ops
(``DynamicQuantizeMatMul``, ``MatMulNBits``) may not load; callers report that as a note.

>>> OpenVinoModel.available() in (True, False)
True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class OpenVinoModel:
    """A compiled OpenVINO model fed like ``lowbit.runtime.OrtModel`` (same feeds dict)."""

    backend = "openvino-cpu"

    def __init__(self, path: str | Path, threads: int, precision: str = "f32") -> None:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(path))
        config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads}
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.precision = precision

    @staticmethod
    def available() -> bool:
        try:
            import openvino  # noqa: F401
        except ImportError:
            return False
        return True

    def run_feeds(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.request.infer(feeds)
        return [np.asarray(result[out]) for out in self.compiled.outputs]

    def check(self, feeds: dict[str, Any]) -> None:
        """Run once: OpenVINO checks some shapes only at inference time."""
        self.run_feeds(feeds)
