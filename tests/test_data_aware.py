"""GPTQ, AWQ, SmoothQuant and bias correction through ``lowbit.quantize``, and causal LMs end to end."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import lowbit
from lowbit.recipes import ActivationSpec, Recipe, WeightSpec


def correlated_mlp(seed: int = 0) -> tuple[nn.Module, list[torch.Tensor]]:
    """An MLP fed strongly correlated inputs with a few large channels: where RTN is weakest."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32))
    mix = torch.randn(64, 64, generator=g) / 8 + torch.eye(64)
    scale = torch.ones(64)
    scale[:4] = 20.0  # outlier channels
    batches = [(torch.randn(128, 64, generator=g) @ mix) * scale for _ in range(4)]
    return model, batches


def output_error(model: nn.Module, q: nn.Module, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return sum(float(((model(x) - q(x)) ** 2).mean()) for x in batches)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_beats_rtn_in_the_model(symmetric):
    model, batches = correlated_mlp()
    fmt = "int4" if symmetric else "uint4"
    rtn = Recipe(weight=WeightSpec(format=fmt, granularity="group:32", symmetric=symmetric))
    gptq = Recipe(
        weight=WeightSpec(format=fmt, granularity="group:32", symmetric=symmetric, algorithm="gptq")
    )
    q_rtn = lowbit.quantize(model, rtn)
    q_gptq = lowbit.quantize(model, gptq, calibration=batches, progress=False)
    assert output_error(model, q_gptq, batches) < output_error(model, q_rtn, batches)
    for name in ("0", "2"):
        info = q_gptq.get_submodule(name).qweight.info
        assert info["gptq_error"] <= info["rtn_error"]


def test_awq_beats_rtn_and_round_trips(tmp_path):
    model, batches = correlated_mlp(1)
    q_rtn = lowbit.quantize(
        model, Recipe(weight=WeightSpec(format="uint4", granularity="group:64", symmetric=False))
    )
    q_awq = lowbit.quantize(model, "int4-awq", calibration=batches, progress=False)
    assert output_error(model, q_awq, batches) < output_error(model, q_rtn, batches)
    lowbit.save(q_awq, tmp_path / "awq")
    reloaded = lowbit.load(tmp_path / "awq", model=copy.deepcopy(model))
    assert torch.equal(reloaded(batches[0]), q_awq(batches[0]))


def test_smoothquant_lowers_w8a8_error_on_outlier_activations(tmp_path):
    model, batches = correlated_mlp(2)
    plain = lowbit.quantize(model, "int8-static", calibration=batches, progress=False)
    smooth = lowbit.quantize(model, "int8-smoothquant", calibration=batches, progress=False)
    assert output_error(model, smooth, batches) < output_error(model, plain, batches)
    lowbit.save(smooth, tmp_path / "sq")
    reloaded = lowbit.load(tmp_path / "sq", model=copy.deepcopy(model))
    assert torch.equal(reloaded(batches[0]), smooth(batches[0]))


def test_bias_correction_removes_the_mean_output_shift(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, bias=False), nn.ReLU(), nn.Conv2d(16, 8, 3))
    batches = [torch.rand(8, 3, 12, 12) + 0.5 for _ in range(4)]  # positive means: a shift shows
    spec = Recipe(weight=WeightSpec(format="int3", granularity="channel"))
    corrected = Recipe(weight=WeightSpec(format="int3", granularity="channel"), bias_correction=True)
    q_plain = lowbit.quantize(model, spec)
    q_bc = lowbit.quantize(model, corrected, calibration=batches, progress=False)

    def mean_shift(q: nn.Module) -> float:
        with torch.no_grad():
            return sum(float((model(x) - q(x)).mean(dim=(0, 2, 3)).abs().mean()) for x in batches)

    assert mean_shift(q_bc) < 0.5 * mean_shift(q_plain)
    lowbit.save(q_bc, tmp_path / "bc")  # the first conv gained a bias: loading must recreate it
    reloaded = lowbit.load(tmp_path / "bc", model=copy.deepcopy(model))
    assert torch.equal(reloaded(batches[0]), q_bc(batches[0]))


def test_data_aware_recipes_need_data():
    model, _ = correlated_mlp()
    with pytest.raises(ValueError, match="gptq needs calibration data"):
        lowbit.quantize(model, "int4-gptq")


def test_gptq_on_a_non_integer_format_is_a_clear_error():
    model, batches = correlated_mlp()
    with pytest.raises(ValueError, match="GPTQ needs an integer format"):
        lowbit.quantize(model, Recipe(weight=WeightSpec(format="nf4", algorithm="gptq")), calibration=batches)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_causal_lm_quantize_save_load_generate(arch, tmp_path):
    make, config = _tiny_lm_config(arch)
    torch.manual_seed(0)
    model = make(config).eval()
    ids = torch.randint(0, 97, (2, 12))
    calibration = [{"input_ids": ids}]
    recipe = Recipe(
        weight=WeightSpec(format="uint4", granularity="group:16", symmetric=False, algorithm="gptq"),
        activation=ActivationSpec(mode="none"),
    )
    q = lowbit.quantize(model, recipe, calibration=calibration, progress=False)
    lowbit.save(q, tmp_path / "lm")
    reloaded = lowbit.load(tmp_path / "lm", model=make(config).eval())
    prompt = ids[:1, :4]
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        assert torch.equal(q(prompt).logits, reloaded(prompt).logits)
        generated = reloaded.generate(prompt, **kwargs)
        assert torch.equal(generated, q.generate(prompt, **kwargs))
    assert generated.shape == (1, 9)


# --- presets: embeddings and output head at a safe format -------------------------------------------


def _tiny_lm_config(arch: str, **gpt2_extra: int) -> tuple[type, object]:
    """A 2-block GPT-2 (Conv1D layers, head tied to the token embedding) or Llama (RMSNorm,
    SwiGLU, rotary; untied head) class and config, vocabulary 97."""
    transformers = pytest.importorskip("transformers")
    if arch == "gpt2":
        config = transformers.GPT2Config(
            n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=64, **gpt2_extra
        )
        return transformers.GPT2LMHeadModel, config
    config = transformers.LlamaConfig(
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        hidden_size=32,
        intermediate_size=64,
        vocab_size=97,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM, config


def _tiny_lm(arch: str) -> tuple[nn.Module, list[dict[str, torch.Tensor]]]:
    make, config = _tiny_lm_config(arch, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = make(config)
    g = torch.Generator().manual_seed(1)
    return model.eval(), [{"input_ids": torch.randint(0, 97, (4, 40), generator=g)} for _ in range(2)]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_data_aware_presets_keep_embeddings_and_the_output_head_at_int8(arch, capsys):
    model, calibration = _tiny_lm(arch)
    q = lowbit.quantize(model, "int4-gptq", calibration=calibration, progress=True)
    embed = q.get_input_embeddings()
    assert q.lm_head.qweight.fmt.name == "int8" and embed.qweight.fmt.name == "int8"
    blocks = [m for n, m in q.named_modules() if n.endswith(("c_fc", "up_proj"))]
    assert blocks and all(m.qweight.fmt.name == "uint4" and m.qweight.algorithm == "gptq" for m in blocks)
    assert "output head (lm_head) kept at int8" in capsys.readouterr().err
    assert q.lowbit_recipe.embeddings_and_head == "recipe"  # the choice is explicit in the artifact
    kept_float = lowbit.quantize(
        model, dataclasses.replace(lowbit.recipes.get("int4-gptq"), embeddings_and_head="float"),
        calibration=calibration, progress=False,
    )
    assert type(kept_float.lm_head) is nn.Linear and type(kept_float.get_input_embeddings()) is nn.Embedding


def test_the_output_head_is_found_from_structure_not_by_name():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.zz_first, self.act, self.aa_last = nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.aa_last(self.act(self.zz_first(x)))

    q = lowbit.quantize(Net(), "int4-awq", calibration=[torch.randn(64, 16)], progress=False)
    assert q.aa_last.qweight.fmt.name == "int8" and q.zz_first.qweight.fmt.name == "uint4"


def test_the_data_aware_presets_exist():
    expected = {"int4-gptq", "int4-awq", "int4-awq-gptq", "int3-gptq", "w8a8-smoothquant"}
    assert expected <= set(lowbit.recipes.names())
    for name in expected:
        assert lowbit.recipes.get(name).embeddings_and_head == "int8", name


# --- modifier sequences -----------------------------------------------------------------------------


def test_awq_then_gptq_runs_in_order_and_beats_rtn():
    model, batches = correlated_mlp(4)
    spec = dict(format="uint4", granularity="group:32", symmetric=False)
    q_rtn = lowbit.quantize(model, Recipe(weight=WeightSpec(**spec)))
    recipe = Recipe(weight=WeightSpec(**spec, algorithm=("awq", "gptq")))
    q = lowbit.quantize(model, recipe, calibration=batches, progress=False)
    assert q[0].qweight.algorithm == "awq+gptq" and q[0].input_smooth.shape == (64,)
    assert output_error(model, q, batches) < output_error(model, q_rtn, batches)


def test_smoothquant_then_gptq_for_w8a8():
    model, batches = correlated_mlp(5)
    plain = lowbit.quantize(model, "int8-dynamic", calibration=batches, progress=False)
    both = lowbit.quantize(model, "w8a8-smoothquant", calibration=batches, progress=False)
    assert both[0].qweight.algorithm == "smoothquant+gptq" and both[0].input_smooth is not None
    assert output_error(model, both, batches) < output_error(model, plain, batches)


@pytest.mark.parametrize(
    "algorithm, message",
    [
        (("gptq", "awq"), "gptq already quantizes the weight"),
        (("rtn", "gptq"), "rtn already quantizes the weight"),
        (("smoothquant",), "ends with smoothquant, which only rescales"),
        (("smoothquant", "awq", "gptq"), "both rescale the same input channels"),
        (("bias_correction", "gptq"), "must come last"),
        (("gptq", "gptq"), "lists gptq twice"),
    ],
)
def test_meaningless_sequences_are_refused_before_any_work(algorithm, message):
    model, batches = correlated_mlp()
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    recipe = Recipe(weight=WeightSpec(format="int4", algorithm=algorithm))
    with pytest.raises(ValueError, match=message):
        lowbit.quantize(model, recipe, calibration=batches, progress=False)
    assert not calls


def test_smoothquant_with_float_activations_is_refused_naming_the_layer():
    model, batches = correlated_mlp()
    recipe = Recipe(weight=WeightSpec(format="int8", algorithm=("smoothquant", "gptq")))
    with pytest.raises(ValueError, match="layer 0: smoothquant .* keeps its activations float"):
        lowbit.quantize(model, recipe, calibration=batches, progress=False)


def test_a_recipe_with_a_sequence_round_trips_through_yaml_and_the_artifact(tmp_path):
    model, batches = correlated_mlp(6)
    recipe = lowbit.recipes.get("int4-awq-gptq")
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    q = lowbit.quantize(model, recipe, calibration=batches, progress=False)
    for compression in ("none", "lzma"):
        lowbit.save(q, tmp_path / compression, compression=compression)
        reloaded = lowbit.load(tmp_path / compression, model=copy.deepcopy(model))
        assert reloaded.lowbit_recipe == q.lowbit_recipe
        assert reloaded.lowbit_recipe.weight.algorithm == ("awq", "gptq")
        assert torch.equal(reloaded(batches[0]), q(batches[0]))


# --- layer kinds ------------------------------------------------------------------------------------


class RNNLM(nn.Module):
    """Embedding -> two-layer (optionally bidirectional) LSTM or GRU -> linear head."""

    def __init__(self, cell: type[nn.Module] = nn.LSTM, bidirectional: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 24)
        self.rnn = cell(24, 32, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(64 if bidirectional else 32, 50)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(ids))[0])


@pytest.mark.parametrize("cell, bidirectional", [(nn.LSTM, False), (nn.GRU, True)])
@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
def test_lstm_and_gru_under_gptq_and_awq(cell, bidirectional, algorithm):
    torch.manual_seed(0)
    model = RNNLM(cell, bidirectional).eval()
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 50, (8, 20), generator=g) for _ in range(3)]
    spec = dict(format="int3", granularity="group:8")
    q_rtn = lowbit.quantize(model, Recipe(weight=WeightSpec(**spec)))
    q = lowbit.quantize(model, Recipe(weight=WeightSpec(**spec, algorithm=algorithm)), calibration=batches)
    weights = q.rnn.quantized_weights()
    assert len(weights) == 4 * (2 if bidirectional else 1)
    assert all(w.algorithm == algorithm for w in weights.values())
    assert q.embed.qweight.algorithm == "mse"  # a lookup has no inputs: clip-searched round to nearest
    assert output_error(model, q, batches) < output_error(model, q_rtn, batches)
    if algorithm == "awq":  # the sequence input is divided at run time; inner layers are not
        assert q.rnn.input_smooth.shape == (24,)


def test_awq_on_convolutions_scales_input_channels_and_groups_along_the_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 16, 3, padding=1))
    batches = [torch.randn(4, 8, 10, 10) * torch.linspace(0.1, 4, 8).reshape(1, 8, 1, 1) for _ in range(3)]
    spec = dict(format="uint4", granularity="group:64", symmetric=False)
    q = lowbit.quantize(model, Recipe(weight=WeightSpec(**spec, algorithm="awq")), calibration=batches)
    q_rtn = lowbit.quantize(model, Recipe(weight=WeightSpec(**spec)))
    assert q[0].input_smooth.shape == (8,) and q[2].input_smooth.shape == (32,)
    assert q[2].qweight.shape == (16, 32 * 9) and q[2].qweight.bits_per_param < 5
    assert output_error(model, q, batches) < output_error(model, q_rtn, batches)


def test_gptq_on_a_grouped_convolution_calibrates_each_group():
    torch.manual_seed(0)
    grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
    model = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), grouped)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(8, 4, 8, 8, generator=g) for _ in range(3)]
    spec = dict(format="int3", granularity="channel")
    q = lowbit.quantize(model, Recipe(weight=WeightSpec(**spec, algorithm="gptq")), calibration=batches)
    q_rtn = lowbit.quantize(model, Recipe(weight=WeightSpec(**spec)))
    assert q[2].qweight.algorithm == "gptq" and q[2].qweight.shape == (16, 4 * 9)
    assert output_error(model, q, batches) < output_error(model, q_rtn, batches)


def test_unsupported_layers_are_named():
    model = nn.Sequential(nn.LSTM(8, 16, proj_size=4))
    recipe = Recipe(weight=WeightSpec(format="int4", algorithm="gptq"))
    with pytest.raises(ValueError, match="layer 0: LSTM with proj_size is not supported by gptq"):
        lowbit.quantize(model, recipe, calibration=[torch.randn(5, 2, 8)], progress=False)


# --- bad calibration data ---------------------------------------------------------------------------


def test_fewer_calibration_rows_than_inputs_warns_with_the_number_needed():
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 8))
    recipe = Recipe(weight=WeightSpec(format="int4", algorithm="gptq"))
    with pytest.warns(UserWarning, match="e.g. 2: 40 rows for 96 inputs.*give at least 96 rows"):
        lowbit.quantize(model, recipe, calibration=[torch.randn(40, 64)], progress=False)


def test_nan_activations_are_an_error_naming_the_layer():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[2].weight.fill_(1e38)  # finite, but its outputs overflow to inf
    recipe = Recipe(weight=WeightSpec(format="int4", algorithm="gptq"))
    with pytest.raises(ValueError, match="layer 4 received NaN or Inf inputs"):
        lowbit.quantize(model, recipe, calibration=[torch.randn(32, 16)], progress=False)
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer 2 weight \(1 NaN"):
        lowbit.quantize(model, recipe, calibration=[torch.randn(32, 16)], progress=False)
