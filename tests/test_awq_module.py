"""AWQ judged at the output of the enclosing module: structure, the judge, the search, the pipeline."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
import lowbit.formats as F
from lowbit.algorithms.awq import _quantized, awq_search_scales, scales_for_alpha, weight_mean
from lowbit.granularity import PerChannel, PerGroup
from lowbit.ptq.judge import ModuleJudge, enclosing, judged_module, record
from lowbit.ptq.matrices import matrices, read
from lowbit.ptq.plan import plan_model
from lowbit.recipes import AWQOptions, Recipe, RecipeError, WeightSpec


class Attention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.a, self.b, self.c, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = torch.softmax(self.a(x) @ self.b(x).transpose(-1, -2) / x.shape[-1] ** 0.5, dim=-1)
        return self.out(att @ self.c(x))


class Gated(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.p, self.q, self.r = nn.Linear(d, 2 * d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.r(torch.nn.functional.silu(self.p(x)) * self.q(x))


class Block(nn.Module):
    """Names chosen to match nothing a name rule could know (no q_proj, gate_proj...)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mix, self.ff = Attention(d), Gated(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mix(self.n1(x))
        return x + self.ff(self.n2(x))


class Net(nn.Module):
    def __init__(self, d: int = 32, n: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.body = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.body:
            x = block(x)
        return self.head(x)


def _net() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():  # a few large input channels, as in trained transformers
        for block in model.body:
            block.n1.weight[:3] *= 8
            block.n2.weight[:3] *= 8
    g = torch.Generator().manual_seed(1)
    return model, [torch.randn(4, 16, 8, generator=g) for _ in range(3)]


def test_enclosing_module_is_the_smallest_common_ancestor_inside_the_stage() -> None:
    model, _ = _net()
    stage = model.body[1]
    assert enclosing("body.1", stage, ["body.1.mix.a", "body.1.mix.b", "body.1.mix.c"])[0] == "body.1.mix"
    assert enclosing("body.1", stage, ["body.1.ff.p", "body.1.ff.q"])[1] is stage.ff
    assert enclosing("body.1", stage, ["body.1.mix.a", "body.1.ff.p"])[1] is stage
    # One layer alone: "module" keeps its own output (exact from statistics), "parent" goes up one.
    assert judged_module("module", "body.1", stage, ["body.1.mix.out"]) is None
    assert judged_module("parent", "body.1", stage, ["body.1.mix.out"]) == ("body.1.mix", stage.mix)
    assert judged_module("stage", "body.1", stage, ["body.1.mix.out"]) == ("body.1", stage)
    assert judged_module("layer", "body.1", stage, ["body.1.mix.a", "body.1.mix.b"]) is None


def test_the_judge_measures_at_the_module_output_and_restores_the_weights() -> None:
    model, batches = _net()
    stage = model.body[0]
    layers = {p.name: p for p in plan_model(model, Recipe(modules=("linear",))).layers}
    judge = ModuleJudge("body.0.ff", stage.ff)
    record(model, [((x,), {}) for x in batches[:2]], [judge])
    assert len(judge.calls) == 2
    p = layers["body.0.ff.p"]
    (m,) = matrices(p)
    before = read(p, m)
    assert judge.error([(p, m, before)]) == 0.0
    small = judge.error([(p, m, before * 1.01)])
    large = judge.error([(p, m, before * 1.1)])
    assert 0.0 < small < large
    assert torch.equal(read(p, m), before)  # restored bit for bit
    # The same error by hand: the module's output with the candidate against the float one.
    x = judge.calls[0][0][0]
    ref = stage.ff(x)
    with torch.no_grad():
        stage.ff.p.weight.mul_(1.1)
        direct = ((stage.ff(x) - ref) ** 2).mean()
        stage.ff.p.weight.div_(1.1)
        x2 = judge.calls[1][0][0]
        ref2 = stage.ff(x2)
        stage.ff.p.weight.mul_(1.1)
        direct2 = ((stage.ff(x2) - ref2) ** 2).mean()
        stage.ff.p.weight.div_(1.1)
    assert large == pytest.approx(float(direct + direct2) / 2, rel=1e-4)


def test_the_search_takes_the_candidate_the_loss_prefers() -> None:
    g = torch.Generator().manual_seed(0)
    w, act = torch.randn(8, 32, generator=g), torch.rand(32, generator=g) + 0.1
    fmt, gran = F.get("int4"), PerGroup(16)
    target = scales_for_alpha(act, 0.7)

    def loss(effective: list[torch.Tensor]) -> float:  # smallest where Q(w * s) / s is that of alpha 0.7
        return float((effective[0] - _quantized(w * target, fmt, gran, True) / target).abs().sum())

    s = awq_search_scales(w, None, fmt, gran, act_mean=act, loss=loss, n_grid=10)
    torch.testing.assert_close(s, target, rtol=0, atol=0)
    # Duo scaling keeps s = 1 (round to nearest) as a candidate: a loss that prefers it gets it.
    rtn = _quantized(w, fmt, gran, True)
    s = awq_search_scales(
        w, None, fmt, gran, act_mean=act, loss=lambda e: float((e[0] - rtn).abs().sum()), duo_scaling=True
    )
    assert torch.equal(s, torch.ones(32))


def test_duo_scaling_uses_the_normalised_weight_magnitude() -> None:
    w = torch.tensor([[1.0, 2.0, 4.0, 8.0], [8.0, 4.0, 2.0, 1.0]])
    torch.testing.assert_close(weight_mean([w], PerChannel(0)), torch.tensor([0.5625, 0.375, 0.375, 0.5625]))
    torch.testing.assert_close(weight_mean([w], PerGroup(2)), torch.tensor([0.75, 0.75, 0.75, 0.75]))


def _awq(search: str, **extra) -> Recipe:
    spec = WeightSpec(format="int3", granularity="group:16", algorithm="awq")
    return Recipe(weight=spec, modules=("linear",), awq=AWQOptions(search=search, **extra))


def _state(q: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in q.state_dict().items()}


def test_module_search_in_the_pipeline_is_deterministic_and_judges_where_it_should(monkeypatch) -> None:
    import lowbit.ptq.modifiers as modifiers

    judged: list[tuple[tuple[str, ...], str | None]] = []
    real = modifiers.apply_group

    def spy(group, recipe, judge=None):
        judged.append((tuple(group.names), None if judge is None else judge.name))
        return real(group, recipe, judge)

    monkeypatch.setattr("lowbit.ptq.pipeline.apply_group", spy)
    model, batches = _net()
    a = lowbit.quantize(model, _awq("module"), calibration=batches, progress=False)
    where = dict(judged)
    assert where[("body.0.mix.a", "body.0.mix.b", "body.0.mix.c")] == "body.0.mix"
    assert where[("body.1.ff.p", "body.1.ff.q")] == "body.1.ff"
    assert where[("body.1.mix.out",)] is None and where[("body.0.ff.r",)] is None
    assert where[("inp",)] is None and where[("head",)] is None  # outside the stages: layer output
    assert [s.runs for s in a.lowbit_calibration.stages if s.name.startswith("body")] == [3, 2]
    b = lowbit.quantize(model, _awq("module"), calibration=batches, progress=False)
    layer = lowbit.quantize(model, _awq("layer"), calibration=batches, progress=False)
    sa, sb, sl = _state(a), _state(b), _state(layer)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sl[k]) for k in sa)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"search": "block"}, "unknown awq search 'block'"),
        ({"search_batches": 0}, "search_batches must be >= 1"),
        ({"duo_scaling": 1}, "recipe.awq.duo_scaling: expected true or false"),
    ],
)
def test_bad_awq_options_are_refused(options, message) -> None:
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict({"awq": options})
    r = Recipe(awq=AWQOptions(search="parent", duo_scaling=True, search_batches=2))
    assert Recipe.from_yaml(r.to_yaml()) == r
