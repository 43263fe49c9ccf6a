"""GPTQ, AWQ, SmoothQuant and bias correction through ``lowbit.quantize``, and causal LMs end to end."""

from __future__ import annotations

import copy

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
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if arch == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=64)
        make = transformers.GPT2LMHeadModel
    else:
        config = transformers.LlamaConfig(
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            hidden_size=32,
            intermediate_size=64,
            vocab_size=97,
            max_position_embeddings=64,
        )
        make = transformers.LlamaForCausalLM
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
