"""Binary / ternary / int4 QAT in a plain user loop on a CNN written here (BatchNorm, residual adds,
depthwise convs; not the zoo's) on digits: the low-bit defaults (first / last layers at 8 bits,
BatchNorms trained then re-estimated, latent-weight clipping), each printed and switchable."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lowbit
from lowbit import qat

pytestmark = pytest.mark.usefixtures("one_thread", "reference_kernels")


class DWBlock(nn.Module):
    """Depthwise 3x3 -> BN -> ReLU -> pointwise 1x1 -> BN, plus a residual (1x1 conv + BN when
    the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = None
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.pw(F.relu(self.bn1(self.dw(x)))))
        return F.relu(y + (x if self.skip is None else self.skip(x)))


class DWNet(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.b1 = DWBlock(width, width)
        self.b2 = DWBlock(width, 2 * width, 2)
        self.b3 = DWBlock(2 * width, 2 * width)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b3(self.b2(self.b1(F.relu(self.bn(self.stem(x))))))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, ...]:
    from lowbit.zoo.digits import load_split

    return load_split()


def _fit(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int = 1
) -> nn.Module:
    """The user's loop: Adam, cosine decay, batches of 64."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            batch = order[i : i + 64]
            loss = F.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        schedule.step()
    return model.eval()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


@pytest.fixture(scope="module")
def float_model(digits) -> DWNet:  # noqa: ANN001
    torch.manual_seed(0)
    return _fit(DWNet(), digits[0], digits[1], epochs=10, lr=1e-2, seed=0)


def _qat(float_model: DWNet, digits, recipe, epochs: int, lr: float, **options):  # noqa: ANN001, ANN202
    x_train, y_train = digits[0], digits[1]
    calibration = [x_train[i : i + 64] for i in range(0, 512, 64)]
    model = qat.prepare(float_model, recipe, **options)
    qat.calibrate(model, calibration)
    _fit(model, x_train, y_train, epochs, lr)
    return model, qat.convert(model, reestimate=calibration, progress=False)


@pytest.mark.parametrize(("fmt", "target"), [("binary", 0.90), ("ternary", 0.93)])
def test_binary_and_ternary_weights_reach_the_targets(
    float_model, digits, fmt: str, target: float, capsys
) -> None:  # noqa: ANN001
    _, _, x_test, y_test = digits
    model, q = _qat(float_model, digits, qat.recipe(fmt), epochs=8, lr=3e-3)
    printed = capsys.readouterr().err
    assert "stem, fc keep int8 weights" in printed and "left training (low-bit weights" in printed
    assert "latent weights clipped" in printed
    formats = {name: m.qweight.fmt.name for name, m in q.named_modules() if hasattr(m, "qweight")}
    assert formats["stem"] == formats["fc"] == "int8" and formats["b2.pw"] == fmt
    assert _accuracy(float_model, x_test, y_test) >= 0.95
    assert _accuracy(q, x_test, y_test) >= target


def test_int4_weights_stay_within_half_a_point_of_float(float_model, digits) -> None:  # noqa: ANN001
    _, _, x_test, y_test = digits
    float_acc = _accuracy(float_model, x_test, y_test)
    recipe = qat.recipe(4, activation_bits=8)
    # LSQ: STE's per-step MSE clip search would take ~40 s here. 8 epochs at 1e-3 measured -0.0 /
    # -0.0 / +0.8 points over three seeds (4 epochs: -0.0 / -0.8 / -0.6; 3e-3 diverged).
    _, q = _qat(float_model, digits, recipe, epochs=8, lr=1e-3, lsq=True, progress=False)
    assert _accuracy(q, x_test, y_test) >= float_acc - 0.005


def test_the_low_bit_choices_switch_off_and_the_artifact_loads(float_model, digits, tmp_path) -> None:  # noqa: ANN001
    x_train, _, x_test, _ = digits
    plain = qat.prepare(
        float_model, qat.recipe("binary"), keep_edges=False, clip_latent=False, progress=False
    )
    assert not plain.lowbit_recipe.overrides and not plain.stem.weight_quant.clip_latent
    model = qat.prepare(float_model, qat.recipe("binary"), progress=False)
    assert model.stem.weight_quant.fmt.name == "int8" and model.b1.dw.weight_quant.clip_latent
    qat.calibrate(model, [x_train[:64]])
    # Clipping happens in training mode only, in place, before the weight is used.
    weight = model.b1.dw.conv.weight
    with torch.no_grad():
        weight[0, 0, 0, 0] = 10.0
    bound = 3 * float(weight[0].detach().abs().mean())
    model.eval()(x_train[:4])
    assert float(weight[0, 0, 0, 0].detach()) == 10.0
    model.train()(x_train[:4])
    assert float(weight[0, 0, 0, 0].detach()) == pytest.approx(bound)
    q = qat.convert(model, progress=False)
    lowbit.save(q, tmp_path / "art")
    loaded = lowbit.load(tmp_path / "art", DWNet())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x_test), q(x_test))
