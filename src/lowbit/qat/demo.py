"""Training-time rows for ``lowbit demo`` / ``compare``: QAT, binary / ternary, pruning, Deep Compression.

``demo_rows(zoo_model)`` trains each technique briefly from the cached float model (seeded, fixed
epochs, no early stopping on the test data) and returns one dict per row:

==================  ==========================================================================
``key``             stable id (``qat4``, ``qat2``, ``ternary``, ``pruned50-int8``, ``deep-compression``...)
``name``            label for the table (``"QAT 4-bit"`` ...)
``model``           the packed quantized model (``lowbit.save`` works on it); float for ``structured30``
``train_seconds``   wall-clock seconds of training / fine-tuning for this row
``description``     one line: what was trained and how
==================  ==========================================================================

The caller measures accuracy, size and latency the same way as for the PTQ rows. Only the digits
models carry training data (``load_split``); other zoo models raise ``ValueError``.

>>> import lowbit
>>> rows = demo_rows(lowbit.zoo.get("digits-mlp"), keys=("qat4",))  # doctest: +SKIP
>>> rows[0]["name"], rows[0]["train_seconds"] > 0  # doctest: +SKIP
('QAT 4-bit', True)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

import lowbit
from lowbit import pruning
from lowbit.distill import DistillationLoss, distill
from lowbit.qat.core import calibrate, convert, prepare, recipe
from lowbit.train import Batches, batches, fit

DEFAULT_KEYS = ("qat4", "qat2", "ternary", "pruned50-int8", "deep-compression")
ALL_KEYS = (
    "qat4",
    "qat3",
    "qat2",
    "binary",
    "ternary",
    "pruned50-int8",
    "2:4-int8",
    "structured30",
    "deep-compression",
)
# Fine-tuning length per QAT width: lower widths move further from the float solution. These, LR
# and the distillation settings (T=4, alpha=0.9) were checked on validation folds of the training
# split (bench/qat_vs_ptq.py --protocol val): 2x epochs, lr 1e-4 / 3e-4, T=2, alpha 0.5 / 1, STE,
# log-parametrised LSQ scales and min-max initial ranges were all within noise or worse.
QAT_EPOCHS = {8: 2, 4: 4, 3: 5, 2: 12}
LR = 1e-3
Builder = Callable[[Any, int, bool], tuple[nn.Module, float]]


def training_data(zoo_model: Any, batch_size: int = 64, seed: int = 0) -> Batches:
    """Shuffled ``(images, labels)`` batches of the digits training split (never the test split)."""
    from lowbit.zoo.digits import RECIPES, load_split

    if getattr(zoo_model, "name", None) not in RECIPES:
        raise ValueError(
            f"training rows need labelled training data; only the digits models have it "
            f"({', '.join(RECIPES)}), not {getattr(zoo_model, 'name', zoo_model)!r}"
        )
    x_train, y_train, _, _ = load_split()
    return batches(x_train, y_train, batch_size, seed=seed)


def qat_model(
    zoo_model: Any, bits: int | str, epochs: int, lsq: bool = True, seed: int = 0, progress: bool = False
) -> tuple[nn.Module, float]:
    """QAT + distillation from the float model at ``bits`` (or ``"binary"`` / ``"ternary"``);
    returns the converted model and training seconds."""
    return qat_train(
        zoo_model.model, training_data(zoo_model, seed=seed), zoo_model.calibration, bits, epochs,
        lsq=lsq, seed=seed, progress=progress,
    )  # fmt: skip


def qat_train(
    teacher: nn.Module,
    train_data: Batches,
    calibration: Sequence[Any],
    bits: int | str,
    epochs: int,
    *,
    lsq: bool = True,
    lr: float = LR,
    temperature: float = 4.0,
    alpha: float = 0.9,
    seed: int = 0,
    progress: bool = False,
) -> tuple[nn.Module, float]:
    """QAT + distillation of ``teacher`` on ``train_data``; returns the converted model and the
    training seconds (``qat_model`` for zoo models). Training starts from the same-recipe PTQ model:
    ``calibration`` sets the activation ranges as ``lowbit.quantize`` would."""
    teacher = teacher.eval()
    student = prepare(teacher, recipe(bits), lsq=lsq, progress=progress)
    calibrate(student, calibration)
    result = distill(
        student, teacher, train_data, epochs=epochs, lr=lr, temperature=temperature, alpha=alpha,
        seed=seed, progress=progress, desc=f"QAT {bits}",
    )  # fmt: skip
    return convert(student), result.seconds


def _qat(
    bits: int | str, epochs: int, lsq: bool = True
) -> Callable[[Any, int, bool], tuple[nn.Module, float]]:
    return lambda zm, seed, progress: qat_model(zm, bits, epochs, lsq, seed, progress)


def _pruned_int8(method: str, amount: float) -> Builder:
    def build(zm: Any, seed: int, progress: bool) -> tuple[nn.Module, float]:
        model = _copy(zm.model)
        kd = DistillationLoss(zm.model, temperature=4.0, alpha=0.7)
        result = pruning.iterative_prune(
            model, amount, training_data(zm, seed=seed), method=method, steps=2, epochs_per_step=2,
            loss_fn=kd, lr=LR, seed=seed, progress=progress,
        )  # fmt: skip
        qmodel = lowbit.quantize(model, "int8-static", calibration=zm.calibration, progress=False)
        return qmodel, result.seconds

    return build


def _structured(amount: float) -> Builder:
    def build(zm: Any, seed: int, progress: bool) -> tuple[nn.Module, float]:
        model = pruning.prune_channels(zm.model, amount, zm.calibration[0])
        kd = DistillationLoss(zm.model, temperature=4.0, alpha=0.7)
        result = fit(
            model, training_data(zm, seed=seed), None, kd, epochs=4, lr=LR, seed=seed, progress=progress
        )
        return model, result.seconds

    return build


def _deep_compression(zm: Any, seed: int, progress: bool) -> tuple[nn.Module, float]:
    # Pure distillation (alpha=1) and ten gentle pruning steps: the 90%-sparse LSTM stays within
    # about 0.3 points of float over seeds, where five steps with hard labels lost 1-2.5 points.
    kd = DistillationLoss(zm.model, temperature=4.0, alpha=1.0)
    result = pruning.deep_compress(
        zm.model, training_data(zm, seed=seed), sparsity=0.9, bits=3, scope="global", steps=10,
        epochs_per_step=4, centroid_epochs=4, loss_fn=kd, lr=1e-2, seed=seed, progress=progress,
    )  # fmt: skip
    return result.model, result.seconds


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


# key -> (table label, description, builder(zoo_model, seed, progress) -> (model, seconds))
ROWS: dict[str, tuple[str, str, Builder]] = {
    "qat4": ("QAT 4-bit", "int4 weights + uint4 activations, LSQ + distillation", _qat(4, QAT_EPOCHS[4])),
    "qat3": ("QAT 3-bit", "int3 weights + uint3 activations, LSQ + distillation", _qat(3, QAT_EPOCHS[3])),
    "qat2": ("QAT 2-bit", "int2 weights + uint2 activations, LSQ + distillation", _qat(2, QAT_EPOCHS[2])),
    "binary": (
        "binary QAT",
        "binary weights (XNOR scale) + uint8 activations, STE + distillation",
        _qat("binary", 8),
    ),
    "ternary": (
        "ternary QAT",
        "ternary weights (TWN scale) + uint8 activations, STE + distillation",
        _qat("ternary", 6),
    ),
    "pruned50-int8": (
        "pruned 50% + int8",
        "magnitude pruning to 50% per layer, fine-tuned, then int8-static",
        _pruned_int8("magnitude", 0.5),
    ),
    "2:4-int8": (
        "2:4 + int8",
        "2:4 semi-structured sparsity, fine-tuned, then int8-static",
        _pruned_int8("2:4", 0.5),
    ),
    "structured30": (
        "structured 30% (float)",
        "30% of conv/linear output channels removed (the model shrinks), fine-tuned",
        _structured(0.3),
    ),
    "deep-compression": (
        "deep compression",
        "90% pruned + 8-entry k-means codebook per tensor, distilled, coded lzma artifact",
        _deep_compression,
    ),
}


def demo_rows(
    zoo_model: Any, keys: Sequence[str] = DEFAULT_KEYS, seed: int = 0, progress: bool = False
) -> list[dict[str, Any]]:
    """Train the rows named by ``keys`` (see ``ALL_KEYS``) for a digits zoo model (see the module
    docstring). ``structured30`` needs a plain conv / linear chain (digits-cnn, digits-mlp)."""
    unknown = [k for k in keys if k not in ROWS]
    if unknown:
        raise ValueError(f"unknown demo row {unknown[0]!r}; choose from {', '.join(ALL_KEYS)}")
    training_data(zoo_model)  # fail early for models without training data
    rows = []
    for key in keys:
        label, description, build = ROWS[key]
        started = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, seconds = build(zoo_model, seed, progress)
        rows.append(
            {
                "key": key,
                "name": label,
                "model": model.eval(),
                "train_seconds": seconds,
                "total_seconds": time.perf_counter() - started,
                "description": description,
            }
        )
    return rows
