"""The technique rows of the domain tables: every preset the tables name, plus two training rows.

Each ``DomainTechnique`` turns a ``DomainTask`` into the model to score. Preset rows call
``lowbit.quantize`` with the task's calibration batches; the training rows fine-tune with the
task's own loss on its training batches (QAT at 4 bits; magnitude pruning to 50% then int8
static), so they work for a detector's or a CTC model's loss as well as for cross-entropy.

>>> [t.name for t in TECHNIQUES][:4]
['float', 'int8-dynamic', 'int8-static', 'int4-weight-only']
>>> technique("pq").family
'product quantization'
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.domains.common import rewound
from lowbit.domains.task import DomainTask


@dataclass(frozen=True)
class DomainTechnique:
    """One row: ``build(task)`` returns the model to score; ``family`` is the tables' wording."""

    name: str
    build: Callable[[DomainTask], nn.Module]
    family: str
    description: str
    trains: bool = False  # needs the task's training data and loss


def _preset(name: str) -> Callable[[DomainTask], nn.Module]:
    def build(task: DomainTask) -> nn.Module:
        import lowbit

        return lowbit.quantize(task.model, name, calibration=task.calibration or None, progress=False)

    return build


def _reproducible(build: Callable[[DomainTask], nn.Module]) -> Callable[[DomainTask], nn.Module]:
    """A training row that gives one result per task: the global RNG seeded (then restored) and
    the training batches rewound, whatever ran before it (training the float model on a cold
    cache, another row, a ``--techniques`` subset)."""

    def build_seeded(task: DomainTask) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            rewound(task.train_data)
            return build(task)

    return build_seeded


def _qat4(task: DomainTask) -> nn.Module:
    """4-bit weights and activations, LSQ scales, fine-tuned with the task's loss."""
    from lowbit.domains.common import train_epochs
    from lowbit.qat import calibrate, convert, prepare, recipe

    # example=: BatchNorms are folded by running the model (hooks) where fx cannot trace it (a
    # detector's proposal step); without it they would only be frozen.
    example = task.calibration[0] if task.calibration else None
    student = prepare(task.model, recipe(4), lsq=True, progress=False, example=example)
    calibrate(student, task.calibration)
    train_epochs(
        student,
        task.train_data,
        task.loss,
        task.finetune_epochs,
        task.finetune_lr,
        desc=f"QAT 4-bit {task.name}",
        progress=False,
    )
    return convert(student.eval(), progress=False)


def _pruned_int8(task: DomainTask) -> nn.Module:
    """Magnitude pruning to 50% per layer in two steps with fine-tuning, then int8 static."""
    import lowbit
    from lowbit.pruning import iterative_prune

    model = copy.deepcopy(task.model)
    iterative_prune(
        model, 0.5, task.train_data, steps=2, epochs_per_step=task.finetune_epochs, loss_fn=task.loss,
        lr=task.finetune_lr, progress=False,
    )  # fmt: skip
    return lowbit.quantize(model.eval(), "int8-static", calibration=task.calibration or None, progress=False)


def _float(task: DomainTask) -> nn.Module:
    return task.model


TECHNIQUES: list[DomainTechnique] = [
    DomainTechnique("float", _float, "float32", "the trained float32 model (baseline)"),
    DomainTechnique("int8-dynamic", _preset("int8-dynamic"), "int8", "int8 weights, activations per batch"),
    DomainTechnique("int8-static", _preset("int8-static"), "int8", "int8 weights + calibrated activations"),
    DomainTechnique("int4-weight-only", _preset("int4-weight-only"), "int4", "int4 g64, MSE clipping"),
    DomainTechnique("int4-gptq", _preset("int4-gptq"), "int4", "int4 g64 by GPTQ"),
    DomainTechnique("int4-awq", _preset("int4-awq"), "int4", "int4 g64 by AWQ"),
    DomainTechnique("fp8", _preset("fp8"), "fp8", "fp8 e4m3 weights per channel"),
    DomainTechnique("nf4", _preset("nf4"), "quantile", "NormalFloat-4 (quantile grid) g64"),
    DomainTechnique(
        "kmeans-4bit", _preset("kmeans-4bit"), "vector quantization", "16-entry k-means per layer"
    ),
    DomainTechnique("pq", _preset("pq"), "product quantization", "16 codewords per 4-value sub-space"),
    DomainTechnique(
        "QAT 4-bit", _reproducible(_qat4), "QAT", "W4A4 LSQ, fine-tuned with the task loss", trains=True
    ),
    DomainTechnique(
        "pruned 50% + int8",
        _reproducible(_pruned_int8),
        "pruning",
        "50% magnitude pruning, fine-tuned, int8 static",
        trains=True,
    ),
]


def technique(name: str) -> DomainTechnique:
    """The technique called ``name``.

    >>> technique("int3")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: unknown technique 'int3'; known: float, int8-dynamic, int8-static, ...
    """
    for tech in TECHNIQUES:
        if tech.name == name:
            return tech
    raise ValueError(f"unknown technique {name!r}; known: {', '.join(t.name for t in TECHNIQUES)}")
