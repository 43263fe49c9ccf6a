"""The MTCNN cascade's box arithmetic, in plain torch: image pyramid, P-Net proposals, greedy NMS,
square boxes, crops and box regression (Zhang et al. 2016, as facenet-pytorch runs it).

Boxes are ``(N, 4)`` float tensors ``x1, y1, x2, y2`` in pixels of the original image. The
conventions (``+ 1`` widths in some steps, not in others; NMS by union or by the smaller box) follow
the reference implementation the pretrained weights were tuned with, so the same thresholds apply.

>>> import torch
>>> boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]])
>>> nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist()
[0, 2]
>>> [round(s, 4) for s in scales(100, 100, min_face=20, factor=0.709)[:2]]
[0.6, 0.4254]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

STRIDE = 2  # P-Net's output grid step in pyramid pixels (one 2x2 max pool)
CELL = 12  # P-Net's receptive field: a 12x12 window per output cell
NORM_SHIFT, NORM_SCALE = 127.5, 0.0078125  # pixels 0..255 -> about -1..1, as the nets were trained


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """Pixel values 0..255 to the nets' input range (about -1..1)."""
    return (pixels - NORM_SHIFT) * NORM_SCALE


def scales(height: int, width: int, min_face: float, factor: float) -> list[float]:
    """Pyramid scales: the first maps a ``min_face`` face to P-Net's 12 pixels, each next one is
    ``factor`` times smaller, until the short side would fall below 12 pixels."""
    scale = CELL / min_face
    short = min(height, width) * scale
    out = []
    while short >= CELL:
        out.append(scale)
        scale *= factor
        short *= factor
    return out


def resample(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area (box-filter) resize of ``(N, 3, H, W)`` images, as the reference does."""
    return F.interpolate(images, size=size, mode="area")


def pyramid_size(height: int, width: int, scale: float) -> tuple[int, int]:
    # The reference rounds up with ``int(x + 1)``, so a scaled side is never short of a pixel.
    return int(height * scale + 1), int(width * scale + 1)


def proposals(reg: torch.Tensor, prob: torch.Tensor, scale: float, threshold: float) -> torch.Tensor:
    """P-Net's cells whose face probability reaches ``threshold``, as ``(N, 9)`` rows: the cell's
    window in image pixels (4), its score, and P-Net's 4 box offsets. ``reg``: ``(1, 4, h, w)``,
    ``prob``: ``(1, h, w)`` (the face channel)."""
    mask = prob[0] >= threshold
    rows, cols = mask.nonzero(as_tuple=True)
    cell = torch.stack([cols, rows], dim=1).to(reg.dtype)
    top_left = ((STRIDE * cell + 1) / scale).floor()
    bottom_right = ((STRIDE * cell + CELL) / scale).floor()
    offsets = reg[0][:, rows, cols].T
    return torch.cat([top_left, bottom_right, prob[0][rows, cols].unsqueeze(1), offsets], dim=1)


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, mode: str = "union") -> torch.Tensor:
    """Greedy non-maximum suppression: indices of the boxes kept, best score first.

    A box is dropped when its overlap with a kept, better box exceeds ``threshold``. ``mode``
    ``"union"``: intersection over union with areas ``w * h`` (torchvision's ``nms``); ``"min"``:
    intersection over the smaller box with ``(w + 1) * (h + 1)`` areas (the reference's final step,
    which removes a small box sitting inside a larger one).
    """
    if mode not in ("union", "min"):
        raise ValueError(f"nms mode must be 'union' or 'min', got {mode!r}")
    one = 1.0 if mode == "min" else 0.0
    x1, y1, x2, y2 = boxes.unbind(1)
    area = (x2 - x1 + one) * (y2 - y1 + one)
    order = scores.argsort(descending=True, stable=True)
    keep = []
    while order.numel():
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest]) + one).clamp(min=0)
        h = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest]) + one).clamp(min=0)
        inter = w * h
        if mode == "min":
            overlap = inter / torch.minimum(area[i], area[rest])
        else:
            overlap = inter / (area[i] + area[rest] - inter)
        order = rest[overlap <= threshold]
    return torch.tensor(keep, dtype=torch.long)


def square(boxes: torch.Tensor) -> torch.Tensor:
    """Each box grown to a square on its longer side, about the same centre (the next net's crop)."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(w, h)
    x1 = boxes[:, 0] + (w - side) * 0.5
    y1 = boxes[:, 1] + (h - side) * 0.5
    return torch.stack([x1, y1, x1 + side, y1 + side], dim=1)


def regress(boxes: torch.Tensor, offsets: torch.Tensor, plus_one: bool = True) -> torch.Tensor:
    """Move each box edge by its offset times the box size (R-Net / O-Net use ``w + 1``, P-Net ``w``)."""
    one = 1.0 if plus_one else 0.0
    w = boxes[:, 2] - boxes[:, 0] + one
    h = boxes[:, 3] - boxes[:, 1] + one
    return boxes[:, :4] + offsets * torch.stack([w, h, w, h], dim=1)


def crop_windows(boxes: torch.Tensor, width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer crop windows ``(x0, y0, x1, y1)`` (slices ``[y0:y1, x0:x1]``) clipped to the image,
    and a mask of the boxes whose window is not empty (the others cannot be cropped)."""
    b = boxes.trunc().long()
    x0 = b[:, 0].clamp(min=1) - 1  # the reference clips to 1 and slices from x - 1
    y0 = b[:, 1].clamp(min=1) - 1
    x1 = b[:, 2].clamp(max=width)
    y1 = b[:, 3].clamp(max=height)
    windows = torch.stack([x0, y0, x1, y1], dim=1)
    return windows, (x1 > x0) & (y1 > y0)


def crops(image: torch.Tensor, windows: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, 3, size, size)`` normalized crops of ``image`` (``(1, 3, H, W)``, pixels 0..255)."""
    if not len(windows):
        return image.new_zeros(0, 3, size, size)
    parts = [resample(image[:, :, y0:y1, x0:x1], (size, size)) for x0, y0, x1, y1 in windows.tolist()]
    return normalize(torch.cat(parts))
