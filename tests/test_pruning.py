"""Pruning: magnitude masks, 2:4, structured channel removal, iterative schedule, sparse storage."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit import pruning as P
from lowbit.eval.metrics import accuracy
from lowbit.pruning import sparse
from lowbit.train import batches, fit
from lowbit.zoo.digits import DigitsCNN

# The digits models are tiny: one thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(gen: torch.Generator) -> nn.Module:
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


def test_layer_magnitude_pruning_hits_the_amount_in_every_layer(gen: torch.Generator) -> None:
    model = _mlp(gen)
    originals = {n: p.detach().clone() for n, p in P.prunable_weights(model).items()}
    masks = P.prune(model, 0.6, scope="layer")
    for name, w in P.prunable_weights(model).items():
        assert int((w == 0).sum()) == round(0.6 * w.numel()), name
        kept, dropped = originals[name][masks.masks[name]], originals[name][~masks.masks[name]]
        assert float(kept.abs().min()) >= float(dropped.abs().max())  # the smallest ones went


def test_global_magnitude_pruning_uses_one_threshold(gen: torch.Generator) -> None:
    model = _mlp(gen)
    with torch.no_grad():
        model[4].weight.copy_(model[4].weight.sign() * 10 + model[4].weight)  # all large: all kept
    P.prune(model, 0.5, scope="global")
    assert P.sparsity(model) == pytest.approx(0.5, abs=1e-3)
    assert int((model[4].weight == 0).sum()) == 0
    assert float((model[0].weight == 0).float().mean()) > 0.5


def test_two_four_mask_keeps_exactly_two_of_every_four(gen: torch.Generator) -> None:
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8, 12))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    masks = P.prune(model, method="2:4")
    assert "0.weight" not in masks.masks  # 1 x 3 x 3 = 9 inputs: no 4-groups, left dense
    for name in ("1.weight", "3.weight"):
        w = dict(model.named_parameters())[name]
        groups = (w.reshape(w.shape[0], -1) != 0).reshape(w.shape[0], -1, 4).sum(dim=-1)
        assert torch.equal(groups, torch.full_like(groups, 2)), name
    with pytest.raises(ValueError, match="multiple of 4"):
        P.nm_mask(torch.randn(2, 6))


def test_masks_keep_weights_zero_during_fine_tuning(gen: torch.Generator) -> None:
    model = _mlp(gen)
    x, y = torch.randn(64, 32, generator=gen), torch.randint(0, 4, (64,), generator=gen)
    result = P.iterative_prune(model, 0.7, batches(x, y, 16), steps=2, epochs_per_step=1, progress=False)
    assert result.schedule[-1] == pytest.approx(0.7, abs=1e-3)
    assert result.schedule[0] < result.schedule[-1]
    assert P.sparsity(model) == pytest.approx(0.7, abs=1e-3)
    fit(model, batches(x, y, 16), epochs=1, after_step=lambda: result.masks.apply(model), progress=False)
    assert P.sparsity(model) == pytest.approx(0.7, abs=1e-3)


def test_masks_name_the_missing_parameter() -> None:
    masks = P.Masks({"fc.weight": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="'fc.weight' has no parameter"):
        masks.apply(nn.Sequential(nn.Linear(2, 2)))


@pytest.fixture(scope="module")
def digits_cnn():  # noqa: ANN201
    return lowbit.zoo.get("digits-cnn")


def test_structured_pruning_shrinks_the_digits_cnn(digits_cnn) -> None:  # noqa: ANN001
    model = digits_cnn.model
    small = P.prune_channels(model, 0.3, digits_cnn.calibration[0])
    convs = [m for m in small.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [11, 22, 45]
    assert [c.in_channels for c in convs] == [1, 11, 22]
    assert small.classifier[1].in_features == 45 * 4 and small.classifier[1].out_features == 45
    assert small.classifier[3].out_features == 10
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert params(small) < 0.6 * params(model)
    assert isinstance(model.features[0], nn.Conv2d) and model.features[0].out_channels == 16  # copy
    float_acc = accuracy(model, digits_cnn.eval_data)
    assert accuracy(small, digits_cnn.eval_data) > 0.5  # before fine-tuning: damaged, not destroyed
    from lowbit.qat.demo import training_data

    fit(small, training_data(digits_cnn), epochs=2, lr=1e-3, progress=False)
    assert accuracy(small, digits_cnn.eval_data) >= float_acc - 0.03


def test_structured_pruning_slices_batchnorm_and_rejects_non_chains(gen: torch.Generator) -> None:
    model = nn.Sequential(nn.Conv2d(2, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    small = P.prune_channels(model, 0.5, torch.randn(2, 2, 5, 5, generator=gen))
    assert small[1].num_features == 4 and small[1].running_mean.shape == (4,)

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return self.b(h) + h  # residual: removing channels of `a` breaks the sum

    with pytest.raises(ValueError, match="not a plain conv/linear chain"):
        P.prune_channels(Branchy(), 0.5, torch.randn(2, 4, generator=gen))


def test_structured_pruning_keeps_the_digits_cnn_function_at_zero_amount(gen: torch.Generator) -> None:
    model = DigitsCNN().eval()
    x = torch.rand(4, 1, 8, 8, generator=gen)
    torch.testing.assert_close(P.prune_channels(model, 0.0, x)(x), model(x), rtol=0, atol=0)


def test_sparse_encoding_round_trips_exactly(gen: torch.Generator) -> None:
    codes = torch.randint(-8, 8, (37, 13), generator=gen, dtype=torch.int8)
    codes[torch.rand(codes.shape, generator=gen) < 0.6] = 0
    mask, values = sparse.encode(codes)
    assert values.numel() == int((codes != 0).sum())
    assert torch.equal(sparse.decode(mask, values, codes.shape), codes)


def test_pruned_int8_weights_take_less_space(tmp_path) -> None:  # noqa: ANN001
    dense = nn.Sequential(nn.Linear(256, 256))
    sparse_model = nn.Sequential(nn.Linear(256, 256))
    sparse_model.load_state_dict(dense.state_dict())
    P.prune(sparse_model, 0.5)
    sizes = {}
    for name, model in (("dense", dense), ("sparse", sparse_model)):
        q = lowbit.quantize(model, "int8-weight-only", progress=False)
        sizes[name] = lowbit.save(q, tmp_path / name, compression="lzma")["file"]["bytes"]
        report = P.sparse_report(q)
        if name == "sparse":
            assert report.sparsity == pytest.approx(0.5, abs=0.01)
            assert report.ratio < 0.7  # 1 + 0.5 * 8 bits instead of 8
    assert sizes["sparse"] < 0.75 * sizes["dense"], sizes
