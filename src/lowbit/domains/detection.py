"""The detection domain: two detectors trained here on procedural scenes, scored by COCO mAP, and
the pretrained MTCNN face detector, scored by agreement with its float self.

* ``ssd-lite``: single-stage SSD with a depthwise-separable backbone (:class:`SSDLite`);
* ``faster-rcnn-lite``: two-stage, RPN + RoI Align head (:class:`FasterRCNNLite`);
* ``mtcnn``: ``lowbit.zoo.mtcnn.MTCNN`` on the photos it ships with (facenet-pytorch weights).

The scenes (``lowbit.domains.detection_data``): 64x64 cluttered images with 1-4 circles, squares
and triangles. Both detectors train once on 4000 of them (seed 1) and are cached; mAP@0.5 (the
primary metric) and mAP@[.5:.95] are measured on held-out scenes (seed 2): 512, or 128 with
``quick``. Training is the same length either way, so quick and full runs share one cache entry.

>>> sorted(BUILDERS)
['faster-rcnn-lite', 'mtcnn', 'ssd-lite']
>>> task = BUILDERS["ssd-lite"](True)  # doctest: +SKIP
>>> task.score(task.model)  # doctest: +SKIP
{'map50': 0.84..., 'map': 0.58...}
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from lowbit.domains.common import Shuffled, cached_training, train_epochs
from lowbit.domains.detection_data import Target, make_scenes, mean_average_precision, to_input
from lowbit.domains.detection_models import FasterRCNNLite, SSDLite, rcnn_detections, ssd_detections
from lowbit.domains.task import DomainTask

TRAIN_SEED, HELDOUT_SEED = 1, 2
TRAIN_IMAGES = 4000
FINETUNE_IMAGES = 1024  # what the QAT / pruning rows fine-tune on (their first images)
HELDOUT_IMAGES = {True: 128, False: 512}
BATCH = 32  # calibration and held-out batches
TRAIN_BATCH = 16  # twice the steps of 32 for the same CPU time: converges in fewer epochs
MAP_METRICS = {"map50": True, "map": True}


@functools.lru_cache(maxsize=3)
def scenes(n: int, seed: int) -> tuple[torch.Tensor, list[Target]]:
    """``n`` scenes from ``seed`` as detector input (float 0..1) and targets, kept for reuse
    (both detectors and every quantized model are scored on the same tensors). A seed's first
    ``k`` scenes are the same for any ``n >= k``."""
    images, targets = make_scenes(n, seed)
    return to_input(images), targets


def detector_loss(model: nn.Module, batch: tuple[torch.Tensor, list[Target]]) -> torch.Tensor:
    """The detector's own training loss on one ``(images, targets)`` batch."""
    return model.loss(*batch)


def map_score(
    decode: Callable[[torch.Tensor], list[Target]], images: torch.Tensor, targets: list[Target]
) -> Callable[[nn.Module], dict[str, float]]:
    """``score(model) -> {"map50", "map"}`` over ``images``: the model's raw outputs, ``decode``d
    to detections (decoding and NMS outside the model), against ``targets``."""

    def score(model: nn.Module) -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            outputs = torch.cat([model(images[i : i + 64]) for i in range(0, len(images), 64)])
        return mean_average_precision(decode(outputs), targets)

    return score


def _seeded(factory: Callable[[], nn.Module]) -> nn.Module:
    # The initial weights decide the trained model: draw them from a fixed seed, without
    # touching the caller's random state.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return factory()


def _detector_task(
    name: str, model: nn.Module, decode: Callable[[torch.Tensor], list[Target]], epochs: int, lr: float,
    finetune_epochs: int, quick: bool, description: str,
) -> DomainTask:  # fmt: skip
    def train(m: nn.Module) -> None:
        images, targets = make_scenes(TRAIN_IMAGES, TRAIN_SEED)  # not kept: 200 MB as float
        data = Shuffled((to_input(images), targets), batch_size=TRAIN_BATCH, seed=0)
        with torch.random.fork_rng():
            torch.manual_seed(0)  # the losses sample anchors and jitter boxes
            # AdamW's usual decay of 0.01, not 1e-4: with 1e-4, SSD-lite's first depthwise conv
            # (9 weights per channel, BatchNorm gains up to 14 after it) lost up to 5 mAP@0.5
            # points at int4, depending on the seed; with 0.01, 2 points (2 seeds each).
            train_epochs(m, data, detector_loss, epochs, lr, weight_decay=1e-2, desc=f"training {name}")

    model, seconds = cached_training(f"domains-{name}", 1, model, train)
    # Calibration and fine-tuning read the first training scenes only: building from the cache
    # then generates ~1500 scenes, not the 4000 of training.
    finetune = scenes(FINETUNE_IMAGES, TRAIN_SEED)
    held_images, held_targets = scenes(HELDOUT_IMAGES[quick], HELDOUT_SEED)
    n_inputs = 2 if quick else 4
    return DomainTask(
        domain="detection",
        name=name,
        model=model,
        calibration=[finetune[0][i * BATCH : (i + 1) * BATCH] for i in range(8)],
        train_data=Shuffled(finetune, batch_size=TRAIN_BATCH, seed=0),
        loss=detector_loss,
        score=map_score(decode, held_images, held_targets),
        metrics=dict(MAP_METRICS),
        inputs=[held_images[i * BATCH : (i + 1) * BATCH] for i in range(n_inputs)],
        description=f"{description}, {sum(p.numel() for p in model.parameters()) / 1e3:.0f}k parameters",
        train_seconds=seconds,
        notes=[
            f"{name}: {TRAIN_IMAGES} procedural 64x64 scenes (1-4 circles / squares / triangles on "
            f"clutter), {epochs} epochs; mAP on {len(held_images)} held-out scenes (pycocotools)"
        ],
        finetune_epochs=finetune_epochs,
        finetune_lr=2e-4,
    )


def ssd_lite(quick: bool) -> DomainTask:
    """SSD-lite (depthwise-separable backbone, anchors at strides 4 / 8 / 16)."""
    model = _seeded(SSDLite)
    anchors = model.anchors.clone()  # decoded outside the model: a quantized copy needs none

    def decode(out: torch.Tensor) -> list[Target]:
        return ssd_detections(out, anchors)

    return _detector_task(
        # finetune_epochs: 2 passes over the 1024 fine-tuning scenes, ~15 s of 4-bit QAT (one core).
        "ssd-lite", model, decode, epochs=4, lr=3e-3, finetune_epochs=2, quick=quick,
        description="single-stage SSD-lite detector on procedural shapes",
    )  # fmt: skip


def faster_rcnn_lite(quick: bool) -> DomainTask:
    """Faster R-CNN-lite (RPN on a stride-4 map, RoI Align, two-layer box head)."""
    return _detector_task(
        # One fine-tuning pass (~12 s of 4-bit QAT): its steps cost twice SSD-lite's.
        "faster-rcnn-lite", _seeded(FasterRCNNLite), rcnn_detections, epochs=3, lr=4e-3, finetune_epochs=1,
        quick=quick,
        description="two-stage Faster R-CNN-lite detector (RPN + RoI Align head) on procedural shapes",
    )  # fmt: skip


def mtcnn(quick: bool) -> DomainTask:
    """The pretrained MTCNN (see :mod:`lowbit.domains.detection_faces`)."""
    from lowbit.domains.detection_faces import mtcnn_task

    return mtcnn_task(quick)


BUILDERS: dict[str, Callable[[bool], DomainTask]] = {
    "ssd-lite": ssd_lite,
    "faster-rcnn-lite": faster_rcnn_lite,
    "mtcnn": mtcnn,
}
