"""Knowledge distillation: train a (quantized, pruned) student to match a float teacher.

The loss (Hinton et al., 2015) mixes KL divergence between temperature-softened teacher and
student distributions, scaled by ``T**2`` so its gradients keep their size as ``T`` changes, with
the ordinary task loss: ``alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE(labels)``. Optional feature
matching adds the mean squared error between named intermediate outputs (FitNets-style hints).

>>> import torch
>>> teacher = torch.nn.Linear(4, 3)
>>> student = torch.nn.Linear(4, 3)
>>> loss = DistillationLoss(teacher, temperature=2.0)
>>> float(loss(student, (torch.randn(8, 4), torch.randint(0, 3, (8,)))).detach()) > 0
True
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lowbit.eval.metrics import output_tensor
from lowbit.modelcheck import require_module
from lowbit.train import FitResult, fit
from lowbit.zoo.base import call_model


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> torch.Tensor:
    """Distillation loss on logits (see the module docstring); without labels only the KL term counts.

    >>> z = torch.tensor([[2.0, 0.0, -1.0]])
    >>> float(kd_loss(z, z, temperature=3.0))
    0.0
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=-1),
        F.log_softmax(teacher_logits.detach() / t, dim=-1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)
    if labels is None or alpha == 1.0:
        return soft
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student_logits, labels)


class _Capture:
    """Forward hooks that keep the latest output of named submodules."""

    def __init__(self, model: nn.Module, names: Iterable[str], role: str) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []
        modules = dict(model.named_modules())
        for name in names:
            if name not in modules:
                raise ValueError(
                    f"feature layer {name!r} is not a submodule of the {role}; "
                    f"choose among {', '.join(n for n in list(modules)[1:12] if n)}..."
                )
            self.handles.append(modules[name].register_forward_hook(self._hook(name)))

    def _hook(self, name: str):  # noqa: ANN202
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self.outputs[name] = output_tensor(output)

        return hook


class DistillationLoss:
    """``loss_fn(student, batch)`` for ``lowbit.train.fit``: distill ``teacher`` into the student.

    ``features`` maps student submodule names to teacher submodule names whose outputs should match
    (same shapes); their MSE is added with weight ``feature_weight``. Batches are ``(inputs, labels)``
    or bare inputs (then only the KL term is used). The teacher runs in eval mode without gradients.
    """

    def __init__(
        self,
        teacher: nn.Module,
        temperature: float = 4.0,
        alpha: float = 0.9,
        features: dict[str, str] | None = None,
        feature_weight: float = 1.0,
    ) -> None:
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), temperature=temperature, alpha=alpha)  # validate
        self.teacher = teacher.eval()
        self.temperature, self.alpha = temperature, alpha
        self.features = dict(features or {})
        self.feature_weight = feature_weight
        self._teacher_hooks = _Capture(teacher, self.features.values(), "teacher") if self.features else None
        self._student_hooks: dict[int, _Capture] = {}

    def __call__(self, student: nn.Module, batch: Any) -> torch.Tensor:
        if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor):
            inputs, labels = batch
        else:
            inputs, labels = batch, None
        if self.features and id(student) not in self._student_hooks:
            self._student_hooks[id(student)] = _Capture(student, self.features, "student")
        with torch.no_grad():
            teacher_logits = output_tensor(call_model(self.teacher, inputs))
        student_logits = output_tensor(call_model(student, inputs))
        loss = kd_loss(student_logits, teacher_logits, labels, self.temperature, self.alpha)
        if self.features:
            assert self._teacher_hooks is not None
            captured = self._student_hooks[id(student)].outputs
            for s_name, t_name in self.features.items():
                s_out, t_out = captured[s_name], self._teacher_hooks.outputs[t_name]
                if s_out.shape != t_out.shape:
                    raise ValueError(
                        f"feature {s_name!r} (student) is {tuple(s_out.shape)} but {t_name!r} (teacher) is "
                        f"{tuple(t_out.shape)}; match layers with equal output shapes"
                    )
                loss = loss + self.feature_weight * F.mse_loss(s_out, t_out.detach())
        return loss

    def close(self) -> None:
        """Remove the forward hooks (feature matching registers them on both models)."""
        hooks = list(self._student_hooks.values())
        if self._teacher_hooks is not None:
            hooks.append(self._teacher_hooks)
        for capture in hooks:
            for h in capture.handles:
                h.remove()
        self._student_hooks.clear()
        self._teacher_hooks = None


class Distiller:
    """The extra loss term from a float teacher, for a training loop of your own (QAT included).

    ``distiller(student_output, inputs)`` runs ``teacher`` on ``inputs`` (what you passed to the
    student: a tensor, a tuple of positional arguments or a dict of keyword arguments) without
    gradients and returns ``weight`` times the distance of ``student_output`` to its output:
    ``kind="kl"``: the temperature-softened KL term of ``kd_loss`` (scaled by ``T**2``), for logits;
    ``kind="mse"``: the mean squared error, for regression outputs or features. Add it to your task
    loss; the student's forward is yours, so it runs once.

    >>> import torch
    >>> teacher, student = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    >>> distiller = Distiller(teacher, temperature=2.0)
    >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    >>> out = student(x)
    >>> loss = torch.nn.functional.cross_entropy(out, y) + distiller(out, x)
    >>> loss.backward()
    >>> float(Distiller(teacher)(teacher(x).detach(), x))
    0.0
    """

    KINDS = ("kl", "mse")

    def __init__(
        self, teacher: nn.Module, temperature: float = 4.0, kind: str = "kl", weight: float = 1.0
    ) -> None:
        require_module(teacher, "Distiller")
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {', '.join(self.KINDS)}; got {kind!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        # The teacher must stay float: prepare(..., inplace=True) would have made it the student.
        from lowbit.qat.modules import QATModule

        if any(isinstance(m, QATModule) for m in teacher.modules()):
            raise ValueError(
                "the teacher contains QAT layers; pass the float model (qat.prepare without "
                "inplace=True leaves it untouched)"
            )
        self.teacher = teacher.eval()  # dropout off, BatchNorm on its running statistics
        self.temperature, self.kind, self.weight = temperature, kind, weight

    def teacher_output(self, inputs: Any) -> torch.Tensor:
        """The teacher's output tensor for ``inputs`` (no gradients, eval mode)."""
        if self.teacher.training:  # the user's loop may have called .train() on it
            self.teacher.eval()
        with torch.no_grad():
            return output_tensor(call_model(self.teacher, inputs))

    def __call__(self, student_output: Any, inputs: Any) -> torch.Tensor:
        student = output_tensor(student_output)
        target = self.teacher_output(inputs).to(student.dtype)
        if target.shape != student.shape:
            raise ValueError(
                f"the student's output is {tuple(student.shape)} but the teacher's is "
                f"{tuple(target.shape)}; pass the inputs the student was called on"
            )
        if self.kind == "kl":
            term = kd_loss(student, target, temperature=self.temperature)
        else:
            term = F.mse_loss(student, target)
        return self.weight * term


def distill(
    student: nn.Module,
    teacher: nn.Module,
    train_data: Iterable[Any],
    val_data: Iterable[Any] | None = None,
    *,
    temperature: float = 4.0,
    alpha: float = 0.9,
    features: dict[str, str] | None = None,
    feature_weight: float = 1.0,
    **fit_options: Any,
) -> FitResult:
    """Train ``student`` in place to mimic ``teacher`` with ``lowbit.train.fit`` (options pass through).

    >>> import torch
    >>> from lowbit.train import batches
    >>> x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    >>> teacher, student = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    >>> distill(student, teacher, batches(x, y, 8), epochs=1, progress=False).epochs
    1
    """
    require_module(student, "distill")
    loss = DistillationLoss(teacher, temperature, alpha, features, feature_weight)
    try:
        return fit(student, train_data, val_data, loss, **fit_options)
    finally:
        loss.close()
