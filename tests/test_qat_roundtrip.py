"""Issue 20's acceptance point: after ``convert`` + ``save`` + ``load`` + ``export_onnx``, outputs
equal the trained fake-quant model's within the documented tolerance (docs/qat-pruning.md):

- converted (reference kernels) and saved + loaded into a fresh instance of the user's class:
  bit-exact (``rtol=0, atol=0``) against the QAT model in eval mode;
- ONNX Runtime, unfused graph (``optimization="none"``): max |diff| <= 1e-4 of the output range;
- ONNX Runtime, fused integer kernels (QLinearConv / QGemm round the bias and requantize their own
  way): cosine >= 0.98 per sample, >= 0.999 over the batch, argmax agreement >= 98 %.

The models are written here: conv + BatchNorm (folded), a residual block, a BatchNorm after the
add (not foldable: frozen), a linear head; and PyTorch's own transformer encoder with a head.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lowbit
from lowbit import qat

pytestmark = pytest.mark.usefixtures("one_thread", "reference_kernels")


class ResHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.post = nn.BatchNorm2d(8)  # after the residual add: no conv to fold it into
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        x = F.relu(self.post(x + y))
        return self.head(F.max_pool2d(x, 2).flatten(1))


def _float_model(x: torch.Tensor) -> ResHead:
    torch.manual_seed(0)
    model = ResHead().train()
    with torch.no_grad():  # trained BatchNorm statistics, as in a fine-tune: "auto" folds them
        for i in range(0, len(x), 64):
            model(x[i : i + 64])
    return model.eval()


def _ort(path, optimization: str, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    from lowbit.runtime import load

    return load(path, threads=1, optimization=optimization)(x)


@pytest.mark.parametrize(("bits", "lsq"), [(4, True), (4, False), (8, True)])
def test_trained_qat_model_equals_converted_loaded_and_onnx(tmp_path, gen, bits: int, lsq: bool) -> None:  # noqa: ANN001
    x = torch.rand(256, 1, 8, 8, generator=gen) * 2 - 0.5
    y = torch.randint(0, 10, (256,), generator=gen)
    float_model = _float_model(x)
    model = qat.prepare(float_model, qat.recipe(bits, activation_bits=8), lsq=lsq, progress=False)
    assert set(model.lowbit_folded) == {"bn0", "bn1", "bn2"}  # "post" stays, frozen
    qat.calibrate(model, [x[:64]])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for i in range(8):  # the user's loop
        model.train()
        batch = slice((i % 4) * 64, (i % 4 + 1) * 64)
        loss = F.cross_entropy(model(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    x_new = torch.rand(64, 1, 8, 8, generator=gen) * 2 - 0.5
    with torch.no_grad():
        trained = model.eval()(x_new)
        converted = qat.convert(model, progress=False)
        torch.testing.assert_close(converted(x_new), trained, rtol=0, atol=0)
        lowbit.save(converted, tmp_path / "art")
        loaded = lowbit.load(tmp_path / "art", ResHead()).eval()  # the user's unfolded class
        torch.testing.assert_close(loaded(x_new), trained, rtol=0, atol=0)

    pytest.importorskip("onnxruntime", reason="the ONNX half needs onnxruntime")
    from lowbit.export.onnx import export_onnx

    report = export_onnx(loaded, tmp_path / "m.onnx", x_new[:2])
    # Integer QDQ everywhere (4-bit weight codes ride in int8 DequantizeLinear), nothing float.
    assert [(layer.kernel, layer.precision) for layer in report.layers] == [("QDQ", "int8")] * 4
    assert not report.fallbacks
    scale = float(trained.abs().max())
    exact = _ort(tmp_path / "m.onnx", "none", x_new)
    assert float((exact - trained).abs().max()) <= 1e-4 * scale
    fused = _ort(tmp_path / "m.onnx", "all", x_new)
    cos = float(F.cosine_similarity(fused, trained).min())
    batch_cos = float(F.cosine_similarity(fused.reshape(1, -1), trained.reshape(1, -1)))
    agree = float((fused.argmax(1) == trained.argmax(1)).float().mean())
    assert cos >= 0.98 and batch_cos >= 0.999 and agree >= 0.98, (cos, batch_cos, agree)


class Encoder(nn.Module):
    """PyTorch's transformer encoder (attention float, feed-forward layers quantized) and a head."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)[:, 0])


def test_transformer_encoder_qat_equals_converted_loaded_and_onnx(tmp_path, gen) -> None:  # noqa: ANN001
    x = torch.randn(64, 6, 16, generator=gen)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="MultiheadAttention"):
        model = qat.prepare(Encoder().eval(), qat.recipe(8), lsq=True, progress=False)
    qat.calibrate(model, [x[:32]])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    for i in range(4):
        model.train()
        loss = model(x[(i % 2) * 32 : (i % 2 + 1) * 32]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        trained = model.eval()(x)
        converted = qat.convert(model, progress=False)
        torch.testing.assert_close(converted(x), trained, rtol=0, atol=0)
        lowbit.save(converted, tmp_path / "art")
        loaded = lowbit.load(tmp_path / "art", Encoder()).eval()
        torch.testing.assert_close(loaded(x), trained, rtol=0, atol=0)

    pytest.importorskip("onnxruntime", reason="the ONNX half needs onnxruntime")
    from lowbit.export.onnx import export_onnx

    report = export_onnx(loaded, tmp_path / "m.onnx", x[:2])
    assert [layer.kernel for layer in report.layers] == ["QDQ"] * 5 and not report.fallbacks
    exact = _ort(tmp_path / "m.onnx", "none", x)
    assert float((exact - trained).abs().max()) <= 1e-4 * float(trained.abs().max())
    fused = _ort(tmp_path / "m.onnx", "all", x)
    cos = float(F.cosine_similarity(fused, trained).min())
    assert cos >= 0.98, cos
