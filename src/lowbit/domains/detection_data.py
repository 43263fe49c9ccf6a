"""Procedural detection scenes and the detection arithmetic the domain detectors share: box
encoding, greedy class-wise NMS, mAP through torchmetrics.

A scene is a 64x64 RGB image on a cluttered background (a smooth colour field, stripes, a few
thin lines, pixel noise) with 1-4 objects of three classes (filled circle, square, triangle) in
random colours and sizes, which may partly overlap. The boxes are the shapes' exact geometric
extent (``x1, y1, x2, y2`` in pixels), so there is no labelling noise. Everything is drawn from
one seed: the training and held-out splits are two seeds.

>>> images, targets = make_scenes(2, seed=0)
>>> images.shape, images.dtype
(torch.Size([2, 3, 64, 64]), torch.uint8)
>>> sorted(targets[0]), targets[0]["boxes"].shape[1]
(['boxes', 'labels'], 4)
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any

import numpy as np
import torch

from lowbit.zoo.mtcnn import box_iou

CLASSES = ("circle", "square", "triangle")
SIZE = 64
MIN_SIDE, MAX_SIDE = 10, 26  # object extent in pixels
MAX_OVERLAP = 0.25  # IoU a new object may have with one already placed (later ones occlude)
Target = dict[str, torch.Tensor]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    # A smooth colour field (a random 4x4 grid, bilinearly upsampled) ...
    grid = rng.uniform(0.0, 1.0, (3, 4, 4))
    t = torch.nn.functional.interpolate(
        torch.from_numpy(grid).unsqueeze(0), size=(size, size), mode="bilinear", align_corners=True
    )
    field = t[0].numpy()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    # ... with faint stripes of random frequency and direction (texture the detector must ignore) ...
    angle, freq = rng.uniform(0, math.pi), rng.uniform(0.15, 0.6)
    stripes = np.sin(freq * (xx * math.cos(angle) + yy * math.sin(angle)) + rng.uniform(0, 6.3))
    field = field + rng.uniform(0.03, 0.12) * stripes[None] * rng.choice([-1.0, 1.0], size=(3, 1, 1))
    # ... and thin straight lines (clutter that is none of the classes).
    for _ in range(rng.integers(1, 5)):
        x0, y0, x1, y1 = rng.uniform(0, size, 4)
        steps = np.linspace(0.0, 1.0, 2 * size)
        px = np.clip((x0 + (x1 - x0) * steps).astype(int), 0, size - 1)
        py = np.clip((y0 + (y1 - y0) * steps).astype(int), 0, size - 1)
        field[:, py, px] = rng.uniform(0.0, 1.0, (3, 1))
    return field


def _mask(kind: int, cx: float, cy: float, side: float, flip: bool, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5  # pixel centres
    h = side / 2
    if kind == 0:  # circle of diameter ``side``
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= h * h
    if kind == 1:  # axis-aligned square
        return (np.abs(xx - cx) <= h) & (np.abs(yy - cy) <= h)
    # Isosceles triangle, base and height ``side``, apex up (or down when ``flip``).
    v = (yy - (cy - h)) / side  # 0 at the apex row, 1 at the base
    if flip:
        v = 1.0 - v
    return (v >= 0) & (v <= 1) & (np.abs(xx - cx) <= v * h)


def make_scene(rng: np.random.Generator, size: int = SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scene: ``(image (3, H, W) uint8, boxes (k, 4) float32, labels (k,) int64)``."""
    image = _background(rng, size)
    boxes: list[list[float]] = []
    labels: list[int] = []
    for _ in range(rng.integers(1, 5)):
        for _attempt in range(20):
            side = float(rng.uniform(MIN_SIDE, MAX_SIDE))
            cx, cy = rng.uniform(side / 2, size - side / 2, 2)
            box = [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]
            if boxes and float(box_iou(torch.tensor([box]), torch.tensor(boxes)).max()) > MAX_OVERLAP:
                continue
            kind = int(rng.integers(0, len(CLASSES)))
            mask = _mask(kind, cx, cy, side, bool(rng.integers(0, 2)), size)
            region = image[:, mask].mean(axis=1)
            # A colour that stands out from what it covers (a shape the same colour as the
            # background would be invisible, an impossible label).
            for _colour in range(20):
                colour = rng.uniform(0.0, 1.0, 3)
                if np.abs(colour - region).sum() > 0.6:
                    break
            image[:, mask] = colour[:, None]
            boxes.append(box)
            labels.append(kind)
            break
    image = image + rng.normal(0.0, rng.uniform(0.02, 0.08), image.shape)
    pixels = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
    return pixels, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64)


def make_scenes(n: int, seed: int, size: int = SIZE) -> tuple[torch.Tensor, list[Target]]:
    """``n`` scenes from ``seed``: images ``(n, 3, size, size)`` uint8 and one target per image,
    ``{"boxes": (k, 4) float32 x1 y1 x2 y2 pixels, "labels": (k,) int64 class index}``.

    >>> a, ta = make_scenes(3, seed=1); b, tb = make_scenes(3, seed=1)
    >>> torch.equal(a, b) and all(torch.equal(x["boxes"], y["boxes"]) for x, y in zip(ta, tb))
    True
    """
    rng = np.random.default_rng(seed)
    images, targets = [], []
    for _ in range(n):
        pixels, boxes, labels = make_scene(rng, size)
        images.append(torch.from_numpy(pixels))
        targets.append({"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels)})
    return torch.stack(images), targets


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to the detectors' input: float32 in 0..1."""
    return images.float() / 255.0


# SSD's box encoding: centre offsets in anchor sizes, log size ratios, divided by the usual
# "variances" so the four targets have about unit spread.
CENTRE_SCALE, SIZE_SCALE = 0.1, 0.2


def encode(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """``(N, 4)`` boxes relative to their ``(N, 4)`` anchors (both ``x1 y1 x2 y2``).

    >>> a = torch.tensor([[0.0, 0, 10, 10]])
    >>> decode(encode(torch.tensor([[1.0, 2, 9, 13]]), a), a).round().tolist()
    [[1.0, 2.0, 9.0, 13.0]]
    """
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ax, ay = anchors[:, 0] + aw / 2, anchors[:, 1] + ah / 2
    w, h = (boxes[:, 2] - boxes[:, 0]).clamp(min=1e-3), (boxes[:, 3] - boxes[:, 1]).clamp(min=1e-3)
    x, y = boxes[:, 0] + w / 2, boxes[:, 1] + h / 2
    return torch.stack(
        [(x - ax) / aw / CENTRE_SCALE, (y - ay) / ah / CENTRE_SCALE,
         (w / aw).log() / SIZE_SCALE, (h / ah).log() / SIZE_SCALE], dim=-1,
    )  # fmt: skip


def decode(deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`encode`: boxes from ``(..., 4)`` deltas and matching anchors."""
    aw, ah = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
    ax, ay = anchors[..., 0] + aw / 2, anchors[..., 1] + ah / 2
    x = ax + deltas[..., 0] * CENTRE_SCALE * aw
    y = ay + deltas[..., 1] * CENTRE_SCALE * ah
    # Clamp the log ratio: an untrained or badly quantized head must not give inf boxes.
    w = aw * (deltas[..., 2] * SIZE_SCALE).clamp(max=4.0).exp()
    h = ah * (deltas[..., 3] * SIZE_SCALE).clamp(max=4.0).exp()
    return torch.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], dim=-1)


def anchor_grid(size: int, stride: int, sides: tuple[float, ...]) -> torch.Tensor:
    """Square anchors centred on each cell of a ``size / stride`` grid, ``len(sides)`` per cell,
    in the order a head's ``(B, A * k, h, w)`` output flattens to (cell-major, then anchor).

    >>> anchor_grid(16, 8, (8.0,)).tolist()[:2]
    [[0.0, 0.0, 8.0, 8.0], [8.0, 0.0, 16.0, 8.0]]
    """
    cells = size // stride
    centres = (torch.arange(cells, dtype=torch.float32) + 0.5) * stride
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    half = torch.tensor(sides, dtype=torch.float32) / 2
    cx, cy = cx.reshape(-1, 1), cy.reshape(-1, 1)
    return torch.stack([cx - half, cy - half, cx + half, cy + half], dim=-1).reshape(-1, 4)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> torch.Tensor:
    """Greedy non-maximum suppression (a box is dropped when its IoU with a kept, better box
    exceeds ``iou``): indices kept, best score first. One IoU matrix, then a loop over the kept
    boxes only, so it costs microseconds for the few hundred candidates of a 64x64 image.

    >>> b = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]])
    >>> nms(b, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist()
    [0, 2]
    """
    order = scores.argsort(descending=True, stable=True)
    overlap = (box_iou(boxes[order], boxes[order]) > iou).numpy()
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if not suppressed[i]:
            keep.append(i)
            suppressed |= overlap[i]
    return order[torch.tensor(keep, dtype=torch.long)]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou: float) -> torch.Tensor:
    """:func:`nms` within each class (boxes of different classes never suppress each other).

    >>> b = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [1, 1, 11, 11]])
    >>> batched_nms(b, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 0, 1]), 0.5).tolist()
    [0, 2]
    """
    if not len(boxes):
        return torch.zeros(0, dtype=torch.long)
    # Shift each class to its own region of the plane: one NMS pass then never mixes classes.
    shifted = boxes + (labels.to(boxes.dtype) * (boxes.max() + 1)).unsqueeze(1)
    return nms(shifted, scores, iou)


def detections(
    boxes: torch.Tensor, probs: torch.Tensor, threshold: float = 0.05, iou: float = 0.5, top: int = 20
) -> Target:
    """Final detections of one image from per-candidate boxes ``(N, 4)`` and class probabilities
    ``(N, C)`` (background already dropped): every (candidate, class) pair above ``threshold``,
    class-wise NMS, the ``top`` best. Returns ``{"boxes", "scores", "labels"}``."""
    scores, labels = probs.flatten(), torch.arange(probs.shape[1]).repeat(probs.shape[0])
    keep = scores > threshold
    cand = boxes.repeat_interleave(probs.shape[1], dim=0)[keep]
    scores, labels = scores[keep], labels[keep]
    order = scores.argsort(descending=True)[:200]  # bound the NMS loop on an untrained model
    cand, scores, labels = cand[order], scores[order], labels[order]
    pick = batched_nms(cand, scores, labels, iou)[:top]
    return {"boxes": cand[pick].clamp(0, SIZE), "scores": scores[pick], "labels": labels[pick]}


def _coco(items: list[Target], categories: list[int], scored: bool) -> Any:
    from pycocotools.coco import COCO

    annotations = []
    for image_id, item in enumerate(items):
        for box, label, *score in zip(
            item["boxes"].tolist(), item["labels"].tolist(), *([item["scores"].tolist()] if scored else []),
            strict=True,
        ):  # fmt: skip
            x1, y1, x2, y2 = box
            w, h = x2 - x1, y2 - y1
            annotation = {"image_id": image_id, "bbox": [x1, y1, w, h], "area": w * h, "category_id": label}
            annotations.append({**annotation, "id": len(annotations) + 1, "iscrowd": 0})
            if score:
                annotations[-1]["score"] = score[0]
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i} for i in range(len(items))],
        "annotations": annotations,
        "categories": [{"id": c} for c in categories],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def mean_average_precision(predictions: list[Target], targets: list[Target]) -> dict[str, float]:
    """COCO mAP@0.5 and mAP@[.5:.95] of per-image predictions ``{"boxes", "scores", "labels"}``
    against targets ``{"boxes", "labels"}`` (boxes ``x1 y1 x2 y2``), by pycocotools' ``COCOeval``.

    This is what torchmetrics' ``MeanAveragePrecision(iou_type="bbox", backend="pycocotools")``
    computes (the same COCO conversion, IoU thresholds .5:.05:.95, 101 recall points, 100
    detections per image, classes averaged), called directly because torchmetrics refuses to
    build that metric without torchvision, which lowbit does not use.

    >>> box, label = torch.tensor([[4.0, 4, 20, 20]]), torch.tensor([1])
    >>> t = [{"boxes": box, "labels": label}]
    >>> p = [{"boxes": box, "scores": torch.tensor([0.9]), "labels": label}]
    >>> {k: round(v, 6) for k, v in mean_average_precision(p, t).items()}
    {'map50': 1.0, 'map': 1.0}
    """
    from pycocotools.cocoeval import COCOeval

    labels = [t["labels"] for t in targets] + [p["labels"] for p in predictions]
    categories = torch.cat(labels).unique().tolist() if labels else []
    gt, dt = _coco(targets, categories, scored=False), _coco(predictions, categories, scored=True)
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its progress and summary
        evaluation = COCOeval(gt, dt, iouType="bbox")
        # torchmetrics's thresholds, float32 values included, so the figures match to the last digit.
        evaluation.params.iouThrs = np.array(torch.linspace(0.5, 0.95, 10).tolist())
        evaluation.params.recThrs = np.array(torch.linspace(0.0, 1.0, 101).tolist())
        evaluation.params.maxDets = [1, 10, 100]
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    # COCOeval gives -1 where a metric is undefined (no ground truth): count that as 0.
    return {"map50": max(float(evaluation.stats[1]), 0.0), "map": max(float(evaluation.stats[0]), 0.0)}
