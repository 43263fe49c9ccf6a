"""The ``mtcnn`` row of the detection domain: the pretrained MTCNN (``lowbit.zoo.mtcnn``) scored by
how well a quantized copy reproduces the float detector's faces.

There are no labelled faces that ship with a package, so the reference is float MTCNN's own
output, computed once: ``iou`` is the mean, over float's faces, of the best-matching box's IoU
(greedy, each box used once; a missed face counts 0), ``count_agreement`` the fraction of photos
with float's face count. The float model scores 1.0 / 1.0 by construction.

Scored photos (as in ``docs/notes/mtcnn.md``): matplotlib's ``grace_hopper`` portrait at full
size, x0.75, x0.5 and mirrored, the ``group`` composite (3 faces), and scikit-learn's two faceless
photos (a false face there costs count agreement): 7 faces in 7 photos. Calibration: different
photos, the faceless two and that face pasted onto the flower photo at other sizes and places.

>>> task = mtcnn_task(quick=True)  # doctest: +SKIP
>>> task.score(task.model)  # doctest: +SKIP
{'iou': 1.0, 'count_agreement': 1.0}
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.domains.task import DomainTask

NO_TRAINING = "pretrained, no training data"


def _hopper_head() -> Any:
    from matplotlib import cbook
    from PIL import Image

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
        hopper = im.convert("RGB")
    return hopper, hopper.crop((120, 0, 400, 340))  # the crop ``sample_images`` pastes


@functools.lru_cache(maxsize=1)
def photos() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(scored, calibration)`` photos, name -> ``(H, W, 3)`` uint8."""
    from PIL import Image

    from lowbit.zoo.mtcnn import sample_images

    samples = sample_images()
    hopper, head = _hopper_head()
    w, h = hopper.size
    scored = {  # the first two are the held-out input batches (the first, 3 faces, is timed)
        "group": samples["group"],
        "grace_hopper": samples["grace_hopper"],
        "hopper_x0.75": np.asarray(hopper.resize((w * 3 // 4, h * 3 // 4), Image.BILINEAR)),
        "hopper_x0.5": np.asarray(hopper.resize((w // 2, h // 2), Image.BILINEAR)),
        "hopper_mirrored": np.ascontiguousarray(samples["grace_hopper"][:, ::-1]),
        "china": samples["china"],
        "flower": samples["flower"],
    }
    faces_on_flower = Image.fromarray(samples["flower"])
    for left, top, side in ((40, 60, 120), (330, 180, 90)):
        faces_on_flower.paste(head.resize((side, side * 340 // 280), Image.BILINEAR), (left, top))
    calibration = {
        "china": samples["china"],
        "flower": samples["flower"],
        "faces_on_flower": np.asarray(faces_on_flower),
    }
    return scored, calibration


def _tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(image))  # a writable copy (PIL arrays are read-only)


@functools.lru_cache(maxsize=1)
def float_faces() -> dict[str, torch.Tensor]:
    """Float MTCNN's boxes on each scored photo: the reference every copy is scored against."""
    from lowbit.zoo.mtcnn import MTCNN

    detector = MTCNN()
    return {name: detector.detect(image)[0] for name, image in photos()[0].items()}


def agreement(
    detect: Any, reference: dict[str, torch.Tensor], images: dict[str, np.ndarray]
) -> dict[str, float]:
    """``{"iou", "count_agreement"}`` of ``detect(image) -> (boxes, ...)`` against ``reference``
    boxes per image (see the module docstring).

    >>> ref = {"a": torch.tensor([[0.0, 0, 10, 10]]), "b": torch.zeros(0, 4)}
    >>> found = {"a": torch.tensor([[0.0, 0, 10, 5]]), "b": torch.tensor([[1.0, 1, 5, 5]])}
    >>> agreement(lambda im: (found[im],), ref, {"a": "a", "b": "b"})
    {'iou': 0.5, 'count_agreement': 0.5}
    """
    from lowbit.zoo.mtcnn import match_faces

    ious: list[float] = []
    same = 0
    for name, image in images.items():
        boxes = detect(image)[0]
        ious += match_faces(reference[name], boxes)
        same += len(boxes) == len(reference[name])
    return {"iou": float(np.mean(ious)) if ious else 1.0, "count_agreement": same / len(images)}


def _no_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    raise NotImplementedError("mtcnn is pretrained and has no training data or loss")


def mtcnn_task(quick: bool) -> DomainTask:
    """The ``mtcnn`` DomainTask. Raises ``ImportError`` (with the install line) when the
    facenet-pytorch weights are not installed."""
    from lowbit.zoo.mtcnn import MTCNN, weights_dir

    weights_dir()  # the clear ImportError first, before any photo is prepared
    scored, calibration = photos()
    reference = float_faces()

    def score(model: nn.Module) -> dict[str, float]:
        return agreement(model.detect, reference, scored)

    # forward(image) runs the whole cascade on one photo: its (N, 5) output has float's shape
    # only while the face count agrees, so output MSE is defined on these photos, not in general.
    inputs = [_tensor(image) for image in list(scored.values())[: 1 if quick else 2]]
    return DomainTask(
        domain="detection",
        name="mtcnn",
        model=MTCNN(),
        calibration=[_tensor(im) for im in calibration.values()],
        train_data=[],
        loss=_no_loss,
        score=score,
        metrics={"iou": True, "count_agreement": True},
        inputs=inputs,
        description="pretrained MTCNN face detector (P-, R-, O-Net; facenet-pytorch weights)",
        skip={"QAT 4-bit": NO_TRAINING, "pruned 50% + int8": NO_TRAINING},
        notes=[
            "mtcnn: agreement with float MTCNN's own faces (7 faces in 7 photos: Grace Hopper x4 "
            "sizes/mirror, a 3-face composite, 2 faceless photos); float scores 1.0 by construction"
        ],
    )
