"""ONNX export of static sub-8-bit integer layers (QAT W4A4 / W3A3 / W2A2): integer QDQ kernels that
reproduce lowbit's codes.

The activation ``QuantizeLinear`` (uint8 / int8, lowbit's scale and zero point) is followed by an
integer ``Clip`` to the N-bit code range; the N-bit weight codes (times 2**(8-N), scales / 2**(8-N):
the same float weights) sit in the int8 ``DequantizeLinear``. Tolerances:

- Codes: ORT's codes are ``clip(rint(x / s) + zp, qmin, qmax)`` (half to even) exactly; lowbit's
  are the same with ``x * (1 / s)``. They differ only where those two float32 quotients round to
  different integers (values within an ulp of a half-integer).
- Unfused graph (``optimization="none"``): lowbit's arithmetic, so max |diff| <= 1e-4 of the output
  range.
- Fused graph (ORT's QLinearConv / QGemm): ORT rounds the bias to int32 at x_scale * w_scale and
  requantizes in integer arithmetic, so a few activation codes per 10^4 move by one step, as in the
  int8-static QDQ test; at 4 bits one step is coarse, so whole outputs are compared by cosine
  (>= 0.98 per sample, >= 0.999 over the batch; the int8-static test asks >= 0.999 per sample) and
  argmax agreement (>= 98 %).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit import qat
from lowbit.doctor import inspect_onnx, layer_kernels
from lowbit.export.onnx import export_onnx
from lowbit.export.onnx_lower import Builder, ExportOptions, _qdq_input, choose_kernel
from lowbit.nn.activation import ActivationQuantizer
from lowbit.primitives import quantize
from lowbit.recipes import ActivationSpec
from lowbit.runtime import load

ort = pytest.importorskip("onnxruntime", reason="ONNX export tests need the onnx extra")
pytestmark = pytest.mark.usefixtures("one_thread")

FUSED_OPS = ("QLinearConv", "QGemm", "QLinearMatMul")


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _codes_graph(aq: ActivationQuantizer) -> ort.InferenceSession:
    """ORT session returning the 8-bit codes ``_qdq_input`` feeds its DequantizeLinear."""
    from onnx import TensorProto, helper

    class Layer:
        input_quant = aq

    b = Builder()
    _qdq_input(b, Layer(), "x", "/l")
    dq = b.nodes[-1]
    assert dq.op_type == "DequantizeLinear" and b.nodes[-2].op_type == "Clip"
    code_type = TensorProto.INT8 if aq.fmt.signed else TensorProto.UINT8
    graph = helper.make_graph(
        b.nodes[:-1],
        "codes",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info(dq.input[0], code_type, [None])],
        b.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(
    ("fmt", "symmetric"), [("uint4", False), ("uint3", False), ("uint2", False), ("int4", True)]
)
def test_clipped_codes_are_lowbit_codes(fmt, symmetric, gen):
    rng = np.random.default_rng(0)
    checked = ties = 0
    for _ in range(20):
        aq = ActivationQuantizer(ActivationSpec(mode="static", format=fmt, symmetric=symmetric))
        scale = torch.tensor(float(rng.uniform(1e-3, 3.0)))
        zp = None if symmetric else torch.tensor(int(rng.integers(aq.fmt.qmin, aq.fmt.qmax + 1)))
        aq.set_qparams(scale, zp)
        z = 0 if zp is None else int(zp)
        # Every code's value, every half-way point, their float neighbours, the clip edges and beyond.
        k = torch.arange(aq.fmt.qmin - 3, aq.fmt.qmax + 4, dtype=torch.float32) - z
        edges = torch.cat([k * scale, (k + 0.5) * scale])
        up, down = torch.nextafter(edges, edges + 1), torch.nextafter(edges, edges - 1)
        spread = scale * (aq.fmt.qmax - aq.fmt.qmin)
        extremes = torch.tensor([0.0, -0.0, 3e38, -3e38])
        x = torch.cat([edges, up, down, torch.randn(20000, generator=gen) * spread, extremes])
        ref = quantize(x, aq.fmt, aq.frozen_qparams(x)).numpy().astype(np.int64)
        got = _codes_graph(aq).run(None, {"x": x.numpy()})[0].astype(np.int64)
        xs, s = x.numpy(), np.float32(scale)
        with np.errstate(over="ignore"):  # +-3e38 / s overflows to +-inf, which clips to qmin / qmax
            ort_rule = np.clip(np.rint(xs / s) + z, aq.fmt.qmin, aq.fmt.qmax)
            lowbit_rule = np.clip(np.rint(xs * (np.float32(1) / s)) + z, aq.fmt.qmin, aq.fmt.qmax)
        assert np.array_equal(lowbit_rule, ref)  # lowbit: half to even on x * (1/s)
        assert np.array_equal(got, ort_rule)  # ORT: half to even on x / s; the Clip adds no error
        differ = ort_rule != lowbit_rule
        assert np.array_equal(got[~differ], ref[~differ])
        assert np.all(np.abs(got - ref) <= 1)
        # The two quotients disagree only within an ulp of a half-integer.
        q = (xs[differ] * (np.float32(1) / s)).astype(np.float64)
        assert np.all(np.abs(np.abs(q - np.floor(q)) - 0.5) < 1e-6 * np.maximum(1.0, np.abs(q)))
        checked += x.numel()
        ties += int(differ.sum())
        assert int(differ[len(edges) * 3 : -4].sum()) <= 1  # random values: (almost) never
    assert ties < checked * 0.01


@pytest.mark.parametrize(("bits", "label"), [(4, "int4"), (3, "int3"), (2, "int2"), (8, "int8")])
def test_static_qat_layers_choose_integer_qdq(bits, label):
    q = qat.convert(_calibrated(_net(), bits, torch.randn(16, 1, 8, 8)))
    layers = [m for m in q.modules() if hasattr(m, "qweight")]
    assert {(choose_kernel(m).name, choose_kernel(m).precision) for m in layers} == {("QDQ", label)}
    assert all(x.precision != "float" for x in layer_kernels(q))


def _net() -> SmallNet:
    torch.manual_seed(0)
    return SmallNet().eval()


def _calibrated(model: nn.Module, bits: int, x: torch.Tensor) -> nn.Module:
    student = qat.prepare(model.eval(), qat.recipe(bits), lsq=True)
    qat.calibrate(student, [x])
    return student


def _train(student: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 5) -> None:
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    student.train()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(student(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    student.eval()


def _round_trip(student: nn.Module, skeleton: nn.Module, tmp_path, example) -> tuple[nn.Module, object]:
    """convert -> save -> load -> export_onnx; returns the reloaded model and the export report."""
    converted = qat.convert(student)
    lowbit.save(converted, tmp_path / "artifact")
    loaded = lowbit.load(tmp_path / "artifact", skeleton).eval()
    with torch.no_grad():
        assert torch.equal(loaded(example), converted(example))
    report = export_onnx(loaded, tmp_path / "model.onnx", example)
    return loaded, report


def _parity(ort_out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    cos = float(nn.functional.cosine_similarity(ort_out, ref).min())
    batch_cos = float(nn.functional.cosine_similarity(ort_out.reshape(1, -1), ref.reshape(1, -1)))
    agree = float((ort_out.argmax(-1) == ref.argmax(-1)).float().mean())
    return cos, batch_cos, agree


@pytest.mark.parametrize("bits", [4, 2])
def test_small_qat_model_round_trips_through_onnx(tmp_path, bits, gen):
    x = torch.rand(256, 1, 8, 8, generator=gen) * 2 - 0.5  # signed input: first zero point inside the range
    y = torch.randint(0, 10, (256,), generator=gen)
    student = _calibrated(_net(), bits, x[:64])
    _train(student, x, y)
    qmodel, report = _round_trip(student, SmallNet(), tmp_path, x[:2])
    assert [(layer.kernel, layer.precision) for layer in report.layers] == [("QDQ", f"int{bits}")] * 4
    assert not report.fallbacks
    assert "Clip" in report.op_counts
    with torch.no_grad():
        ref = qmodel(x)
    # Unfused: Q/DQ evaluated one by one, i.e. lowbit's own codes and float arithmetic.
    exact = load(tmp_path / "model.onnx", threads=1, optimization="none")(x)
    assert float((exact - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    # Fused integer kernels.
    out = load(tmp_path / "model.onnx", threads=1)(x)
    cos, batch_cos, agree = _parity(out, ref)
    assert cos >= 0.98 and batch_cos >= 0.999 and agree >= 0.98, (cos, batch_cos, agree)
    ops = inspect_onnx(tmp_path / "model.onnx")["integer_ops"]
    assert ops.get("QLinearConv", 0) >= 1 and sum(ops.get(op, 0) for op in FUSED_OPS) >= 2, ops
    # u8u8 weights (codes + 128, for AVX2 CPUs without VNNI): the same codes, the same results.
    export_onnx(qmodel, tmp_path / "u8.onnx", x[:2], options=ExportOptions(u8u8=True))
    exact_u8 = load(tmp_path / "u8.onnx", threads=1, optimization="none")(x)
    assert float((exact_u8 - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    cos, batch_cos, agree = _parity(load(tmp_path / "u8.onnx", threads=1)(x), ref)
    assert cos >= 0.98 and batch_cos >= 0.999 and agree >= 0.98, (cos, batch_cos, agree)


def test_digits_cnn_w4a4_qat_onnx_keeps_lowbit_accuracy(tmp_path):
    from lowbit import zoo
    from lowbit.doctor import doctor
    from lowbit.qat.demo import qat_model

    zm = zoo.get("digits-cnn")
    converted, _seconds = qat_model(zm, 4, epochs=1)  # the demo's QAT W4A4 row (LSQ + KD), shorter
    lowbit.save(converted, tmp_path / "artifact")
    skeleton = copy.deepcopy(zm.model)  # load fills it in place: not the cached zoo model
    qmodel = lowbit.load(tmp_path / "artifact", skeleton).eval()
    report = export_onnx(qmodel, tmp_path / "model.onnx", zm.example_inputs)
    assert {(layer.kernel, layer.precision) for layer in report.layers} == {("QDQ", "int4")}
    ort_model = load(tmp_path / "model.onnx", threads=1)
    correct = ref_correct = total = 0
    for x, y in zm.eval_data:
        out = ort_model(x)
        with torch.no_grad():
            ref = qmodel(x)
        cos, batch_cos, agree = _parity(out, ref)
        assert cos >= 0.98 and batch_cos >= 0.999 and agree >= 0.98, (cos, batch_cos, agree)
        correct += int((out.argmax(-1) == y).sum())
        ref_correct += int((ref.argmax(-1) == y).sum())
        total += len(y)
    assert abs(correct - ref_correct) / total * 100 <= 0.6  # at most 2 of 360 images
    # The doctor counts these layers as integer, from the artifact and from the exported file.
    from_artifact = doctor(str(tmp_path / "artifact"))
    assert [(x.kernel, x.precision) for x in from_artifact.layers] == [("QDQ", "int4")] * 5
    ops = inspect_onnx(tmp_path / "model.onnx")["integer_ops"]
    assert ops.get("QLinearConv", 0) == 2 and ops.get("QGemm", 0) == 1, ops
