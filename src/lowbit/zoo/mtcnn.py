"""``mtcnn``: the pretrained MTCNN face detector (P-Net, R-Net, O-Net) whose weights ship inside the
``facenet-pytorch`` wheel, with its detection cascade in plain torch (no torchvision).

facenet-pytorch itself cannot be imported beside lowbit's torch (it imports torchvision), so only
its weight files are read: ``pnet.pt`` / ``rnet.pt`` / ``onet.pt`` from the installed package's
``data`` folder (found without importing it, loaded with ``weights_only=True``). Install it without
its pinned dependencies: ``pip install --no-deps facenet-pytorch==2.6.0``.

Quantize the whole detector as any module: its three nets are submodules, and ``forward(image)``
runs the cascade, so calibration batches are simply images (each net sees the inputs the cascade
gives it: pyramid levels, 24x24 and 48x48 crops).

>>> import lowbit
>>> detector = MTCNN()  # doctest: +SKIP
>>> images = list(sample_images().values())  # doctest: +SKIP
>>> q = lowbit.quantize(detector, "int8-static", calibration=images)  # doctest: +SKIP
>>> boxes, probs = q.detect(images[2])  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.zoo import mtcnn_pipeline as P
from lowbit.zoo.base import ZooModel

PACKAGE = "facenet_pytorch"
MISSING_PACKAGE = (
    "the pretrained MTCNN needs the weights in the facenet-pytorch wheel: "
    "pip install --no-deps facenet-pytorch==2.6.0 (--no-deps: its pins would replace torch; "
    "lowbit reads only its weight files)"
)


def weights_dir() -> Path:
    """The ``data`` folder of the installed facenet-pytorch (located, not imported).

    >>> (weights_dir() / "pnet.pt").is_file()  # doctest: +SKIP
    True
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(MISSING_PACKAGE)
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    missing = [n for n in ("pnet.pt", "rnet.pt", "onet.pt") if not (folder / n).is_file()]
    if missing:
        raise ImportError(f"{MISSING_PACKAGE} (installed, but {', '.join(missing)} missing under {folder})")
    return folder


def _load(net: nn.Module, file: str, path: Path | None) -> nn.Module:
    path = path or weights_dir() / file
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.eval()


def _flatten_hw_transposed(x: torch.Tensor) -> torch.Tensor:
    # The weights come from Caffe via a port that flattened feature maps as (W, H, C): the dense
    # layer expects that order, so transpose before flattening.
    return x.permute(0, 3, 2, 1).flatten(1)


class PNet(nn.Module):
    """Proposal net: fully convolutional over any image size; per 12x12 window (stride 2) four box
    offsets and the (background, face) probabilities. Returns ``(offsets, probs)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)  # face / not-face logits
        self.conv4_2 = nn.Conv2d(32, 4, 1)  # box offsets

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)


class RNet(nn.Module):
    """Refine net on 24x24 crops: four box offsets and (background, face) probabilities."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = self.prelu4(self.dense4(_flatten_hw_transposed(x)))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)


class ONet(nn.Module):
    """Output net on 48x48 crops: box offsets, five landmarks (x1..x5, y1..y5 as fractions of the
    box) and (background, face) probabilities. Returns ``(offsets, landmarks, probs)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(_flatten_hw_transposed(x)))
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)


def image_tensor(image: Any) -> torch.Tensor:
    """An RGB image (PIL image, ``(H, W, 3)`` numpy array or tensor, values 0..255) as a
    ``(1, 3, H, W)`` float32 tensor.

    >>> image_tensor(np.zeros((4, 6, 3), dtype=np.uint8)).shape
    torch.Size([1, 3, 4, 6])
    """
    if not isinstance(image, (np.ndarray, torch.Tensor)):
        image = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    t = torch.from_numpy(np.array(image)) if isinstance(image, np.ndarray) else torch.as_tensor(image)
    if t.ndim != 3 or t.shape[-1] != 3:
        raise ValueError(f"MTCNN takes one RGB image of shape (H, W, 3), got shape {tuple(t.shape)}")
    return t.permute(2, 0, 1).unsqueeze(0).float()


class MTCNN(nn.Module):
    """The three-stage face detector. ``detect(image)`` gives ``(boxes (N, 4), probs (N,))``, best
    first; ``forward(image)`` the same as one ``(N, 5)`` tensor (boxes, then probability).

    ``min_face``: smallest face searched for, in pixels; ``thresholds``: face probability each stage
    needs; ``factor``: pyramid step. Defaults are the reference's. ``pretrained=False`` leaves the
    nets randomly initialised (no package needed); ``weights``: a folder holding the three files.
    """

    def __init__(
        self,
        min_face: float = 20.0,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        factor: float = 0.709,
        pretrained: bool = True,
        weights: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.min_face, self.thresholds, self.factor = min_face, tuple(thresholds), factor
        folder = Path(weights) if weights is not None else None
        nets = [(PNet(), "pnet.pt"), (RNet(), "rnet.pt"), (ONet(), "onet.pt")]
        if pretrained:
            nets = [(_load(net, f, folder / f if folder else None), f) for net, f in nets]
        self.pnet, self.rnet, self.onet = (net.eval() for net, _ in nets)
        self.eval()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        boxes, probs, _ = self.detect(image, landmarks=True)
        return torch.cat([boxes, probs.unsqueeze(1)], dim=1)

    @torch.no_grad()
    def detect(self, image: Any, landmarks: bool = False) -> tuple[torch.Tensor, ...]:
        """Faces in one RGB image: ``boxes`` ``(N, 4)`` (``x1, y1, x2, y2`` pixels) and ``probs``
        ``(N,)``, most probable first; with ``landmarks``, also ``(N, 5, 2)`` points (eyes, nose,
        mouth corners)."""
        param = next(self.pnet.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        img = image_tensor(image).to(device)
        height, width = img.shape[2:]
        boxes, scores = self._propose(img)
        boxes, scores = self._refine(img, boxes, width, height)
        boxes, scores, points = self._output(img, boxes, width, height)
        order = scores.argsort(descending=True, stable=True)
        out = (boxes[order].cpu(), scores[order].cpu())
        return out + (points[order].cpu(),) if landmarks else out

    def _propose(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = img.shape[2:]
        found = []
        for scale in P.scales(height, width, self.min_face, self.factor):
            level = P.normalize(P.resample(img, P.pyramid_size(height, width, scale)))
            reg, prob = self.pnet(level)
            rows = P.proposals(reg.float(), prob[:, 1].float(), scale, self.thresholds[0])
            found.append(rows[P.nms(rows[:, :4], rows[:, 4], 0.5)])
        rows = torch.cat(found) if found else img.new_zeros(0, 9)
        rows = rows[P.nms(rows[:, :4], rows[:, 4], 0.7)]
        boxes = P.square(P.regress(rows[:, :4], rows[:, 5:], plus_one=False))
        return boxes, rows[:, 4]

    def _stage(
        self, net: nn.Module, img: torch.Tensor, boxes: torch.Tensor, size: int, width: int, height: int
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        windows, ok = P.crop_windows(boxes, width, height)
        boxes = boxes[ok]
        outputs = net(P.crops(img, windows[ok], size)) if len(boxes) else ()
        return boxes, tuple(o.float() for o in outputs)

    def _refine(
        self, img: torch.Tensor, boxes: torch.Tensor, width: int, height: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        boxes, out = self._stage(self.rnet, img, boxes, 24, width, height)
        if not len(boxes):
            return boxes, boxes.new_zeros(0)
        offsets, probs = out
        keep = probs[:, 1] > self.thresholds[1]
        boxes, scores, offsets = boxes[keep], probs[keep, 1], offsets[keep]
        pick = P.nms(boxes, scores, 0.7)
        return P.square(P.regress(boxes[pick], offsets[pick])), scores[pick]

    def _output(
        self, img: torch.Tensor, boxes: torch.Tensor, width: int, height: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        boxes, out = self._stage(self.onet, img, boxes, 48, width, height)
        if not len(boxes):
            return boxes, boxes.new_zeros(0), boxes.new_zeros(0, 5, 2)
        offsets, marks, probs = out
        keep = probs[:, 1] > self.thresholds[2]
        boxes, scores, offsets, marks = boxes[keep], probs[keep, 1], offsets[keep], marks[keep]
        # Landmarks are fractions of the (un-regressed) box, with the reference's +1 / -1 pixel shift.
        w = (boxes[:, 2] - boxes[:, 0] + 1).unsqueeze(1)
        h = (boxes[:, 3] - boxes[:, 1] + 1).unsqueeze(1)
        xs = w * marks[:, :5] + boxes[:, :1] - 1
        ys = h * marks[:, 5:] + boxes[:, 1:2] - 1
        points = torch.stack([xs, ys], dim=2)
        boxes = P.regress(boxes, offsets)
        pick = P.nms(boxes, scores, 0.7, mode="min")
        return boxes[pick], scores[pick], points[pick]


def calibration_inputs(detector: MTCNN, images: list[Any]) -> dict[str, list[torch.Tensor]]:
    """The inputs each net receives while ``detector`` runs on ``images``: ``{"pnet": [pyramid
    levels ...], "rnet": [24x24 crop batches ...], "onet": [48x48 crop batches ...]}``, for
    quantizing one net on its own (``lowbit.quantize(detector.rnet, ..., calibration=c["rnet"])``).

    >>> c = calibration_inputs(MTCNN(), [np.zeros((64, 64, 3), np.uint8)])  # doctest: +SKIP
    """
    seen: dict[str, list[torch.Tensor]] = {"pnet": [], "rnet": [], "onet": []}
    handles = [
        getattr(detector, name).register_forward_pre_hook(
            lambda _m, args, name=name: seen[name].append(args[0].detach().clone())
        )
        for name in seen
    ]
    try:
        for image in images:
            detector.detect(image)
    finally:
        for h in handles:
            h.remove()
    return seen


def sample_images() -> dict[str, np.ndarray]:
    """Offline test photos, ``(H, W, 3)`` uint8: scikit-learn's two sample photos (``china``, a
    temple, and ``flower``: no faces), matplotlib's ``grace_hopper`` portrait (one face), and
    ``group``: that face pasted three times, at different sizes, onto the temple photo.

    >>> sorted(sample_images())  # doctest: +SKIP
    ['china', 'flower', 'grace_hopper', 'group']
    """
    from matplotlib import cbook
    from PIL import Image
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
        hopper = im.convert("RGB")
    head = hopper.crop((120, 0, 400, 340))  # the head with some shoulder and background
    group = Image.fromarray(china)
    # Sizes and places where float's own boxes stay put under +-1 grey-level noise (IoU >= 0.97).
    for left, top, side in ((20, 150, 60), (250, 40, 160), (440, 200, 80)):
        group.paste(head.resize((side, side * 340 // 280), Image.BILINEAR), (left, top))
    return {"china": china, "flower": flower, "grace_hopper": np.asarray(hopper), "group": np.asarray(group)}


def get_mtcnn() -> ZooModel:
    """The pretrained MTCNN; calibration: the sample photos (see :func:`sample_images`), one image
    per batch (``model(image)`` runs the whole cascade). No labelled data: ``metric`` is ``None``.

    >>> get_mtcnn().calibration[0].shape  # doctest: +SKIP
    torch.Size([427, 640, 3])
    """
    images = [torch.from_numpy(np.ascontiguousarray(im)) for im in sample_images().values()]
    return ZooModel(
        name="mtcnn",
        model=MTCNN(),
        calibration=images,
        example_inputs=(images[0],),
        description="pretrained MTCNN face detector (P-, R-, O-Net) from the facenet-pytorch wheel",
    )


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise intersection over union of ``(N, 4)`` and ``(M, 4)`` boxes: ``(N, M)``.

    >>> box_iou(torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([[1.0, 0, 3, 2]])).tolist()
    [[0.3333333432674408]]
    """
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(2)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def match_faces(reference: torch.Tensor, boxes: torch.Tensor) -> list[float]:
    """For each reference box, the IoU of the best-overlapping box in ``boxes`` (greedy, each box
    used once; 0.0 where none is left): how well a quantized detector reproduces float's faces.

    >>> match_faces(torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([[0.0, 0, 2, 2]]))
    [1.0]
    """
    if not len(reference):
        return []
    if not len(boxes):
        return [0.0] * len(reference)
    iou = box_iou(reference, boxes)
    out = []
    for row in iou:
        j = int(row.argmax())
        out.append(max(0.0, float(row[j])))
        iou[:, j] = -1.0  # used
    return out
