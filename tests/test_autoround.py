"""AutoRound: learned rounding and clipping per calibration stage (issue 22, item 2)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
import lowbit.formats as F
from lowbit.algorithms.autoround import RoundingWeight, tune
from lowbit.algorithms.gptq import gptq_quantize
from lowbit.granularity import PerChannel, PerGroup, parse
from lowbit.primitives import choose_qparams, dequantize, quantize
from lowbit.recipes import AutoRoundOptions, Recipe, WeightSpec

GRIDS = [
    ("int3", True, PerGroup(32)),
    ("uint2", False, PerGroup(16)),
    ("int4", True, PerChannel(0)),
    ("uint8", False, PerGroup(64)),
]


@pytest.mark.parametrize(("name", "symmetric", "granularity"), GRIDS)
def test_untuned_is_round_to_nearest_bit_for_bit(name, symmetric, granularity) -> None:
    fmt, w = F.get(name), torch.randn(24, 80, generator=torch.Generator().manual_seed(1))
    r = RoundingWeight(w, fmt, granularity, symmetric)
    codes, qp = r.result()
    ref = choose_qparams(w, fmt, granularity, symmetric)
    assert torch.equal(codes, quantize(w, fmt, ref))
    assert torch.equal(qp.scale, ref.scale)
    torch.testing.assert_close(r.fake(), dequantize(codes, fmt, qp))


@pytest.mark.parametrize(("name", "symmetric", "granularity"), GRIDS)
def test_gptq_start_is_gptq_bit_for_bit(name, symmetric, granularity) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, 80, generator=g) @ torch.randn(80, 80, generator=g)
    w, fmt = torch.randn(24, 80, generator=g), F.get(name)
    updated = torch.empty_like(w)
    codes, qp = gptq_quantize(w, 2 * x.T @ x / 256, fmt, granularity, symmetric, updated=updated)
    again, _ = gptq_quantize(w, 2 * x.T @ x / 256, fmt, granularity, symmetric)
    assert torch.equal(codes, again)  # asking for the updated weight changes nothing
    r = RoundingWeight(updated, fmt, granularity, symmetric, start=qp)
    tuned_codes, tuned_qp = r.result()
    assert torch.equal(tuned_codes, codes)
    torch.testing.assert_close(tuned_qp.scale, qp.scale)


def test_tuning_lowers_a_layers_output_error_and_keeps_the_best_step() -> None:
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(512, 64, generator=g), torch.randn(32, 64, generator=g)
    fmt = F.get("uint2")
    r = RoundingWeight(w, fmt, PerGroup(32), symmetric=False)

    def error(fake: torch.Tensor) -> torch.Tensor:
        return ((x @ fake.T - x @ w.T) ** 2).mean()

    before = float(error(r.fake()))
    info = tune({"w": r}, lambda fake, _i: error(fake["w"]), batches=1, steps=60)
    codes, qp = r.result()
    after = float(error(dequantize(codes, fmt, qp)))
    assert info["start_loss"] == pytest.approx(before)
    assert after < 0.97 * before  # white inputs: little for rounding to win, but some
    assert after == pytest.approx(info["best_loss"], rel=0.02)  # the stored codes are the best step's


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class Stack(nn.Module):
    """A held-out residual stack: embedding, repeated blocks (the stages), a head outside them."""

    def __init__(self, width: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(12, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def _data(seed: int, n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(48, 12, generator=g) for _ in range(n)]


def _recipe(algorithm, **options) -> Recipe:
    weight = WeightSpec(format="uint3", granularity="group:16", symmetric=False, algorithm=algorithm)
    return Recipe(weight=weight, modules=("linear",), autoround=AutoRoundOptions(**options))


def _error(model: nn.Module, q: nn.Module) -> float:
    with torch.no_grad():
        return sum(float(((q(x) - model(x)) ** 2).mean()) for x in _data(99))


@pytest.fixture(scope="module")
def stack() -> Stack:
    torch.manual_seed(0)
    return Stack().eval()


def test_autoround_beats_round_to_nearest_on_held_out_inputs(stack) -> None:
    calibration = _data(0)
    rtn = lowbit.quantize(stack, _recipe("rtn"), progress=False, kernels="reference")
    tuned = lowbit.quantize(
        stack, _recipe("autoround", steps=30), calibration, progress=False, kernels="reference"
    )
    refined = lowbit.quantize(
        stack, _recipe(("gptq", "autoround"), steps=30), calibration, progress=False, kernels="reference"
    )
    assert _error(stack, tuned) < 0.8 * _error(stack, rtn)
    assert _error(stack, refined) < 0.8 * _error(stack, rtn)
    up = tuned.blocks[0].up.qweight
    assert up.algorithm == "autoround" and up.info["best_loss"] < up.info["start_loss"]
    # The head is outside every stage: round to nearest with MSE clipping, and the user is told.
    assert tuned.head.qweight.algorithm == "mse"
    assert any("autoround tunes the layers inside" in n for n in tuned.lowbit_calibration.notes)
    assert refined.head.qweight.algorithm == "gptq"


def test_autoround_is_reproducible_and_round_trips(stack, tmp_path) -> None:
    calibration = _data(0)
    a = lowbit.quantize(
        stack, _recipe("autoround", steps=20), calibration, progress=False, kernels="reference"
    )
    b = lowbit.quantize(
        stack, _recipe("autoround", steps=20), calibration, progress=False, kernels="reference"
    )
    for m_a, m_b in zip(a.modules(), b.modules(), strict=True):
        if hasattr(m_a, "qweight"):
            assert torch.equal(m_a.qweight.dequantize(), m_b.qweight.dequantize())
    lowbit.save(a, tmp_path / "q")
    loaded = lowbit.load(tmp_path / "q", model=Stack())
    x = _data(5)[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), a(x))


def test_time_budget_stops_early_with_the_best_so_far(stack) -> None:
    recipe = _recipe("autoround", steps=100_000, time_budget_s=0.5)
    q = lowbit.quantize(stack, recipe, _data(0), progress=False, kernels="reference")
    steps = [m.qweight.info["steps"] for m in q.blocks.modules() if hasattr(m, "qweight")]
    assert steps and max(steps) < 100_000


def test_autoround_on_a_hugging_face_gpt2() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    calibration = [
        {"input_ids": torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(i))}
        for i in range(3)
    ]
    weight = WeightSpec(format="int3", granularity="group:16", algorithm="autoround")
    recipe = Recipe(
        weight=weight, modules=("linear",), exclude=("lm_head",), autoround=AutoRoundOptions(steps=15)
    )
    q = lowbit.quantize(model, recipe, calibration, progress=False, kernels="reference")
    names = [s.name for s in q.lowbit_calibration.stages]
    assert names == ["transformer.h.0", "transformer.h.1"]
    attn = q.transformer.h[1].attn.c_attn.qweight  # a transposed Conv1D weight
    assert attn.algorithm == "autoround" and attn.info["steps"] == 15
    with torch.no_grad():
        out = q(**calibration[0]).logits
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("weight", "message"),
    [
        (dict(format="nf4", granularity="group:16", algorithm="autoround"), "integer format"),
        (dict(format="int4", granularity="group:16", algorithm=("awq", "autoround")), "give it alone"),
        (
            dict(format="int4", granularity="group:16", algorithm=("autoround", "bias_correction")),
            "give it alone",
        ),
    ],
)
def test_refusals_name_the_problem(stack, weight, message) -> None:
    recipe = Recipe(weight=WeightSpec(**weight), modules=("linear",))
    with pytest.raises(ValueError, match=message):
        lowbit.quantize(stack, recipe, _data(0), progress=False, kernels="reference")


def test_rnn_layers_are_refused_with_what_to_do() -> None:
    model = nn.Sequential(nn.LSTM(8, 8, batch_first=True))
    recipe = Recipe(weight=WeightSpec(format="int4", granularity="channel", algorithm="autoround"))
    with pytest.raises(ValueError, match="give this RNN gptq or rtn"):
        lowbit.quantize(model, recipe, [torch.randn(2, 5, 8)], progress=False, kernels="reference")


def test_options_are_checked_and_kept_out_of_old_recipes() -> None:
    assert "autoround" not in Recipe().to_dict()
    r = Recipe(autoround=AutoRoundOptions(steps=50, time_budget_s=30.0))
    assert Recipe.from_dict(r.to_dict()) == r
    with pytest.raises(ValueError, match="autoround.steps"):
        AutoRoundOptions(steps=0)
    assert parse("group:16") == PerGroup(16)
