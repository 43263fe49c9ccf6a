"""``export_onnx``: a quantized model as an ONNX graph that ONNX Runtime runs with integer kernels.

How: every quantized Linear / Conv / Embedding is swapped for a marker that runs the reference
computation while PyTorch traces (so shapes are right) and exports as a single ``lowbit::Layer``
node. The float rest of the model is exported by PyTorch's TorchScript exporter. Each marker is
then replaced by nodes built from lowbit's own codes and scales (``lowbit.export.onnx_lower``),
so ONNX Runtime computes what lowbit's quantized model computes. LSTM / GRU layers are exported as
ONNX's float recurrent ops on the dequantized weights and reported as such.

>>> import torch, lowbit, tempfile, os
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
>>> q = lowbit.quantize(model, "int8-dynamic", progress=False)
>>> path = os.path.join(tempfile.mkdtemp(), "m.onnx")
>>> report = export_onnx(q, path, (torch.randn(2, 64),))
>>> [layer.kernel for layer in report.layers]
['MatMulIntegerToFloat', 'MatMulIntegerToFloat']
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import helper
from torch import nn

from lowbit.export import onnx_check
from lowbit.export.onnx_check import trace_subnormals
from lowbit.export.onnx_inputs import CallAdapter, CallSpec, flat_outputs, output_structure
from lowbit.export.onnx_lower import (
    MS,
    Builder,
    ExportOptions,
    Kernel,
    choose_kernel,
    lower_conv,
    lower_dynamic_group,
    lower_embedding,
    lower_linear,
)
from lowbit.modelcheck import require_module
from lowbit.nn.base import QuantizedModule
from lowbit.nn.layers import QuantizedConv, QuantizedEmbedding, QuantizedLinear, QuantizedRNN

OPSET = 17
# Ops whose arithmetic is integer (or integer weights unpacked inside the kernel).
INTEGER_OPS = frozenset(
    {
        "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger", "MatMulNBits", "QLinearConv",
        "QLinearMatMul", "ConvInteger", "QGemm", "QAttention", "DynamicQuantizeLSTM", "QLinearAdd",
    }
)  # fmt: skip
# Float ops that do the heavy lifting (what should have become integer, if anything).
FLOAT_COMPUTE_OPS = frozenset(
    {"MatMul", "Gemm", "Conv", "LSTM", "GRU", "RNN", "Attention", "FusedMatMul", "FusedConv", "FusedGemm"}
)


@dataclass
class LayerExport:
    """How one quantized layer was exported."""

    name: str
    kind: str
    kernel: str
    precision: str
    storage_only: bool = False
    note: str = ""


@dataclass
class ExportReport:
    """What ``export_onnx`` wrote: per-layer kernels, op counts, bytes.

    ``fallbacks`` lists the layers ORT computes in float (storage-only formats, float recurrent ops);
    they are never reported as integer-accelerated.
    """

    path: str
    layers: list[LayerExport] = field(default_factory=list)
    op_counts: dict[str, int] = field(default_factory=dict)
    file_bytes: int = 0
    u8u8: bool = False
    warnings: list[str] = field(default_factory=list)
    fusions: dict[str, int] = field(default_factory=dict)
    # ORT vs PyTorch on the example and a perturbed copy (``lowbit.export.onnx_check``).
    check: dict[str, Any] = field(default_factory=dict)

    @property
    def fallbacks(self) -> list[LayerExport]:
        return [layer for layer in self.layers if layer.precision == "float"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "file_bytes": self.file_bytes,
            "u8u8": self.u8u8,
            "op_counts": dict(self.op_counts),
            "fusions": dict(self.fusions),
            "layers": [asdict(layer) for layer in self.layers],
            "warnings": list(self.warnings),
            "check": dict(self.check),
        }

    def to_text(self) -> str:
        lines = [f"exported {self.path} ({self.file_bytes / 1e6:.2f} MB)"]
        by_kernel = Counter(f"{layer.kernel} ({layer.precision})" for layer in self.layers)
        lines += [f"  {count:3d} x {kernel}" for kernel, count in by_kernel.most_common()]
        for layer in self.fallbacks:
            tag = "storage-only" if layer.storage_only else "float"
            lines.append(f"  {tag}: {layer.name}: {layer.note}")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


class _LayerOp(torch.autograd.Function):
    """Runs the quantized layer while tracing; exports as one ``lowbit::Layer`` node."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, index: int, marker: _Marker, raw: torch.Tensor | None = None
    ) -> torch.Tensor:
        # Run the reference layer untraced: only its output matters, the exported node is ours.
        # ``raw``: the layer's own input when ``x`` is it already rotated (the layer rotates itself).
        state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        try:
            out = marker.layer[0](x if raw is None else raw)
        finally:
            torch._C._set_tracing_state(state)
        marker.out_shape = tuple(out.shape)
        # A layer called more than once (a detector's loop over images) has one shape per input.
        marker.shapes[tuple(x.shape)] = tuple(out.shape)
        return out

    @staticmethod
    def symbolic(g: Any, x: Any, index: int, marker: _Marker, raw: Any = None) -> Any:
        y = g.op("lowbit::Layer", x, index_i=index)
        # Rank and feature size keep the exporter's shape inference going past our custom node; the
        # other dims stay unknown, else the exporter would bake the traced batch / sequence in.
        sizes = [None] * (len(marker.out_shape) - 1) + [marker.out_shape[-1]]
        if isinstance(marker.layer[0], QuantizedConv):
            sizes = [None, marker.out_shape[1]] + [None] * (len(marker.out_shape) - 2)
        if marker.static:  # a static export: every size is known (adaptive pooling needs them)
            known = x.type().sizes() if hasattr(x.type(), "sizes") else None
            sizes = list(marker.shapes.get(tuple(known) if known else (), marker.out_shape))
        y.setType(x.type().with_dtype(torch.float32).with_sizes(sizes))
        return y


class _Marker(nn.Module):
    def __init__(self, index: int, layer: nn.Module) -> None:
        super().__init__()
        self.index = index
        self.layer = [layer]  # a list: not a submodule, so its buffers are not exported as inputs
        self.out_shape: tuple[int, ...] = ()
        self.shapes: dict[tuple[int, ...], tuple[int, ...]] = {}
        self.static = False

    def __getattr__(self, name: str) -> Any:
        # Model code reads the layer it calls (ViT: projection.weight.dtype; MobileNet: conv.stride):
        # answer for the quantized layer this marker stands in for.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["layer"][0], name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rotation = getattr(self.layer[0], "input_rotation", None)
        if rotation is not None:  # traced as plain ONNX ops (Walsh-Hadamard butterflies, MatMul)
            return _LayerOp.apply(rotation(x), self.index, self, x)
        return _LayerOp.apply(x, self.index, self)


def _float_rnn(layer: QuantizedRNN) -> nn.Module:
    """A float LSTM/GRU on the dequantized weights (ONNX Runtime has no integer-weight GRU, and its
    DynamicQuantizeLSTM quantizes per tensor, which lowbit's reference does not)."""
    cls = nn.LSTM if layer.config["mode"] == "LSTM" else nn.GRU
    rnn = cls(**{k: v for k, v in layer.config.items() if k != "mode"})
    state = {n: qw.dequantize() for n, qw in layer.weights.items()}
    smooth = getattr(layer, "input_smooth", None)
    if smooth is not None:
        # AWQ / SmoothQuant scaled the first layer's input weights by s and the layer divides its
        # input by s; the float RNN takes the raw input, so the division goes into those columns.
        for n in state:
            if n.startswith("weight_ih_l0"):
                state[n] = state[n] / smooth.to(state[n].dtype)
    state.update({n: getattr(layer, n).detach() for n in layer.bias_names})
    rnn.load_state_dict(state)
    return rnn.eval()


@contextlib.contextmanager
def _no_ir_dump() -> Iterator[None]:
    """Keep a failed export from printing torch's whole IR graph (thousands of lines) to stdout.

    torch's TorchScript exporter turns its ONNX log on for every export (its guard tests the
    function ``_jit_is_onnx_log_enabled`` itself, always true, not its result), and on an error
    logs the graph. The error itself still propagates; only the log call is silenced here.
    """
    original = torch._C._jit_onnx_log
    torch._C._jit_onnx_log = lambda *args: None  # type: ignore[assignment]
    try:
        yield
    finally:
        torch._C._jit_onnx_log = original  # type: ignore[assignment]


def _set_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if not name:
        return new
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    return model


def _resolve_u8u8(options: ExportOptions) -> bool:
    if options.u8u8 is not None:
        return options.u8u8
    from lowbit.doctor import cpu_features

    return cpu_features().int8_saturates


def _output_axes(
    spec: CallSpec, outputs: list[tuple[str, torch.Tensor]], dynamic: Any
) -> dict[str, dict[int, str]]:
    """Batch (and, for token models, sequence) axes of the outputs that carry them."""
    if dynamic not in ("auto", "batch") or spec.has_lists:  # a list's elements have no batch axis
        return {}
    seq = spec.sequence_length() if dynamic == "auto" else None
    batch = spec.tensors[0].shape[0] if spec.tensors and spec.tensors[0].dim() else None
    axes: dict[str, dict[int, str]] = {}
    for name, t in outputs:
        ax: dict[int, str] = {}
        if t.dim() >= 1 and t.shape[0] == batch:
            ax[0] = "batch"
        if seq is not None and t.dim() >= 2 and t.shape[1] == seq:
            ax[1] = "sequence"
        if ax:
            axes[name] = ax
    return axes


def export_onnx(
    qmodel: nn.Module,
    path: str | Path,
    example_inputs: Any,
    *,
    options: ExportOptions | None = None,
    opset: int = OPSET,
    dynamic: str | dict[str, dict[int, str]] = "auto",
    check: bool = True,
) -> ExportReport:
    """Export ``qmodel`` (from ``lowbit.quantize``) to ``path`` for ONNX Runtime.

    ``example_inputs``: a tensor, a tuple of positional tensors, a dict / ``BatchEncoding`` of
    named inputs (a Hugging Face model: the graph takes exactly those inputs, by name; other
    arguments keep their defaults, so a causal LM gives logits for every position; the key / value
    cache is off), or a list of images for a model whose ``forward`` takes one (detectors: one
    graph input per element, ``images_0``, ``images_1`` ..., shapes fixed to the example's).
    Outputs are the model's tensors, flattened (``ModelOutput`` keys such as ``logits`` name
    them; a detector's list of dicts gives ``0.boxes``, ``0.scores`` ...). ``dynamic``: which input
    axes stay free: ``auto`` (batch, and the sequence of token inputs), ``batch``, ``none``, or
    ``{input_name: {axis: label}}``; when the model cannot be exported with free axes (``auto``),
    it is exported static and ``report.warnings`` says so. ``check``: run the file in ONNX Runtime
    on the example and on a perturbed copy and warn where it does not follow PyTorch (traced
    control flow, denormal activations, all-zero outputs; ``report.check`` has the figures).
    Returns an :class:`ExportReport` listing each layer's kernel; layers ORT computes in float are
    listed in ``report.fallbacks``.

    >>> import torch, lowbit, tempfile, os
    >>> q = lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(64, 8)), "int4-weight-only",
    ...                     progress=False)
    >>> r = export_onnx(q, os.path.join(tempfile.mkdtemp(), "m.onnx"), torch.randn(1, 64))
    >>> r.layers[0].kernel, r.layers[0].precision
    ('MatMulNBits', 'int4')
    """
    require_module(qmodel, "export_onnx")
    options = options or ExportOptions()
    path = Path(path)
    # Logical parameter count (float params + every packed weight's values), for bits/param checks.
    params = sum(p.numel() for p in qmodel.parameters()) + sum(
        m.numel for m in qmodel.modules() if type(m).__name__ == "QuantizedWeight"
    )
    u8u8 = _resolve_u8u8(options)
    model = copy.deepcopy(qmodel).eval()
    layers: list[tuple[str, QuantizedModule, Kernel]] = []
    report = ExportReport(path=str(path), u8u8=u8u8)
    for name, module in list(model.named_modules()):
        if not isinstance(module, QuantizedModule):
            continue
        if isinstance(module, QuantizedRNN):
            model = _set_module(model, name, _float_rnn(module))
            note = f"{module.config['mode']} run as ONNX float op on dequantized weights"
            if module.input_quant is not None:
                note += "; its input is not quantized in ORT"
            report.layers.append(LayerExport(name, module.kind, module.config["mode"], "float", False, note))
            continue
        kernel = choose_kernel(module, options.dynamic_conv)
        model = _set_module(model, name, _Marker(len(layers), module))
        layers.append((name, module, kernel))
        report.layers.append(
            LayerExport(name, module.kind, kernel.name, kernel.precision, kernel.storage_only, kernel.note)
        )
    spec = CallSpec.of(model, example_inputs)
    wrapped = CallAdapter(model, spec).eval()
    with torch.no_grad():
        raw, subnormal = trace_subnormals(model, lambda: spec.call(model, spec.tensors))
    outputs = flat_outputs(raw)
    axes = {**spec.dynamic_axes(dynamic), **_output_axes(spec, outputs, dynamic)}

    tracer_reads: list[str] = []

    def trace(dynamic_axes: dict[str, dict[int, str]]) -> bytes:
        for m in model.modules():
            if isinstance(m, _Marker):
                m.static = not dynamic_axes
        buffer = io.BytesIO()
        with warnings.catch_warnings(record=True) as caught, _no_ir_dump():
            warnings.simplefilter("always")  # tracer warnings about Python control flow: kept for the check
            torch.onnx.export(
                wrapped, spec.tensors, buffer, dynamo=False, opset_version=opset, input_names=spec.names,
                output_names=[n for n, _ in outputs], dynamic_axes=dynamic_axes or None,
                custom_opsets={"lowbit": 1} if layers else None,
            )  # fmt: skip
        # Tensor values read as Python numbers / bools: the graph holds the example's path.
        reads = "Converting a tensor to a Python"
        tracer_reads.extend(
            str(w.message).split(".")[0] for w in caught
            if issubclass(w.category, torch.jit.TracerWarning) and reads in str(w.message)
        )  # fmt: skip
        return buffer.getvalue()

    try:
        graph_bytes = trace(axes)
    except Exception as err:  # the exporter's errors have no common type
        if dynamic != "auto" or not axes:
            raise
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        report.warnings.append(
            f"exported with static shapes (inputs exactly {[tuple(t.shape) for t in spec.tensors]}): "
            f"free batch / sequence axes failed ({first}); pass dynamic='none' to skip the attempt"
        )
        warnings.warn(f"lowbit: {path.name}: {report.warnings[-1]}", stacklevel=2)
        graph_bytes = trace({})
    graph_model = onnx.load_from_string(graph_bytes)
    _lower_markers(graph_model, layers, options, u8u8)
    if options.transformer_fusions:
        graph_model = _transformer_fusions(graph_model, report)
    meta = {"lowbit.layers": json.dumps([asdict(x) for x in report.layers]), "lowbit.params": str(params)}
    if isinstance(raw, list):  # a detector's list of dicts: the runtime gives the same structure back
        meta["lowbit.outputs"] = json.dumps(output_structure(raw))
    for key, value in meta.items():
        graph_model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(graph_model, str(path))
    report.file_bytes = path.stat().st_size
    report.op_counts = dict(Counter(n.op_type for n in graph_model.graph.node))
    if check:
        _check(path, model, spec, outputs, subnormal, report, bool(tracer_reads))
    return report


def _check(
    path: Path,
    model: nn.Module,
    spec: CallSpec,
    outputs: list[tuple[str, torch.Tensor]],
    subnormal: list[str],
    report: ExportReport,
    values_read: bool,
) -> None:
    """Run the file in ORT on the example and a perturbed copy; warn where it does not follow PyTorch."""
    from lowbit.runtime import OrtModel

    names = [n for n, _ in outputs]
    try:
        session = OrtModel(path, threads=1)
    except Exception as err:  # ORT's load errors have no common type; the file is written, say so
        report.warnings.append(f"ONNX Runtime cannot load the file: {str(err).splitlines()[0][:300]}")
        warnings.warn(f"lowbit: {path.name}: {report.warnings[-1]}", stacklevel=3)
        return

    def ort_run(tensors: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        feeds = session.feeds(**dict(zip(spec.names, tensors, strict=True)))
        return [torch.from_numpy(o) for o in session.run_feeds(feeds)]

    first = ort_run(spec.tensors)
    example = onnx_check.compare(names, first, [t for _, t in outputs])
    second = None
    if not (example["shape_mismatch"] or example["all_zero_in_ort"]):
        other = onnx_check.perturbed(spec.tensors)
        with torch.no_grad():
            ref = [t for _, t in flat_outputs(spec.call(model, other))]
        if len(ref) == len(names):
            again = ort_run(other)
            second = onnx_check.compare(names, again, ref, before=first if values_read else None)
        else:
            second = {"shape_mismatch": names, "traced_shapes": names, "min_cosine": None}
            second["worst_output"] = None
    report.check = {"example": example, "second_input": second, "subnormal_layers": subnormal}
    for message in onnx_check.messages(example, second, subnormal):
        report.warnings.append(message)
        warnings.warn(f"lowbit: {path.name}: {message}", stacklevel=3)


def _lower_markers(
    model: onnx.ModelProto, layers: list[tuple[str, QuantizedModule, Kernel]], opts: ExportOptions, u8u8: bool
) -> None:
    """Replace every ``lowbit::Layer`` node, in place, by the nodes of its kernel."""
    graph = model.graph
    calls: dict[int, list[tuple[str, str]]] = {}
    for n in graph.node:
        if n.domain == "lowbit":
            calls.setdefault(helper.get_attribute_value(n.attribute[0]), []).append((n.input[0], n.output[0]))
    # Layers called once may share one quantized input (q / k / v); a layer called at several places
    # (a detector's loop over a list of images) is lowered at each, its constants stored once.
    io_of = {index: sites[0] for index, sites in calls.items() if len(sites) == 1}
    groups = _fusable_groups(io_of, layers, u8u8) if opts.fuse_shared_inputs else {}
    done: set[int] = set()
    seen_call: dict[int, int] = {}
    shared = _SharedConstants()
    new_nodes = []
    for node in graph.node:
        if node.domain != "lowbit":
            new_nodes.append(node)
            continue
        index = helper.get_attribute_value(node.attribute[0])
        if index in done:
            continue
        name, layer, kernel = layers[index]
        b = Builder()
        prefix = "/" + name.replace(".", "/")
        x, y = node.input[0], node.output[0]
        call = seen_call[index] = seen_call.get(index, -1) + 1
        if call:
            prefix += f"/call{call}"
        if index in groups:
            members = groups[index]
            group = [layers[i][1] for i in members]
            lower_dynamic_group(b, group, x, [io_of[i][1] for i in members], prefix, kernel, u8u8)
            done.update(members)
        elif isinstance(layer, QuantizedLinear):
            lower_linear(b, layer, x, y, prefix, opts, kernel, u8u8)
        elif isinstance(layer, QuantizedConv):
            lower_conv(b, layer, x, y, prefix, kernel, u8u8)
        elif isinstance(layer, QuantizedEmbedding):
            lower_embedding(b, layer, x, y, prefix, kernel)
        else:  # pragma: no cover - choose_kernel only marks the three kinds above
            raise ValueError(f"layer {name}: {type(layer).__name__} cannot be lowered to ONNX")
        if len(calls[index]) == 1:
            done.add(index)
        new_nodes.extend(shared.add(b, graph))
    del graph.node[:]
    graph.node.extend(new_nodes)
    # The exporter guessed shapes for the marker outputs; drop them and let ORT infer the real ones.
    marker_outputs = {y for sites in calls.values() for _, y in sites}
    kept = [v for v in graph.value_info if v.name not in marker_outputs]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    opsets = [o for o in model.opset_import if o.domain not in ("lowbit", MS)]
    del model.opset_import[:]
    model.opset_import.extend(opsets + [helper.make_opsetid(MS, 1)])


class _SharedConstants:
    """Adds a builder's nodes and initializers to the graph, storing each repeated constant once (the
    weights of a layer lowered at several call sites)."""

    def __init__(self) -> None:
        self.by_content: dict[tuple[int, tuple[int, ...], bytes], str] = {}

    def add(self, b: Builder, graph: onnx.GraphProto) -> list[onnx.NodeProto]:
        renamed: dict[str, str] = {}
        for init in b.initializers:
            content = init.raw_data
            if not content:  # values in typed fields: hash the tensor without its name
                unnamed = onnx.TensorProto()
                unnamed.CopyFrom(init)
                unnamed.name = ""
                content = unnamed.SerializeToString()
            key = (init.data_type, tuple(init.dims), hashlib.sha1(content).digest())
            if key in self.by_content:
                renamed[init.name] = self.by_content[key]
            else:
                self.by_content[key] = init.name
                graph.initializer.append(init)
        for n in b.nodes:
            for i, value in enumerate(n.input):
                if value in renamed:
                    n.input[i] = renamed[value]
        return b.nodes


def _fusable_groups(
    io_of: dict[int, tuple[str, str]], layers: list[tuple[str, QuantizedModule, Kernel]], u8u8: bool
) -> dict[int, list[int]]:
    """First index -> all indices of dynamic int8 linears that read the same input (attention's
    query / key / value) with the same activation spec and the same SmoothQuant scales (the
    calibration pipeline gives layers that read one input one set). One smoothing and one
    quantization of the input serve them all exactly."""
    by_input: dict[str, list[int]] = {}
    for index, (x, _y) in sorted(io_of.items()):
        _name, layer, kernel = layers[index]
        if kernel.name in ("DynamicQuantizeMatMul", "MatMulIntegerToFloat"):
            smooth = getattr(layer, "input_smooth", None)
            smooth_key = (
                None if smooth is None else hashlib.sha1(smooth.detach().cpu().numpy().tobytes()).hexdigest()
            )
            key = f"{x}|{kernel.name}|{layer.input_quant.spec if layer.input_quant else None}|{smooth_key}"
            by_input.setdefault(key, []).append(index)
    return {members[0]: members for members in by_input.values() if len(members) > 1}


def _transformer_fusions(model: onnx.ModelProto, report: ExportReport) -> onnx.ModelProto:
    """ONNX Runtime's transformer optimizer (python fusions only, ``opt_level=0``) on transformer-like
    graphs. ORT's session optimizer does not fuse GELU in these lowered graphs; this pass does."""
    if not any(n.op_type == "LayerNormalization" for n in model.graph.node):
        return model
    try:
        import logging

        from onnxruntime.transformers.optimizer import optimize_model
    except ImportError:
        return model
    # It logs (under several top-level logger names) every fusion it could not apply; quiet it.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimized = optimize_model(model, model_type="bert", num_heads=0, hidden_size=0, opt_level=0)
        fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
        report.fusions = fused
        return optimized.model
    except Exception as err:  # the optimizer is best effort: keep the unfused graph, say so
        report.warnings.append(f"transformer fusions skipped: {type(err).__name__}: {err}")
        return model
    finally:
        logging.disable(previous)
