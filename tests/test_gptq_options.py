"""GPTQ options: the function's static groups and observer, and the recipe's ``gptq`` block."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import lowbit
import lowbit.formats as F
from lowbit.algorithms import gptq as gptq_module
from lowbit.algorithms.gptq import HessianAccumulator, gptq_quantize
from lowbit.algorithms.rtn import choose_weight_qparams
from lowbit.granularity import PerChannel, PerGroup
from lowbit.primitives import dequantize, quantize
from lowbit.recipes import GPTQOptions, Recipe, RecipeError, WeightSpec


@pytest.fixture(scope="module")
def layer() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    mix = torch.randn(96, 96, generator=gen) * torch.logspace(0, -1.5, 96).unsqueeze(1)
    energy = torch.exp(torch.randn(96, generator=gen))
    x = (torch.randn(2048, 96, generator=gen) @ mix) * energy
    acc = HessianAccumulator(96)
    acc.update(x)
    w = torch.randn(48, 96, generator=gen)
    w[:, 5] *= 6  # an outlier column: the MSE observer clips its group's range
    return w, x, acc.hessian()


def error(x: torch.Tensor, w: torch.Tensor, codes: torch.Tensor, fmt, qp) -> float:
    return float(((x @ (w - dequantize(codes, fmt, qp)).T) ** 2).mean())


def test_static_groups_take_every_range_up_front_from_the_original_weight(layer) -> None:
    w, x, h = layer
    fmt, g = F.get("uint4"), PerGroup(32)
    codes_s, qp_s = gptq_quantize(w, h, fmt, g, False, static_groups=True)
    upfront = choose_weight_qparams(w, fmt, g, False, "rtn")
    torch.testing.assert_close(qp_s.scale, upfront.scale, rtol=0, atol=0)
    assert torch.equal(qp_s.zero_point, upfront.zero_point)
    codes_d, qp_d = gptq_quantize(w, h, fmt, g, False)  # dynamic: ranges from the updated weight
    assert not torch.equal(qp_d.scale, qp_s.scale)
    # Both compensate: far below round to nearest on these correlated inputs.
    rtn_err = error(x, w, quantize(w, fmt, upfront), fmt, upfront)
    assert error(x, w, codes_s, fmt, qp_s) < 0.6 * rtn_err
    assert error(x, w, codes_d, fmt, qp_d) < 0.6 * rtn_err


def test_act_order_without_static_groups_is_refused() -> None:
    w, h = torch.randn(4, 8), torch.eye(8)
    with pytest.raises(ValueError, match="column permutation"):
        gptq_quantize(w, h, F.get("int4"), PerGroup(4), act_order=True, static_groups=False)
    # act_order alone implies static groups (the function's behaviour before the option existed).
    a = gptq_quantize(w, h, F.get("int4"), PerGroup(4), act_order=True)
    b = gptq_quantize(w, h, F.get("int4"), PerGroup(4), act_order=True, static_groups=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1].scale, b[1].scale)


@pytest.mark.parametrize("gran", [PerChannel(0), PerGroup(32)], ids=["channel", "g32"])
def test_mse_observer_with_an_identity_hessian_is_rtn_with_mse_clipping(gran) -> None:
    """No correlations: no compensation, so the codes and scales are those of the MSE clip search."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 96, generator=gen) ** 3  # heavy tails: clipping pays off
    fmt = F.get("int3")
    for static in (False, True):
        codes, qp = gptq_quantize(w, torch.eye(96), fmt, gran, True, static_groups=static, observer="mse")
        ref = choose_weight_qparams(w, fmt, gran, True, "mse")
        torch.testing.assert_close(qp.scale, ref.scale, rtol=0, atol=0)
        assert torch.equal(codes, quantize(w, fmt, ref))
    minmax = choose_weight_qparams(w, fmt, gran, True, "rtn")
    assert bool((ref.scale < minmax.scale).any())  # the search did clip something


def test_mse_observer_clips_the_outlier_group_and_is_deterministic(layer) -> None:
    w, x, h = layer
    fmt, g = F.get("int3"), PerGroup(32)
    _c0, qp0 = gptq_quantize(w, h, fmt, g, True)
    c1, qp1 = gptq_quantize(w, h, fmt, g, True, observer="mse")
    c2, qp2 = gptq_quantize(w, h, fmt, g, True, observer="mse")
    assert torch.equal(c1, c2) and torch.equal(qp1.scale, qp2.scale)
    assert float(qp1.scale[:, 0].mean()) < float(qp0.scale[:, 0].mean())  # group 0 holds column 5
    with pytest.raises(ValueError, match="unknown GPTQ observer"):
        gptq_quantize(w, h, fmt, g, observer="percentile")


# --- the recipe's gptq block ----------------------------------------------------------------------------


def test_gptq_options_round_trip_and_default_to_todays_behaviour() -> None:
    options = GPTQOptions(act_order=True, static_groups=True, damping=0.05, block_size=32, observer="mse")
    recipe = Recipe(weight=WeightSpec(format="int4", granularity="group:32", algorithm="gptq"), gptq=options)
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    assert Recipe.from_dict(recipe.to_dict()).gptq == options
    assert Recipe.from_dict({}).gptq == GPTQOptions()
    # Left at the defaults, the block is not written: the dict (and artifact manifests) as before.
    assert "gptq" not in Recipe().to_dict() and recipe.to_dict()["gptq"]["act_order"] is True
    # The defaults are gptq_quantize's own, so a recipe without the block quantizes as before.
    defaults = {
        k: p.default
        for k, p in inspect.signature(gptq_quantize).parameters.items()
        if k in ("block_size", "percdamp", "act_order", "observer")
    }
    d = GPTQOptions()
    assert defaults == {
        "block_size": d.block_size,
        "percdamp": d.damping,
        "act_order": d.act_order,
        "observer": d.observer,
    }
    assert d.static_groups is False


@pytest.mark.parametrize(
    "options, message",
    [
        ({"act_order": True}, "column permutation"),
        ({"damping": -0.1}, r"gptq.damping must be in \[0, 1\]"),
        ({"damping": 1.5}, r"gptq.damping must be in \[0, 1\]"),
        ({"block_size": 0}, "block_size must be >= 1"),
        ({"block_size": 1.5}, "recipe.gptq.block_size: expected an integer"),
        ({"observer": "percentile"}, "unknown gptq observer 'percentile'"),
        ({"act_order": "yes", "static_groups": True}, "recipe.gptq.act_order: expected true or false"),
        ({"damp_percent": 0.01}, "unknown key 'damp_percent' in recipe.gptq"),
    ],
)
def test_bad_gptq_options_are_refused_naming_the_key(options, message) -> None:
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict({"gptq": options})


def _mlp() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(64, 64, generator=g) * torch.logspace(0, -1, 64)
    return model.eval(), [(torch.randn(128, 64, generator=g) @ mix) for _ in range(2)]


def _weights(q: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in q.state_dict().items()}


def test_recipe_options_reach_gptq(monkeypatch) -> None:
    seen: list[dict] = []
    real = gptq_module.gptq_quantize

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr("lowbit.ptq.modifiers.gptq_quantize", spy)
    model, cal = _mlp()
    options = GPTQOptions(act_order=True, static_groups=True, damping=0.1, block_size=16, observer="mse")
    recipe = Recipe(weight=WeightSpec(format="int4", granularity="group:32", algorithm="gptq"), gptq=options)
    lowbit.quantize(model, recipe, calibration=cal, progress=False)
    assert len(seen) == 3
    for kwargs in seen:
        assert kwargs == {
            "block_size": 16,
            "percdamp": 0.1,
            "act_order": True,
            "static_groups": True,
            "observer": "mse",
        }


@pytest.mark.parametrize(
    "options",
    [
        GPTQOptions(act_order=True, static_groups=True),
        GPTQOptions(static_groups=True),
        GPTQOptions(observer="mse"),
        GPTQOptions(damping=0.5),
    ],
    ids=["act_order", "static_groups", "mse", "damping"],
)
def test_each_option_changes_the_weights_and_stays_deterministic(options) -> None:
    model, cal = _mlp()
    spec = WeightSpec(format="int3", granularity="group:32", algorithm="gptq")
    default = _weights(lowbit.quantize(model, Recipe(weight=spec), calibration=cal, progress=False))
    runs = [
        _weights(lowbit.quantize(model, Recipe(weight=spec, gptq=options), calibration=cal, progress=False))
        for _ in range(2)
    ]
    assert runs[0].keys() == default.keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in default)
    assert any(not torch.equal(runs[0][k], default[k]) for k in default)


def test_block_size_changes_speed_only() -> None:
    model, cal = _mlp()
    spec = WeightSpec(format="int4", granularity="group:32", algorithm="gptq")
    a = _weights(lowbit.quantize(model, Recipe(weight=spec), calibration=cal, progress=False))
    b = _weights(
        lowbit.quantize(
            model, Recipe(weight=spec, gptq=GPTQOptions(block_size=8)), calibration=cal, progress=False
        )
    )
    # Same algorithm up to float summation order: nearly every code agrees.
    codes = [k for k in a if a[k].dtype in (torch.uint8, torch.int8)]
    assert codes
    agree = sum(int((a[k] == b[k]).sum()) for k in codes) / sum(a[k].numel() for k in codes)
    assert agree > 0.99
