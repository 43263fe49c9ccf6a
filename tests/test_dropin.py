"""Quantized layers are drop-ins: model code that reads a layer's settings or weight keeps working."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lowbit
import lowbit.backends
from lowbit.ptq.plan import custom_forward


def _quantized(module: nn.Module, preset: str = "int8-weight-only") -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lowbit.quantize(nn.Sequential(module), preset)[0]


def test_conv_keeps_its_settings():
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, dilation=1, groups=1)
    q = _quantized(conv, "int8-dynamic")
    assert hasattr(q, "stride")
    for name in ("stride", "padding", "dilation", "groups", "kernel_size", "in_channels", "out_channels"):
        assert getattr(q, name) == getattr(conv, name), name


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Linear(16, 8),
        lambda: nn.Conv1d(4, 6, 3, groups=2),
        lambda: nn.Conv2d(3, 8, (3, 5)),
        lambda: nn.Embedding(20, 8, padding_idx=3),
    ],
    ids=["linear", "conv1d-grouped", "conv2d", "embedding"],
)
def test_weight_is_the_dequantized_weight_in_the_float_layout(make):
    torch.manual_seed(0)
    layer = make()
    q = _quantized(layer)
    w = q.weight
    assert w.shape == layer.weight.shape and w.dtype == layer.weight.dtype
    assert torch.equal(w.flatten(1) if w.dim() > 2 else w, q.qweight.dequantize().reshape(w.shape[0], -1))
    rel = (w - layer.weight).norm() / layer.weight.norm()
    assert rel < 0.02  # int8: the dequantized weight is close to the float one


def test_hf_conv1d_weight_keeps_its_transposed_layout():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(6, 4)  # weight [in=4, out=6]
    q = _quantized(layer)
    assert q.weight.shape == layer.weight.shape == (4, 6)
    assert q.nf == 6
    assert (q.weight - layer.weight).abs().max() < 0.01 * layer.weight.abs().max()


def test_rnn_weights_read_as_on_the_float_module():
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 8, num_layers=2, batch_first=True)
    q = _quantized(lstm)
    assert (q.hidden_size, q.num_layers, q.batch_first, q.bias) == (8, 2, True, True)
    assert q.weight_hh_l1.shape == lstm.weight_hh_l1.shape
    assert (q.weight_hh_l1 - lstm.weight_hh_l1).abs().max() < 0.01
    with pytest.raises(AttributeError):
        q.weight_hh_l7  # noqa: B018 - an attribute the float LSTM does not have either


def test_weight_dtype_follows_the_float_model():
    layer = nn.Linear(16, 8).to(torch.bfloat16)
    assert _quantized(layer).weight.dtype == torch.bfloat16


def test_loaded_layers_keep_the_settings(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.Flatten(), nn.Linear(8 * 3 * 3, 4))
    skeleton = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = lowbit.quantize(model, "int8-weight-only")
    lowbit.save(q, tmp_path / "a")
    loaded = lowbit.load(tmp_path / "a", skeleton)
    assert loaded[0].stride == (2, 2) and loaded[2].in_features == 72
    assert torch.equal(loaded[0].weight, q[0].weight)


class _Positions(nn.Embedding):
    """A positional table read by slicing (as Whisper's / BART's): its forward ignores the ids' values."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[: ids.shape[-1]]


def test_subclass_with_its_own_forward_stays_float_with_a_note():
    torch.manual_seed(0)
    model = nn.Sequential(_Positions(16, 4))
    assert custom_forward(model[0]) == "_Positions overrides nn.Embedding.forward"
    with pytest.warns(UserWarning, match="_Positions overrides nn.Embedding.forward"):
        q = lowbit.quantize(model, "int8-weight-only")
    ids = torch.tensor([[5, 5, 5]])
    assert torch.equal(q(ids), model(ids))


def _tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8, num_labels=5,
    )  # fmt: skip
    return ViTForImageClassification(cfg).eval(), {"pixel_values": torch.randn(2, 3, 32, 32)}


def _tiny_whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    cfg = WhisperConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
        max_source_positions=32, max_target_positions=32, vocab_size=100, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )  # fmt: skip
    inputs = {"input_features": torch.randn(1, 16, 64), "decoder_input_ids": torch.tensor([[1, 2, 3]])}
    return WhisperForConditionalGeneration(cfg).eval(), inputs


@pytest.mark.parametrize("build", [_tiny_vit, _tiny_whisper], ids=["vit", "whisper"])
@pytest.mark.parametrize("preset", ["int8-dynamic", "int4-weight-only"])
def test_transformers_models_that_inspect_their_layers_run(build, preset):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model, inputs = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = lowbit.quantize(model, preset)
    with torch.no_grad():
        out, ref = q(**inputs).logits, model(**inputs).logits
    assert out.shape == ref.shape
    cos = nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > (0.999 if preset == "int8-dynamic" else 0.98)


def test_qat_layers_answer_the_float_layers_attributes():
    """QAT layers are drop-ins too: model code reads ``conv.stride`` / ``projection.weight.dtype``."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 4))
    m = lowbit.qat.prepare(model, lowbit.qat.recipe(8))
    conv = m[0]
    assert type(conv).__name__ == "QATConv"
    assert conv.stride == (2, 2) and conv.out_channels == 8
    assert conv.weight is conv.conv.weight and conv.weight.dtype == torch.float32
    with pytest.raises(AttributeError):
        conv.no_such_attribute  # noqa: B018


def test_qat_trains_and_converts_hf_conv1d():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(16, 8), nn.ReLU(), Conv1D(4, 16))
    x = torch.randn(32, 8)
    m = lowbit.qat.prepare(model, lowbit.qat.recipe(8, activation_bits=None))
    assert m[0].weight.shape == model[0].weight.shape == (8, 16)  # the float [in, out] layout
    assert m[0].nf == 16
    opt = torch.optim.Adam(m.parameters(), 1e-4)  # Conv1D weights are ~0.02: small steps
    for _ in range(3):
        loss = nn.functional.mse_loss(m(x), model(x).detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    q = lowbit.qat.convert(m)
    assert type(q[0]).__name__ == "QuantizedLinear" and q[0].weight.shape == (8, 16)
    with torch.no_grad():
        fast = q(x)  # on the kernels chosen for this machine
        cos = nn.functional.cosine_similarity(fast.flatten(), model(x).flatten(), dim=0)
        lowbit.backends.use_kernels(q, "reference")
        assert torch.equal(q(x), m.eval()(x))  # the reference path is the QAT simulation, bit for bit
        assert float((fast - q(x)).norm() / q(x).norm()) < 0.03
    assert cos > 0.99
