"""Distillation loss and the training loop: KL term, feature matching, seeding, early stopping."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lowbit.distill import DistillationLoss, distill, kd_loss
from lowbit.train import batches, fit

# The digits models are tiny: one thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))


def test_kd_loss_is_zero_for_identical_logits_and_positive_otherwise(gen: torch.Generator) -> None:
    z = torch.randn(16, 5, generator=gen)
    assert float(kd_loss(z, z, temperature=4.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_loss(z, z.flip(1), temperature=4.0)) > 0.01


def test_kd_loss_mixes_soft_and_task_terms(gen: torch.Generator) -> None:
    s, t = torch.randn(16, 5, generator=gen), torch.randn(16, 5, generator=gen)
    y = torch.randint(0, 5, (16,), generator=gen)
    torch.testing.assert_close(kd_loss(s, t, y, alpha=0.0), F.cross_entropy(s, y))
    soft = F.kl_div(F.log_softmax(s / 2, -1), F.softmax(t / 2, -1), reduction="batchmean") * 4
    torch.testing.assert_close(kd_loss(s, t, y, temperature=2.0, alpha=1.0), soft)


def test_kd_loss_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), temperature=0.0)
    with pytest.raises(ValueError, match="alpha"):
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), alpha=1.5)


def test_distillation_makes_the_student_agree_with_the_teacher(gen: torch.Generator) -> None:
    teacher, student = _mlp(0), _mlp(1)
    x = torch.randn(512, 8, generator=gen)
    y = teacher(x).argmax(dim=1).detach()
    before = float((student(x).argmax(1) == y).float().mean())
    distill(student, teacher, batches(x, y, 64), epochs=15, lr=1e-2, progress=False)
    after = float((student(x).argmax(1) == y).float().mean())
    assert after >= 0.9 and after > before + 0.3, (before, after)


def test_feature_matching_adds_a_term_and_checks_shapes(gen: torch.Generator) -> None:
    teacher, student = _mlp(0), _mlp(1)
    batch = (torch.randn(8, 8, generator=gen), torch.randint(0, 4, (8,), generator=gen))
    plain = DistillationLoss(teacher)(student, batch)
    with_features = DistillationLoss(teacher, features={"1": "1"}, feature_weight=1.0)
    assert float(with_features(student, batch).detach()) > float(plain.detach())
    with_features.close()
    wrong = DistillationLoss(teacher, features={"2": "1"})
    with pytest.raises(ValueError, match="'2' \\(student\\) is \\(8, 4\\) but '1' \\(teacher\\)"):
        wrong(student, batch)
    with pytest.raises(ValueError, match="feature layer 'nope' is not a submodule of the teacher"):
        DistillationLoss(teacher, features={"1": "nope"})


def test_fit_is_reproducible_with_a_seed(gen: torch.Generator) -> None:
    x, y = torch.randn(128, 8, generator=gen), torch.randint(0, 4, (128,), generator=gen)
    states = []
    for _ in range(2):
        model = _mlp(3)
        fit(model, batches(x, y, 32, seed=5), epochs=2, seed=7, progress=False)
        states.append(model.state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_fit_stops_early_and_restores_the_best_epoch(gen: torch.Generator) -> None:
    x, y = torch.randn(64, 8, generator=gen), torch.randint(0, 4, (64,), generator=gen)
    scores = iter([0.5, 0.9, 0.4, 0.3, 0.2, 0.1, 0.0, 0.0])
    snapshots = []

    def metric(model: nn.Module, _data: object) -> float:
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(scores)

    model = _mlp(0)
    result = fit(model, batches(x, y, 16), [0], epochs=8, patience=2, metric=metric, lr=1e-2, progress=False)
    assert result.stopped_early and result.epochs == 4 and result.best_epoch == 2
    assert result.best_metric == pytest.approx(0.9)
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshots[1][key]), key


def test_fit_reports_a_diverging_loss() -> None:
    model = nn.Linear(2, 2)

    def bad_loss(_model: nn.Module, _batch: object) -> torch.Tensor:
        return torch.tensor(float("nan"), requires_grad=True)

    with pytest.raises(ValueError, match="lower lr"):
        fit(model, [(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))], loss_fn=bad_loss, progress=False)


def test_distiller_term_is_the_kd_kl_or_the_mse_and_trains_only_the_student(gen: torch.Generator) -> None:
    from lowbit.qat import Distiller

    teacher, student = _mlp(0), _mlp(1)
    x = torch.randn(16, 8, generator=gen)
    out = student(x)
    kl = Distiller(teacher, temperature=2.0, weight=0.5)(out, x)
    torch.testing.assert_close(kl, 0.5 * kd_loss(out, teacher(x), temperature=2.0), rtol=0, atol=0)
    mse = Distiller(teacher, kind="mse")(out, x)
    torch.testing.assert_close(mse, F.mse_loss(out, teacher(x)), rtol=0, atol=0)
    assert float(Distiller(teacher)(teacher(x).detach(), x)) == pytest.approx(0.0, abs=1e-6)
    (kl + mse).backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())  # the teacher runs without gradients


def test_distiller_checks_its_teacher_and_the_shapes() -> None:
    from lowbit import qat
    from lowbit.qat import Distiller

    teacher = _mlp(0)
    with pytest.raises(ValueError, match="kind must be one of kl, mse"):
        Distiller(teacher, kind="ce")
    with pytest.raises(ValueError, match="temperature"):
        Distiller(teacher, temperature=0)
    student = qat.prepare(teacher, qat.recipe(4), inplace=True, progress=False)
    with pytest.raises(ValueError, match="the teacher contains QAT layers"):
        Distiller(student)
    with pytest.raises(ValueError, match="student's output is \\(2, 3\\) but the teacher's is \\(2, 4\\)"):
        Distiller(_mlp(1))(torch.zeros(2, 3), torch.zeros(2, 8))


def test_distiller_pulls_a_2bit_qat_student_toward_its_teacher_in_a_user_loop(gen: torch.Generator) -> None:
    from lowbit import qat

    teacher = _mlp(0)
    with torch.no_grad():  # confident logits, as a trained classifier's: a KL that 2 bits moves
        teacher[2].weight.mul_(8)
    x = torch.randn(256, 8, generator=gen)
    target = teacher(x).argmax(1).detach()
    student = qat.prepare(teacher, qat.recipe(2, activation_bits=8), progress=False)
    qat.calibrate(student, [x])
    distiller = qat.Distiller(teacher, temperature=2.0)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    before = float(distiller(student.eval()(x), x))
    student.train()
    for i in range(60):
        batch = x[(i % 4) * 64 : (i % 4 + 1) * 64]
        loss = distiller(student(batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    q = qat.convert(student, progress=False)
    with torch.no_grad():
        after = float(distiller(q(x), x))
        agree = float((q(x).argmax(1) == target).float().mean())
    assert after < 0.5 * before and agree >= 0.85, (before, after, agree)
