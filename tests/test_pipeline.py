"""The sequential calibration pipeline: stages, grouping by tensor identity, data flow, memory."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.ptq.pipeline import calibrate_weights
from lowbit.recipes import Recipe, WeightSpec

GPTQ = Recipe(weight=WeightSpec(format="int4", granularity="group:16", algorithm="gptq"))
RTN = Recipe(weight=WeightSpec(format="int4", granularity="group:16"))


class ReuseBlock(nn.Module):
    """``a`` and ``b`` read two different tensors that live at one address: the first is dropped
    and its memory handed to the second, exactly what the allocator does with a freed block of
    the same size (here forced, so it happens on every platform and every call); ``q`` and ``k``
    read one tensor. ``keep=True`` allocates the second tensor afresh: same data flow, no reuse."""

    def __init__(self, width: int = 32, keep: bool = False) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(width, width), nn.Linear(width, width)
        self.q, self.k = nn.Linear(width, width // 2), nn.Linear(width, width // 2)
        self.keep = keep
        self.addresses: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * 2.0
        ya = self.a(h)
        block = h.view(h.shape)  # the freed memory, as a new tensor object
        first = h.data_ptr()
        del h
        h = x * 3.0 if self.keep else torch.mul(x, 3.0, out=block)
        self.addresses.append((first, h.data_ptr()))
        yb = self.b(h)
        z = torch.tanh(ya + yb)
        return x + torch.cat([self.q(z), self.k(z)], dim=-1)


class Stack(nn.Module):
    def __init__(self, n: int = 3, width: int = 32, keep: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ReuseBlock(width, keep) for _ in range(n))
        self.head = nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def batches(n: int = 3, rows: int = 64, width: int = 32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g) / 4 + torch.eye(width)
    return [torch.randn(rows, width, generator=g) @ mix for _ in range(n)]


def output_error(model: nn.Module, q: nn.Module, data: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return sum(float(((model(x) - q(x)) ** 2).mean()) for x in data)


def test_grouping_follows_tensor_identity_even_when_the_allocator_reuses_memory():
    torch.manual_seed(0)
    model, data = Stack().eval(), batches()
    result = calibrate_weights(model, GPTQ, data, progress=False)
    # a's and b's inputs shared one address in every call: grouping by data_ptr() merges them.
    assert model.blocks[0].addresses and all(f == s for blk in model.blocks for f, s in blk.addresses)
    assert result.layout == "blocks"
    for i, stage in enumerate(result.stages[:3]):
        p = f"blocks.{i}"
        assert stage.groups == [[f"{p}.a"], [f"{p}.b"], [f"{p}.q", f"{p}.k"]]
    torch.manual_seed(0)
    kept = Stack(keep=True).eval()  # the same weights and data flow, without any reuse
    assert [s.groups for s in calibrate_weights(kept, GPTQ, data, progress=False).stages] == [
        s.groups for s in result.stages
    ]


def test_each_stage_runs_on_cached_inputs_never_the_model_from_its_start():
    torch.manual_seed(0)
    model, data = Stack(n=4), batches(n=3)
    calls = {"model": 0, **{f"blocks.{i}": 0 for i in range(4)}}
    model.register_forward_pre_hook(lambda *_: calls.__setitem__("model", calls["model"] + 1))
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda *_, n=f"blocks.{i}": calls.__setitem__(n, calls[n] + 1))
    result = calibrate_weights(model, GPTQ, data, progress=False)
    # One probe pass on the first batch, then one capture pass that stops at the first block,
    # then one pass over the head's inputs: the model's own forward never runs per layer.
    assert calls["model"] == 1 + len(data) + len(data)
    names = [s.name for s in result.stages]
    assert names == ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "(after the last stage)"]
    statistics_passes = sum(1 for s in result.stages if s.layers)
    assert statistics_passes == len(result.stages)  # one statistics pass per stage
    # Each block: its statistics pass and the pass computing its quantized outputs (the last
    # one needs no outputs: the head is calibrated from a pass of the whole model).
    assert [s.runs for s in result.stages] == [2, 2, 2, 1, 1]
    b = len(data)
    probe, capture, tail = 1, b, b  # the capture pass stops inside blocks.0's call
    expected = [probe + capture + 2 * b + tail] + [probe + 2 * b + tail] * 2 + [probe + b + tail]
    assert [calls[f"blocks.{i}"] for i in range(4)] == expected
    assert result.model_passes == 2


def test_later_stages_see_the_quantized_outputs_of_earlier_ones():
    """Stage 2's statistics come from stage 1's quantized outputs: quantizing stage 1 differently
    changes stage 2's GPTQ result (it would not if every stage saw float inputs)."""
    torch.manual_seed(0)
    model, data = Stack(n=2), batches()
    coarse = Recipe(
        weight=WeightSpec(format="int4", granularity="group:16", algorithm="gptq"),
        overrides=(lowbit.recipes.LayerRule("blocks.0.*", weight=WeightSpec(format="int2")),),
    )
    a = lowbit.quantize(model, GPTQ, calibration=data, progress=False)
    b = lowbit.quantize(model, coarse, calibration=data, progress=False)
    assert not torch.equal(a.blocks[1].a.qweight.packed, b.blocks[1].a.qweight.packed)


@pytest.mark.parametrize("kind", ["sequential", "module"])
def test_a_model_without_repeated_blocks_gets_one_stage_per_child(kind):
    torch.manual_seed(0)
    if kind == "sequential":
        model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))
        expected = ["0", "1", "2", "3", "4"]
    else:

        class MLP(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.fc1, self.act, self.fc2 = nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.fc2(self.act(self.fc1(x)))

        model = MLP()
        expected = ["fc1", "act", "fc2"]
    data = batches()
    q_gptq = lowbit.quantize(model, GPTQ, calibration=data, progress=False)
    result = q_gptq.lowbit_calibration
    assert result.layout == "children"
    assert [s.name for s in result.stages] == expected
    assert output_error(model, q_gptq, data) < output_error(model, lowbit.quantize(model, RTN), data)


def test_a_model_that_is_no_chain_is_calibrated_in_one_pass():
    class Skip(nn.Module):  # the head reads fc1's output too: children are not a chain
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.head = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc1(x)
            return self.head(h + self.fc2(h))

    torch.manual_seed(0)
    model, data = Skip(), batches()
    q = lowbit.quantize(model, GPTQ, calibration=data, progress=False)
    result = q.lowbit_calibration
    assert result.layout == "model" and [s.name for s in result.stages] == ["(whole model)"]
    assert any("one pass" in note for note in result.notes)
    assert output_error(model, q, data) < output_error(model, lowbit.quantize(model, RTN), data)


def test_sequential_targets_choose_the_stages():
    torch.manual_seed(0)
    model, data = Stack(n=2), batches()
    recipe = Recipe(weight=GPTQ.weight, sequential_targets=("ReuseBlock",))
    result = calibrate_weights(model, recipe, data, progress=False)
    assert result.layout == "targets" and result.stages[0].name == "blocks.0"
    bad = Recipe(weight=GPTQ.weight, sequential_targets=("blocks.*.a", "blocks.*.q"))
    with pytest.raises(ValueError, match="sequential_targets cannot be calibrated one after another"):
        calibrate_weights(Stack(n=2), bad, data, progress=False)
    with pytest.raises(ValueError, match="match no module"):
        calibrate_weights(Stack(n=2), Recipe(weight=GPTQ.weight, sequential_targets=("nope",)), data)


def test_activations_spill_to_disk_past_the_budget_with_the_same_result():
    torch.manual_seed(0)
    model, data = Stack(n=3), batches()
    in_memory = lowbit.quantize(model, GPTQ, calibration=data, progress=False)
    spilled = lowbit.quantize(model, GPTQ, calibration=data, progress=False, cache_bytes=0)
    assert sum(s.spilled_bytes for s in spilled.lowbit_calibration.stages) > 0
    assert sum(s.spilled_bytes for s in in_memory.lowbit_calibration.stages) == 0
    for key, value in in_memory.state_dict().items():
        assert torch.equal(value, spilled.state_dict()[key]), key


def test_each_stage_reports_time_and_peak_memory():
    torch.manual_seed(0)
    result = calibrate_weights(Stack(n=2), GPTQ, batches(), progress=False)
    for stage in result.stages:
        assert stage.seconds > 0 and stage.peak_memory_bytes > 0
    assert result.stages[0].stats_bytes > 0
    assert "blocks.0" in result.summary()


def test_default_budget_is_sized_from_the_model_and_spills_with_the_same_result(monkeypatch):
    from lowbit.ptq import pipeline

    torch.manual_seed(0)
    model, data = Stack(n=3), batches()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    monkeypatch.setattr(pipeline, "MIN_CACHE_BYTES", 0)
    assert pipeline.default_cache_bytes(model) == int(pipeline.CACHE_MODEL_SHARE * model_bytes)
    # An eighth of this model (5 KiB) holds fewer activations than one stage (3 x 64 x 32 floats).
    sized = lowbit.quantize(model, GPTQ, calibration=data, progress=False)
    roomy = lowbit.quantize(model, GPTQ, calibration=data, progress=False, cache_bytes=1 << 30)
    assert sum(s.spilled_bytes for s in sized.lowbit_calibration.stages) > 0
    assert sum(s.spilled_bytes for s in roomy.lowbit_calibration.stages) == 0
    for key, value in roomy.state_dict().items():
        assert torch.equal(value, sized.state_dict()[key]), key


HEAD_INT8 = Recipe(weight=GPTQ.weight, embeddings_and_head="int8")


def test_release_weights_frees_each_stage_after_its_last_run():
    torch.manual_seed(0)
    model, data = Stack(n=3), batches()
    kept = calibrate_weights(copy.deepcopy(model), HEAD_INT8, data, progress=False)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert kept.stages and all(m.weight.stride() != (0, 0) for m in linears)
    seen: list[list[int]] = []  # per stage: how many block weights were still float when it started

    def count(_m, _a):
        seen.append([int(b.a.weight.stride() != (0, 0)) for b in model.blocks])

    for block in model.blocks:
        block.register_forward_pre_hook(count)
    result = calibrate_weights(model, HEAD_INT8, data, progress=False, release_weights=True)
    assert all(m.weight.stride() == (0, 0) for m in linears)  # the head (int8) too: nothing runs it
    assert all(m.weight.shape == (m.out_features, m.in_features) for m in linears)
    # Block 0 is still float on its own runs, gone by the time block 1 runs, and so on.
    firsts = [s for s in seen if s[0] == 0]
    assert seen[0] == [1, 1, 1] and firsts and firsts[0][1] == 1
    assert sorted(result.weights) == sorted(kept.weights)
    for name, qw in kept.weights.items():
        assert torch.equal(qw.dequantize(), result.weights[name].dequantize()), name


def test_quantize_inplace_releases_and_matches_the_copy():
    torch.manual_seed(0)
    model, data = Stack(n=3), batches()
    copied = lowbit.quantize(model, HEAD_INT8, calibration=data, progress=False)
    assert all(m.weight.stride() != (0, 0) for m in model.modules() if isinstance(m, nn.Linear))
    inplace = lowbit.quantize(model, HEAD_INT8, calibration=data, progress=False, inplace=True)
    assert inplace is model
    for key, value in copied.state_dict().items():
        assert torch.equal(value, inplace.state_dict()[key]), key
    x = batches(1, seed=1)[0]
    assert torch.equal(copied(x), inplace(x))


def test_a_calibrated_head_keeps_the_float_weights_for_its_pass():
    torch.manual_seed(0)
    model, data = Stack(n=2), batches()
    result = calibrate_weights(model, GPTQ, data, progress=False, release_weights=True)
    assert result.stages[-1].name == "(after the last stage)"
    assert all(m.weight.stride() != (0, 0) for m in model.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize(
    "spec",
    [
        WeightSpec(format="int8", granularity="channel", algorithm="rtn"),
        WeightSpec(format="uint4", granularity="group:8", symmetric=False, algorithm="mse"),
        WeightSpec(format="nf4", granularity="group:16", algorithm="rtn"),
    ],
)
def test_large_data_free_weights_quantize_in_row_chunks_with_the_same_bytes(monkeypatch, spec):
    from lowbit.ptq import modifiers
    from lowbit.ptq.plan import plan_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 32), nn.Linear(32, 48))
    recipe = Recipe(weight=spec, modules=("linear", "embedding"))
    whole = copy.deepcopy(model)
    layers = plan_model(whole, recipe).layers
    plain = {layer.name: modifiers.quantize_rtn(layer, spec.steps) for layer in layers}
    monkeypatch.setattr(modifiers, "RTN_CHUNK_ELEMENTS", 7 * 32)  # 7 rows at a time: a ragged last chunk
    for layer in plan_model(model, recipe).layers:
        result = modifiers.quantize_rtn(layer, spec.steps, apply=True)
        expected = plain[layer.name]
        assert not result.effective
        a, b = result.weights["weight"], expected.weights["weight"]
        assert a.state_dict().keys() == b.state_dict().keys()
        for key, value in b.state_dict().items():
            assert torch.equal(a.state_dict()[key], value), (layer.name, key)
        (m, value), = expected.effective
        assert torch.equal(layer.module.weight.detach().reshape(value.shape), value), layer.name


@pytest.mark.parametrize("hessian, moments", [(True, False), (False, True), (True, True)])
def test_input_stats_find_nan_inf_from_column_sums(hessian, moments):
    from lowbit.ptq.stats import InputStats

    good = torch.randn(16, 4)
    st = InputStats(4, hessian, "layer demo", moments=moments)
    st.update(good)
    assert (st.xtx is not None) == hessian and (st.abs_sum is not None) == moments
    for bad_value in (float("nan"), float("inf"), -float("inf")):
        bad = good.clone()
        bad[3, 2] = bad_value
        with pytest.raises(ValueError, match="layer demo received NaN or Inf"):
            st.update(bad)
    assert st.count == 16  # nothing of a refused batch was added
    huge = good.clone()
    huge[0, 0] = 1e30  # finite, but its square is not
    if hessian:
        with pytest.raises(ValueError, match="squares overflow"):
            st.update(huge)
    if not moments:
        with pytest.raises(RuntimeError, match="moments were not collected"):
            st.mean()


def test_gptq_alone_collects_no_moments_bias_correction_does():
    from lowbit.ptq.stats import InputStats

    torch.manual_seed(0)
    model, data = Stack(n=2), batches()
    observed: list[InputStats] = []
    original = InputStats.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        observed.append(self)

    InputStats.__init__ = spy
    try:
        calibrate_weights(copy.deepcopy(model), GPTQ, data, progress=False)
        alone, observed[:] = list(observed), []
        corrected = Recipe(weight=GPTQ.weight, bias_correction=True)
        calibrate_weights(copy.deepcopy(model), corrected, data, progress=False)
    finally:
        InputStats.__init__ = original
    assert alone and all(s.abs_sum is None and s.xtx is not None for s in alone)
    assert observed and all(s.abs_sum is not None and s.xtx is not None for s in observed)


def test_mlp_output_projections_are_found_from_structure_not_names():
    from lowbit.ptq.roles import mlp_output_projections

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.widen, self.squash = nn.Linear(8, 32), nn.Linear(32, 8)  # names say nothing
            self.fn, self.drop = nn.SiLU(), nn.Dropout(0.1)
            self.side = nn.Linear(8, 8)  # reads the block input, not the activation

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.squash(self.drop(self.fn(self.widen(x)))) + self.side(x)

    model = nn.Sequential(Block(), Block()).eval()
    assert mlp_output_projections(model, torch.randn(3, 8)) == ["0.squash", "1.squash"]
