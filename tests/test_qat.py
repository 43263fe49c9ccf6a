"""Quantization-aware training: gradients, conversion exactness, artifact round trip, BN folding,
and accuracy retention on digits with a short fine-tune."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit import qat
from lowbit.eval.metrics import accuracy
from lowbit.nn import QuantizedConv, QuantizedLinear, QuantizedRNN
from lowbit.recipes import ActivationSpec, Recipe, WeightSpec

# The digits models are tiny: one thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TinyLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def _train_steps(model: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(x).logsumexp(dim=1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_ste_gradient_reaches_weights_and_inputs(gen: torch.Generator) -> None:
    model = qat.prepare(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2)), qat.recipe(4))
    x = torch.randn(32, 16, generator=gen, requires_grad=True)
    model.train()(x).sum().backward()
    layer = model[0]
    assert layer.weight.grad is not None and float(layer.weight.grad.abs().sum()) > 0
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_grid_formats_pass_gradients_straight_through(gen: torch.Generator) -> None:
    spec = WeightSpec(format="ternary")
    w = torch.randn(8, 16, generator=gen, requires_grad=True)
    fq = qat.WeightFakeQuant(spec, w.detach())
    out = fq(w)
    assert len(torch.unique(out.detach().abs().flatten(), sorted=True)) <= 1 + 8  # 0 and one scale per row
    out.sum().backward()
    torch.testing.assert_close(w.grad, torch.ones_like(w), rtol=0, atol=0)


def test_lsq_scales_receive_gradients(gen: torch.Generator) -> None:
    model = qat.prepare(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2)), qat.recipe(3), lsq=True)
    x = torch.rand(32, 16, generator=gen)
    model.train()(x)  # the first batch initialises the activation scales
    model(x).pow(2).sum().backward()
    for layer in (model[0], model[2]):
        assert layer.weight_quant.scale.shape == (layer.out_features, 1)  # learned per output channel
        assert float(layer.weight_quant.scale.grad.abs().sum()) > 0
        assert float(layer.input_quant.scale.grad.abs()) > 0


def test_lsq_scale_moves_during_training(gen: torch.Generator) -> None:
    model = qat.prepare(nn.Sequential(nn.Linear(16, 8)), qat.recipe(2), lsq=True)
    before = model[0].weight_quant.scale.detach().clone()
    _train_steps(model, torch.randn(32, 16, generator=gen), steps=5)
    assert not torch.equal(model[0].weight_quant.scale.detach(), before)


@pytest.mark.parametrize("lsq", [False, True])
@pytest.mark.parametrize("bits", [4, 2, "ternary"])
def test_convert_matches_fake_quant_forward_exactly(gen: torch.Generator, lsq: bool, bits: int | str) -> None:
    x = torch.rand(16, 1, 6, 6, generator=gen)
    # Every layer at ``bits``: int8 edges (the low-bit default) would run integer kernels, equal
    # to the reference within an ulp only.
    model = qat.prepare(TinyCNN(), qat.recipe(bits), lsq=lsq, keep_edges=False)
    _train_steps(model, x)
    q = qat.convert(model)
    assert isinstance(q.features[0], QuantizedConv) and isinstance(q.head[1], QuantizedLinear)
    assert q.features[0].input_quant.state == "frozen"
    x_new = torch.rand(8, 1, 6, 6, generator=gen)
    torch.testing.assert_close(q(x_new), model.eval()(x_new), rtol=0, atol=0)


@pytest.mark.parametrize("lsq", [False, True])
def test_convert_lstm_matches_fake_quant_forward(gen: torch.Generator, lsq: bool) -> None:
    x = torch.rand(16, 5, 6, generator=gen)
    model = qat.prepare(TinyLSTM(), qat.recipe(4), lsq=lsq)
    _train_steps(model, x)
    q = qat.convert(model)
    assert isinstance(q.lstm, QuantizedRNN)
    torch.testing.assert_close(q(x), model.eval()(x), rtol=0, atol=0)


def test_qat_save_load_round_trip_is_bit_identical(tmp_path, gen: torch.Generator) -> None:
    x = torch.rand(16, 1, 6, 6, generator=gen)
    model = qat.prepare(TinyCNN(), qat.recipe(3), lsq=True)
    _train_steps(model, x)
    q = qat.convert(model)
    lowbit.save(q, tmp_path / "art")
    loaded = lowbit.load(tmp_path / "art", model=TinyCNN())
    for key, value in q.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    torch.testing.assert_close(loaded(x), q(x), rtol=0, atol=0)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


def test_convert_before_any_data_names_the_layer() -> None:
    model = qat.prepare(nn.Sequential(nn.Linear(4, 4)), qat.recipe(4))
    with pytest.raises(ValueError, match="layer 0: its activation range was never observed"):
        qat.convert(model)


@pytest.mark.parametrize("lsq", [False, True])
@pytest.mark.parametrize("bits", [4, 2])
def test_calibrated_qat_model_starts_as_the_same_recipe_ptq_model(
    gen: torch.Generator, lsq: bool, bits: int
) -> None:
    # calibrate uses the recipe's PTQ observer over all batches, so QAT starts from the PTQ solution.
    torch.manual_seed(0)
    for model, shape in ((TinyCNN(), (16, 1, 6, 6)), (TinyLSTM(), (16, 5, 6))):
        calibration = [torch.rand(48, *shape[1:], generator=gen) for _ in range(3)]  # >= 128 examples
        q = qat.prepare(model, qat.recipe(bits), lsq=lsq, progress=False)
        # The recipe QAT runs (at 2 bits it keeps the first and last layers at int8).
        ptq = lowbit.quantize(model, q.lowbit_recipe, calibration=calibration, progress=False)
        qat.calibrate(q, calibration)
        assert not any(m.observer for m in q.modules() if isinstance(m, qat.ActFakeQuant))
        x = torch.rand(*shape, generator=gen)
        # Same codes and ranges; the fake-quant forward sums in another order than the dequantized
        # one, so outputs may differ by an ulp (3e-8 seen): float tolerance, not bit equality.
        torch.testing.assert_close(q.eval()(x), ptq(x))
        torch.testing.assert_close(qat.convert(q)(x), ptq(x))


def test_calibrate_initialises_ranges_without_touching_batchnorm(gen: torch.Generator) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    q = qat.prepare(model, qat.recipe(8), progress=False)  # never-trained statistics: kept training
    assert type(q[1]) is nn.BatchNorm1d
    running = q[1].running_mean.clone()
    qat.calibrate(q, [torch.randn(8, 4, generator=gen)])
    assert torch.equal(q[1].running_mean, running)
    assert type(qat.convert(q)[2]).__name__ == "QuantizedLinear"


def test_post_training_algorithms_are_rejected_with_the_layer_name() -> None:
    r = Recipe(weight=WeightSpec(format="int4", algorithm="gptq"), activation=ActivationSpec())
    with pytest.raises(ValueError, match="layer 0: weight algorithm 'gptq' is post-training only"):
        qat.prepare(nn.Sequential(nn.Linear(4, 4)), r)


def test_fold_batchnorm_preserves_eval_output(gen: torch.Generator) -> None:
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16, 3, bias=False),
        nn.BatchNorm1d(3),
    )
    model.train()
    for _ in range(3):
        model(torch.randn(16, 2, 4, 4, generator=gen))
    x = torch.randn(5, 2, 4, 4, generator=gen)
    reference = model.eval()(x)
    folded = qat.fold_batchnorm(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert folded.lowbit_folded == {"1": "0", "5": "4"}  # the Linear -> BatchNorm1d pair too
    torch.testing.assert_close(folded(x), reference, rtol=1e-5, atol=1e-5)
    assert isinstance(model[1], nn.BatchNorm2d)  # the original is untouched


@pytest.fixture(scope="module")
def digits_cnn():  # noqa: ANN201
    return lowbit.zoo.get("digits-cnn")


def test_qat_2bit_digits_lstm_recovers_what_ptq_loses() -> None:
    from lowbit.qat.demo import qat_model

    zm = lowbit.zoo.get("digits-lstm")
    float_acc = accuracy(zm.model, zm.eval_data)
    ptq = lowbit.quantize(zm.model, qat.recipe(2), calibration=zm.calibration, progress=False)
    ptq_acc = accuracy(ptq, zm.eval_data)
    qmodel, seconds = qat_model(zm, 2, epochs=5)
    qat_acc = accuracy(qmodel, zm.eval_data)
    assert seconds > 0
    assert qat_acc >= float_acc - 0.03, (qat_acc, float_acc)
    assert qat_acc >= ptq_acc + 0.02, (qat_acc, ptq_acc)


def test_qat_4bit_digits_cnn_stays_within_a_point() -> None:
    from lowbit.qat.demo import qat_model

    # 360 held-out images: one image is 0.28 points. A zoo model trained from scratch on a fresh
    # machine loses 0.56-0.83 points at 4 bits over seeds 0-3 (an older cached one lost 0.28), so the
    # bound is one point; issue 20 tracks stronger low-bit QAT.
    zm = lowbit.zoo.get("digits-cnn")
    float_acc = accuracy(zm.model, zm.eval_data)
    qmodel, _ = qat_model(zm, 4, epochs=3)
    assert accuracy(qmodel, zm.eval_data) >= float_acc - 0.01


def test_recipe_and_demo_rows_reject_bad_requests() -> None:
    from lowbit.qat.demo import demo_rows
    from lowbit.zoo import ZooModel

    with pytest.raises(ValueError, match="2..8 bits"):
        qat.recipe(1)
    assert qat.recipe(4, activation_bits=None).activation.mode == "none"
    with pytest.raises(ValueError, match="unknown demo row 'qat5'"):
        demo_rows(lowbit.zoo.get("digits-cnn"), keys=("qat5",))
    with pytest.raises(ValueError, match="only the digits models have it"):
        demo_rows(ZooModel(name="mine", model=nn.Linear(2, 2)), keys=("qat4",))


def test_qat_int8_round_trips_through_onnx_runtime(tmp_path, gen: torch.Generator) -> None:  # noqa: ANN001
    ort = pytest.importorskip("onnxruntime")
    from lowbit.export.onnx import export_onnx

    x = torch.rand(16, 1, 6, 6, generator=gen)
    model = qat.prepare(TinyCNN(), qat.recipe(8), lsq=True)
    _train_steps(model, x)
    lowbit.save(qat.convert(model), tmp_path / "art")
    loaded = lowbit.load(tmp_path / "art", model=TinyCNN())
    report = export_onnx(loaded, str(tmp_path / "m.onnx"), (x,))
    assert {layer.kernel for layer in report.layers} != {"float"}  # real integer / QDQ kernels
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    reference = loaded(x)
    # ONNX Runtime rounds requantized int8 intermediates its own way: allow one step or so.
    assert float((got - reference).abs().max()) <= 0.02 * float(reference.abs().max()) + 1e-6
