"""BatchNorm in QAT on a ResNet-style model written here (not the zoo's): every BatchNorm folded
wherever it sits, the artifact loads into the unfolded class, 8-bit QAT in the documented loop
keeps the PTQ model's fidelity, frozen / training BatchNorms and their re-estimation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lowbit
from lowbit import qat

pytestmark = pytest.mark.usefixtures("one_thread", "reference_kernels")


_BN = nn.modules.batchnorm._BatchNorm


class Block(nn.Module):
    """A basic residual block: BatchNorm after every conv, a 1x1 downsample branch when the
    shape changes (in an ``nn.Sequential``, as torchvision's ResNet has it)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNetish(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(Block(width, width), Block(width, width))
        self.layer2 = nn.Sequential(Block(width, 2 * width, 2), Block(2 * width, 2 * width))
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


class PostNorm(nn.Module):
    """A BatchNorm after a residual add: no conv feeds it alone, so it cannot fold."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.norm(self.conv(x) + x)).mean((2, 3)))


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from lowbit.zoo.digits import load_split

    x_train, y_train, x_test, _ = load_split()
    return x_train, y_train, x_test


def _trained(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 2) -> nn.Module:
    """A short float training run, so the BatchNorm statistics are real ones."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(epochs):
        for i in range(0, len(y), 64):
            loss = F.cross_entropy(model(x[i : i + 64]), y[i : i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def resnet(digits) -> ResNetish:  # noqa: ANN001
    torch.manual_seed(0)
    return _trained(ResNetish(), digits[0], digits[1])


def _cosine(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.cosine_similarity(model.eval()(x).flatten(), reference(x).flatten(), dim=0))


def test_every_batchnorm_folds_and_the_artifact_loads_into_the_unfolded_class(
    resnet: ResNetish, digits, tmp_path, capsys
) -> None:  # noqa: ANN001
    x_train, _, x_test = digits
    norms = {name for name, m in resnet.named_modules() if isinstance(m, _BN)}
    q = qat.prepare(resnet, qat.recipe(8))
    assert "10 folded" in capsys.readouterr().err  # the choice is printed
    assert (
        set(q.lowbit_folded) == norms and q.lowbit_folded["layer2.0.downsample.1"] == "layer2.0.downsample.0"
    )
    assert not any(isinstance(m, _BN) for m in q.modules())
    assert all(isinstance(m, _BN) for n, m in resnet.named_modules() if n in norms)  # original untouched
    qat.calibrate(q, [x_train[:64]])
    opt = torch.optim.Adam(q.parameters(), lr=1e-4)
    for i in range(3):
        loss = F.mse_loss(q.train()(x_train[i * 32 : i * 32 + 32]), resnet(x_train[i * 32 : i * 32 + 32]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    converted = qat.convert(q)
    assert converted.lowbit_folded == q.lowbit_folded
    lowbit.save(converted, tmp_path / "art")
    loaded = lowbit.load(tmp_path / "art", ResNetish(), kernels="reference")
    assert loaded.lowbit_folded == q.lowbit_folded
    with torch.no_grad():
        torch.testing.assert_close(loaded(x_test), q.eval()(x_test))


def test_a_folded_layer_left_float_loads_with_its_new_bias(resnet: ResNetish, digits, tmp_path) -> None:  # noqa: ANN001
    x_train, _, x_test = digits
    keep_stem = dataclasses.replace(qat.recipe(8), exclude=("conv1",))
    q = qat.prepare(resnet, keep_stem, progress=False)
    assert type(q.conv1) is nn.Conv2d and q.lowbit_folded["bn1"] == "conv1"
    qat.calibrate(q, [x_train[:64]])
    lowbit.save(qat.convert(q), tmp_path / "art")
    loaded = lowbit.load(tmp_path / "art", ResNetish(), kernels="reference")  # conv1 has no bias
    with torch.no_grad():
        torch.testing.assert_close(loaded(x_test), q.eval()(x_test))


def test_8bit_qat_in_the_documented_loop_keeps_the_ptq_fidelity(resnet: ResNetish, digits) -> None:  # noqa: ANN001
    x_train, _, x_test = digits
    calibration = [x_train[i : i + 32] for i in range(0, 256, 32)]
    torch.manual_seed(0)
    model = qat.prepare(resnet, qat.recipe(8), lsq=True, progress=False)  # as docs/qat-pruning.md
    qat.calibrate(model, calibration)
    ptq_cosine = _cosine(model, resnet, x_test)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    for x in calibration * 3:
        loss = F.mse_loss(model.train()(x), resnet(x).detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Unfolded (batchnorm="train") the same loop fell to ~0.97 here: batch statistics of 32 inputs.
    assert _cosine(model, resnet, x_test) >= ptq_cosine - 1e-3
    assert _cosine(qat.convert(model), resnet, x_test) >= ptq_cosine - 2e-3


def test_unfoldable_batchnorm_is_frozen_and_comes_back_plain(digits, tmp_path) -> None:  # noqa: ANN001
    x_train, y_train, x_test = digits
    torch.manual_seed(0)
    model = _trained(PostNorm(), x_train, y_train, epochs=1)
    q = qat.prepare(model, qat.recipe(8), progress=False)
    assert not hasattr(q, "lowbit_folded") and isinstance(q.norm, qat.FrozenBatchNorm)
    stats = q.norm.running_mean.clone()
    opt = torch.optim.Adam(q.parameters(), lr=1e-3)
    loss = F.cross_entropy(q.train()(x_train[:64]), y_train[:64])
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.equal(q.norm.running_mean, stats)  # train mode, statistics unchanged
    assert not torch.equal(q.norm.weight, model.norm.weight)  # the affine part trains
    converted = qat.convert(q)
    assert type(converted.norm) is nn.BatchNorm2d
    lowbit.save(converted, tmp_path / "art")
    loaded = lowbit.load(tmp_path / "art", PostNorm(), kernels="reference")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x_test), q.eval()(x_test))


def test_untrained_batchnorm_trains_and_is_reestimated(digits) -> None:  # noqa: ANN001
    x_train, _, _ = digits
    torch.manual_seed(0)
    q = qat.prepare(ResNetish(), qat.recipe(8), progress=False)  # from scratch: "auto" trains them
    qat.calibrate(q, [x_train[:64]])
    assert not hasattr(q, "lowbit_folded") and isinstance(q.bn1, nn.BatchNorm2d)
    converted = qat.convert(q)
    batches = [x_train[:128], x_train[128:256]]
    assert qat.reestimate_batchnorm(converted, batches) == 10
    assert not converted.training and converted.bn1.momentum == 0.1  # settings restored
    # The stem's BatchNorm sees the quantized stem conv's output: its mean, over both batches.
    with torch.no_grad():
        stem = torch.cat([converted.conv1(b) for b in batches])
    torch.testing.assert_close(converted.bn1.running_mean, stem.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="at least one input batch"):
        qat.reestimate_batchnorm(converted, [])


def test_batchnorm_choices_are_checked_and_forced(resnet: ResNetish) -> None:
    with pytest.raises(ValueError, match="batchnorm must be one of auto, fold, freeze, train"):
        qat.prepare(resnet, qat.recipe(8), batchnorm="folded")  # type: ignore[arg-type]
    frozen = qat.prepare(resnet, qat.recipe(8), batchnorm="freeze", progress=False)
    assert sum(isinstance(m, qat.FrozenBatchNorm) for m in frozen.modules()) == 10
    kept = qat.prepare(resnet, qat.recipe(8), batchnorm="train", progress=False)
    assert sum(type(m) is nn.BatchNorm2d for m in kept.modules()) == 10


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it; forward hooks on an example can."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm, self.fc = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.conv(x)) if float(x.sum()) > -1e9 else x
        return self.fc(y.mean((2, 3)))


def test_untraceable_models_fold_with_an_example(digits) -> None:  # noqa: ANN001
    x_train, y_train, _ = digits
    model = _trained(Untraceable(), x_train, y_train, epochs=1)
    assert isinstance(qat.prepare(model, qat.recipe(8), progress=False).norm, qat.FrozenBatchNorm)
    q = qat.prepare(model, qat.recipe(8), example=x_train[:8], progress=False)
    assert q.lowbit_folded == {"norm": "conv"}
