"""Run an exported model in ONNX Runtime exactly like the PyTorch model: same inputs, torch outputs.

>>> import torch, lowbit, tempfile, os
>>> from lowbit.export.onnx import export_onnx
>>> q = lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(16, 4)), "int8-dynamic", progress=False)
>>> path = os.path.join(tempfile.mkdtemp(), "m.onnx")
>>> _ = export_onnx(q, path, torch.randn(2, 16))
>>> model = load(path)
>>> model(torch.randn(3, 16)).shape, model.backend
(torch.Size([3, 4]), 'onnxruntime-cpu')
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbit.export.onnx_inputs import rebuild

_NP_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
}


def default_threads() -> int:
    """Threads for one session: the cores this process may use (ORT's default counts all cores of
    the machine and oversubscribes containers and pinned processes).

    >>> default_threads() >= 1
    True
    """
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError("running exported models needs onnxruntime: pip install onnxruntime") from err
    return onnxruntime


class OrtModel:
    """An ONNX Runtime session called like the PyTorch module it was exported from.

    Inputs: tensors (positional, in the exported order), a list of images for a model exported from
    one (one graph input per element), keyword tensors, or one dict batch. Output: one tensor, a
    tuple when the graph has several outputs, or the model's list of dicts when it returned one
    (detectors); ``output_names`` are the flat graph outputs (``0.boxes``, ...). ``backend`` names what runs
    (``onnxruntime-cpu``); ``layers`` lists each quantized layer's kernel as export recorded it.
    """

    def __init__(
        self, path: str | Path, threads: int | None = None, optimization: str = "all", spin: bool = True
    ) -> None:
        ort = _import_ort()
        self.path = str(path)
        if not Path(self.path).is_file():
            raise ValueError(f"{self.path} does not exist; export a model first (lowbit export)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or default_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        levels = {
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        if optimization not in levels:
            raise ValueError(f"optimization must be one of {sorted(levels)}, got {optimization!r}")
        options.graph_optimization_level = levels[optimization]
        options.log_severity_level = 3  # errors only: ORT's notes on unused initializers are noise here
        if not spin:  # on a shared machine, spinning workers steal time from other processes
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        self.threads = options.intra_op_num_threads
        self.input_names = [i.name for i in self.session.get_inputs()]
        self._input_types = {i.name: _NP_TYPES.get(i.type, np.float32) for i in self.session.get_inputs()}
        meta = self.session.get_modelmeta().custom_metadata_map
        self.layers: list[dict[str, Any]] = json.loads(meta.get("lowbit.layers", "[]"))
        self.output_names = [o.name for o in self.session.get_outputs()]
        # Set when the model returned a list (a detector's ``[{"boxes", "scores", ...}]``).
        self._structure = json.loads(meta["lowbit.outputs"]) if "lowbit.outputs" in meta else None
        self.backend = "onnxruntime-cpu"

    def feeds(self, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        """The ORT input dict for a PyTorch-style call (what ``__call__`` passes to the session)."""
        # Any mapping: a transformers ``BatchEncoding`` is a ``UserDict``, not a ``dict``.
        if len(args) == 1 and isinstance(args[0], Mapping) and not kwargs:
            kwargs, args = dict(args[0]), ()
        # A list of images (detectors) stands for one graph input per element.
        args = tuple(a for arg in args for a in (arg if isinstance(arg, list | tuple) else (arg,)))
        if len(args) > len(self.input_names):
            raise ValueError(f"got {len(args)} inputs, the exported model takes {self.input_names}")
        named = dict(zip(self.input_names, args, strict=False))
        named.update(kwargs)
        missing = [n for n in self.input_names if n not in named]
        if missing:
            raise ValueError(f"missing inputs {missing}; the exported model takes {self.input_names}")
        out = {}
        for name in self.input_names:
            value = named[name]
            array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            out[name] = array.astype(self._input_types[name], copy=False)
        return out

    def run_feeds(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run on prepared feeds (no conversion: what benchmarks time)."""
        return self.session.run(None, feeds)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        outs = [torch.from_numpy(o) for o in self.run_feeds(self.feeds(*args, **kwargs))]
        if self._structure is not None:
            return rebuild(self._structure, outs)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def __repr__(self) -> str:
        return f"OrtModel({self.path!r}, threads={self.threads}, backend={self.backend!r})"


def load(
    path: str | Path, threads: int | None = None, optimization: str = "all", spin: bool = True
) -> OrtModel:
    """Open an exported ``.onnx`` file (or a directory holding ``model.onnx``) for inference.

    >>> load("/no/such/model.onnx")
    Traceback (most recent call last):
    ...
    ValueError: /no/such/model.onnx does not exist; export a model first (lowbit export)
    """
    p = Path(path)
    if p.is_dir():
        p = p / "model.onnx"
    return OrtModel(p, threads=threads, optimization=optimization, spin=spin)
