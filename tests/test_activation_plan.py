"""int8-dynamic measures each layer's activation form (``lowbit.ptq.activation_plan``).

Held-out models built here: one whose linear input has a few outlier *channels* (SmoothQuant
fixes that, so per-tensor should win) and one whose linear input has rows of very different
magnitude (no channel scaling fixes that: per-token should stay).
"""

from __future__ import annotations

import torch
from torch import nn

import lowbit
from lowbit.ptq.activation_plan import TOLERANCE, measure_activation_plan
from lowbit.recipes import resolve


class OutlierChannels(nn.Module):
    """``a`` reads activations with 4 channels 60x the rest; ``b`` reads rows whose scale varies 1000x."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        gain = torch.ones(32)
        gain[torch.randperm(32, generator=g)[:4]] = 60.0
        self.register_buffer("gain", gain)
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x * self.gain))
        return self.b(h * row_scale)


def _data(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(64, 32, generator=g), torch.exp(3 * torch.randn(64, 1, generator=g))) for _ in range(n)
    ]


def test_outlier_channels_go_per_tensor_and_row_scales_stay_per_token():
    model = OutlierChannels().eval()
    plan = measure_activation_plan(model, resolve("int8-dynamic"), _data())
    forms = {c.name: c.form for c in plan.choices}
    assert forms == {"a": "tensor", "b": "token"}
    for c in plan.choices:  # the rule as documented
        assert (c.form == "tensor") == (c.tensor_error <= TOLERANCE * c.token_error)
    assert "| a |" in plan.table() and "1 per tensor" in plan.summary()


def test_the_plan_becomes_an_ordinary_recipe_stored_in_the_artifact(tmp_path):
    model = OutlierChannels().eval()
    data = _data()
    q = lowbit.quantize(model, "int8-dynamic", calibration=data, progress=False)
    recipe = q.lowbit_recipe
    assert recipe.activation_plan == "fixed" and recipe.smoothquant_alpha is not None
    assert [r.activation.granularity for r in recipe.overrides] == ["tensor"]
    assert recipe.overrides[0].matches("a") and not recipe.overrides[0].matches("b")
    assert "b" in recipe.smoothquant_exclude and "a" not in recipe.smoothquant_exclude
    assert q.a.input_quant.spec.granularity == "tensor" and q.b.input_quant.spec.granularity == "token"
    assert getattr(q.a, "input_smooth", None) is not None and getattr(q.b, "input_smooth", None) is None
    lowbit.save(q, tmp_path / "m")
    back = lowbit.load(tmp_path / "m", model=OutlierChannels().eval())
    x = data[0]
    with torch.no_grad():
        assert torch.equal(q(*x), back(*x))
    assert back.lowbit_recipe.overrides == recipe.overrides
    # Quantizing again with the stored recipe repeats the choices (no second measurement).
    again = lowbit.quantize(model, back.lowbit_recipe, calibration=data, progress=False)
    assert not hasattr(again, "lowbit_activation_plan")
    with torch.no_grad():
        assert torch.equal(again(*x), q(*x))


def test_per_tensor_on_outliers_is_as_accurate_as_per_token_everywhere():
    model = OutlierChannels().eval()
    data = _data()
    planned = lowbit.quantize(model, "int8-dynamic", calibration=data, progress=False)
    fixed = lowbit.quantize(model, lowbit.recipes.with_overrides("int8-dynamic", activation_plan="fixed"),
                            progress=False)  # fmt: skip
    cos = torch.nn.functional.cosine_similarity
    with torch.no_grad():
        ref = torch.cat([model(*b) for b in data])
        got_plan = torch.cat([planned(*b) for b in data])
        got_fixed = torch.cat([fixed(*b) for b in data])
    assert float(cos(got_plan.flatten(), ref.flatten(), dim=0)) >= 0.999
    assert float(cos(got_fixed.flatten(), ref.flatten(), dim=0)) >= 0.999


def test_layers_reading_one_input_are_decided_together():
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
            self.o = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.o(self.q(x) * torch.sigmoid(self.k(x)) + self.v(x))

    torch.manual_seed(0)
    model = Attention().eval()
    plan = measure_activation_plan(model, resolve("int8-dynamic"), [torch.randn(8, 16) for _ in range(2)])
    group = {c.name: c.group for c in plan.choices}
    assert group["q"] == group["k"] == group["v"] != group["o"]
    assert len({c.form for c in plan.choices if c.name in "qkv"}) == 1


def test_without_calibration_int8_dynamic_stays_per_token():
    model = OutlierChannels().eval()
    q = lowbit.quantize(model, "int8-dynamic", progress=False)
    assert not hasattr(q, "lowbit_activation_plan")
    assert q.a.input_quant.spec.granularity == "token" and q.b.input_quant.spec.granularity == "token"


def test_static_and_weight_only_recipes_have_nothing_to_measure():
    model = OutlierChannels().eval()
    static = lowbit.recipes.with_overrides("int8-static", activation_plan="measured")
    assert measure_activation_plan(model, static, _data()).choices == []
    assert lowbit.recipes.get("int8-static").activation_plan == "fixed"
