"""The two trained detectors of the detection domain, plain Conv2d / Linear / BatchNorm modules so
every lowbit technique applies:

* :class:`SSDLite`: single stage. A depthwise-separable backbone, and on its stride-8 and
  stride-16 maps a head that predicts, per anchor, class logits (background first) and box
  deltas. ``forward`` returns the raw head, ``(B, anchors, 1 + classes + 4)``.
* :class:`FasterRCNNLite`: two stages. A region proposal network, greedy NMS, then RoI Align
  (bilinear sampling with ``grid_sample``) and a two-layer head that classifies each proposal and
  refines its box; both on a stride-4 map with the stride-8 map's context upsampled into it.
  ``forward`` returns ``(B, proposals, 4 + 1 + classes + 4)``: each proposal's box, then the
  head's raw outputs.

Decoding and the final NMS happen outside ``forward`` (:func:`ssd_detections`,
:func:`rcnn_detections`), so quantization and output MSE see the network's own tensors.

>>> import torch
>>> SSDLite()(torch.rand(2, 3, 64, 64)).shape
torch.Size([2, 656, 8])
>>> FasterRCNNLite()(torch.rand(2, 3, 64, 64)).shape
torch.Size([2, 16, 12])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.domains.detection_data import CLASSES, SIZE, Target, anchor_grid, decode, detections, encode, nms
from lowbit.zoo.mtcnn import box_iou

NUM_CLASSES = len(CLASSES)


def conv_bn(cin: int, cout: int, stride: int = 1, kernel: int = 3, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def separable(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """MobileNet's block: a depthwise 3x3 (spatial) then a pointwise 1x1 (channels)."""
    return nn.Sequential(conv_bn(cin, cin, stride, groups=cin), conv_bn(cin, cout, kernel=1))


class Backbone(nn.Module):
    """64x64 images -> feature maps at strides 4 and 8 (48 and 64 channels), and 16 (96) when
    ``deep`` (a layer no caller uses would have no calibration data)."""

    def __init__(self, deep: bool = True) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 16, 2), separable(16, 32))
        self.stage4 = nn.Sequential(separable(32, 48, 2), separable(48, 48))
        self.stage8 = nn.Sequential(separable(48, 64, 2), separable(64, 64))
        self.stage16 = nn.Sequential(separable(64, 96, 2), separable(96, 96)) if deep else None

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        # Centre the 0..1 pixels: the first conv then sees zero-mean input.
        maps = [self.stage4(self.stem(images - 0.5))]
        maps.append(self.stage8(maps[0]))
        if self.stage16 is not None:
            maps.append(self.stage16(maps[1]))
        return maps


def _flatten_head(x: torch.Tensor, per_anchor: int) -> torch.Tensor:
    # (B, A * k, h, w) -> (B, h * w * A, k): cell-major, the order of ``anchor_grid``.
    b, _, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, h * w * (x.shape[1] // per_anchor), per_anchor)


def smooth_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.smooth_l1_loss(pred, target, beta=1.0 / 9, reduction="sum")


def match(
    anchors: torch.Tensor, boxes: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each anchor's best ground-truth index, that IoU, and whether the anchor is a positive
    (IoU >= ``threshold``, or the best anchor of some box, so every object has at least one).

    >>> anchors = torch.tensor([[0.0, 0, 4, 4], [8, 8, 12, 12]])
    >>> index, iou, pos = match(anchors, torch.tensor([[0.0, 0, 4, 5]]), 0.5)
    >>> index.tolist(), pos.tolist()
    ([0, 0], [True, False])
    """
    if not len(boxes):
        zeros = torch.zeros(len(anchors))
        return zeros.long(), zeros, zeros.bool()
    iou = box_iou(anchors, boxes)
    best, index = iou.max(dim=1)
    positive = best >= threshold
    forced = iou.argmax(dim=0)
    index[forced] = torch.arange(len(boxes))
    positive[forced] = True
    return index, best, positive


class SSDLite(nn.Module):
    """Single-stage detector (see the module docstring); anchors are ``self.anchors``."""

    # stride, anchor sides: a ratio of about 1.3 from one to the next covers the 10-26 px objects.
    LEVELS = ((4, (10.0, 13.0)), (8, (17.0, 22.0)), (16, (28.0,)))

    def __init__(self) -> None:
        super().__init__()
        self.backbone = Backbone()
        per = 1 + NUM_CLASSES + 4
        self.heads = nn.ModuleList(
            nn.Sequential(conv_bn(c, c, groups=c), nn.Conv2d(c, len(sides) * per, 1))
            for c, (_, sides) in zip((48, 64, 96), self.LEVELS, strict=True)
        )
        self.register_buffer("anchors", torch.cat([anchor_grid(SIZE, s, a) for s, a in self.LEVELS]), False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.backbone(images)
        per = 1 + NUM_CLASSES + 4
        return torch.cat([_flatten_head(h(f), per) for h, f in zip(self.heads, maps, strict=True)], 1)

    def loss(self, images: torch.Tensor, targets: list[Target]) -> torch.Tensor:
        """SSD's loss: cross entropy with 3:1 hard negative mining, smooth L1 on the positives'
        deltas, both per positive anchor."""
        out = self(images)
        logits, deltas = out[..., : 1 + NUM_CLASSES], out[..., 1 + NUM_CLASSES :]
        labels, box_targets, positives = [], [], []
        for t in targets:
            index, _, pos = match(self.anchors, t["boxes"], 0.5)
            gt = t["boxes"][index] if len(t["boxes"]) else self.anchors
            lab = torch.where(pos, t["labels"][index] + 1 if len(t["labels"]) else 0, 0)
            labels.append(lab)
            box_targets.append(encode(gt, self.anchors))
            positives.append(pos)
        labels_t, pos_t = torch.stack(labels), torch.stack(positives)
        ce = F.cross_entropy(logits.flatten(0, 1), labels_t.flatten(), reduction="none").view_as(labels_t)
        n_pos = pos_t.sum(dim=1, keepdim=True)
        # Hard negatives: per image the 3 * n_pos background anchors with the largest loss.
        neg_loss = ce.detach().masked_fill(pos_t, -1.0)
        rank = neg_loss.argsort(dim=1, descending=True).argsort(dim=1)
        hard = rank < (3 * n_pos).clamp(min=8)
        cls = ce[pos_t | hard].sum()
        reg = smooth_l1(deltas[pos_t], torch.stack(box_targets)[pos_t])
        return (cls + reg) / n_pos.sum().clamp(min=1)


def ssd_detections(out: torch.Tensor, anchors: torch.Tensor) -> list[Target]:
    """Per-image detections from :class:`SSDLite`'s raw output."""
    probs = out[..., : 1 + NUM_CLASSES].float().softmax(-1)[..., 1:]
    boxes = decode(out[..., 1 + NUM_CLASSES :].float(), anchors)
    return [detections(b, p) for b, p in zip(boxes, probs, strict=True)]


def roi_align(features: torch.Tensor, rois: torch.Tensor, size: int, image_size: int) -> torch.Tensor:
    """RoI Align without torchvision: ``size x size`` bilinear samples at the bin centres of each
    RoI. ``features`` ``(B, C, h, w)`` covers the ``image_size`` image; ``rois`` ``(B, K, 4)``
    pixel boxes. Returns ``(B * K, C * size * size)``."""
    b, k = rois.shape[:2]
    steps = (torch.arange(size, dtype=rois.dtype, device=rois.device) + 0.5) / size
    x = rois[..., 0:1] + steps * (rois[..., 2:3] - rois[..., 0:1])  # (B, K, size)
    y = rois[..., 1:2] + steps * (rois[..., 3:4] - rois[..., 1:2])
    gx = x.unsqueeze(2).expand(b, k, size, size)
    gy = y.unsqueeze(3).expand(b, k, size, size)
    # grid_sample's -1..1 spans the feature map's outer pixel edges, i.e. the whole image.
    grid = torch.stack([gx, gy], dim=-1).reshape(b, k * size, size, 2) * (2.0 / image_size) - 1.0
    sampled = F.grid_sample(features, grid, mode="bilinear", align_corners=False)  # (B, C, K*size, size)
    c = features.shape[1]
    return sampled.view(b, c, k, size, size).permute(0, 2, 1, 3, 4).reshape(b * k, c * size * size)


class FasterRCNNLite(nn.Module):
    """Two-stage detector (see the module docstring). ``proposals`` RoIs per image at inference,
    ``train_proposals`` while training (plus jittered copies of the ground truth)."""

    SIDES = (10.0, 15.0, 22.0)  # RPN anchors on the stride-4 map (objects: 10-26 px)
    POOL = 4

    def __init__(self, proposals: int = 16, train_proposals: int = 16) -> None:
        super().__init__()
        self.proposals, self.train_proposals = proposals, train_proposals
        self.backbone = Backbone(deep=False)
        a = len(self.SIDES)
        self.lateral = conv_bn(48 + 64, 64, kernel=1)  # stride-4 map with the upsampled stride-8 one
        self.rpn = nn.Sequential(separable(64, 64), nn.Conv2d(64, a * 5, 1))  # objectness + 4 deltas
        self.head = nn.Sequential(
            nn.Linear(64 * self.POOL**2, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, 128),
            nn.ReLU(inplace=True),
        )
        self.classify = nn.Linear(128, 1 + NUM_CLASSES)
        self.refine = nn.Linear(128, 4)
        self.register_buffer("anchors", anchor_grid(SIZE, 4, self.SIDES), False)

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rpn output (B, anchors, 5), RoI feature map (B, 64, 16, 16))``: both on the stride-4
        map, with the stride-8 map's wider context upsampled into it."""
        c4, c8 = self.backbone(images)
        up = F.interpolate(c8, size=c4.shape[2:], mode="nearest")
        fmap = self.lateral(torch.cat([c4, up], 1))
        return _flatten_head(self.rpn(fmap), 5), fmap

    @torch.no_grad()
    def propose(self, rpn: torch.Tensor, count: int) -> torch.Tensor:
        """The ``count`` best proposals per image after NMS, ``(B, count, 4)`` (padded with the
        last one when fewer survive, so the output shape is fixed)."""
        boxes = decode(rpn[..., 1:].float(), self.anchors).clamp(0, SIZE)
        out = []
        for b, s in zip(boxes, rpn[..., 0].float(), strict=True):
            top = s.argsort(descending=True)[: 4 * count]
            keep = top[nms(b[top], s[top], 0.6)][:count]
            keep = torch.cat([keep, keep[-1:].expand(count - len(keep))])
            out.append(b[keep])
        return torch.stack(out)

    def roi_head(self, fmap: torch.Tensor, rois: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.head(roi_align(fmap, rois, self.POOL, SIZE))
        b, k = rois.shape[:2]
        return self.classify(x).view(b, k, -1), self.refine(x).view(b, k, 4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        rpn, fmap = self.features(images)
        rois = self.propose(rpn, self.proposals)
        logits, deltas = self.roi_head(fmap, rois)
        return torch.cat([rois, logits, deltas], dim=-1)

    def loss(self, images: torch.Tensor, targets: list[Target]) -> torch.Tensor:
        """RPN loss (binary objectness on 64 sampled anchors per image, smooth L1 on positives)
        plus the RoI head's (cross entropy on every RoI, smooth L1 on those matching an object)."""
        rpn, fmap = self.features(images)
        obj_l, obj_t, reg_p, reg_t = [], [], [], []
        for r, t in zip(rpn, targets, strict=True):
            index, iou, pos = match(self.anchors, t["boxes"], 0.5)
            # 64 anchors per image, at most half of them positives; IoU 0.3-0.5 is ignored.
            negatives = ((iou < 0.3) & ~pos).nonzero().flatten()
            negatives = negatives[torch.randperm(len(negatives))[: 64 - min(int(pos.sum()), 32)]]
            chosen = torch.cat([pos.nonzero().flatten(), negatives])
            obj_l.append(r[chosen, 0])
            obj_t.append(pos[chosen].float())
            if len(t["boxes"]):
                reg_p.append(r[pos, 1:])
                reg_t.append(encode(t["boxes"][index[pos]], self.anchors[pos]))
        n = max(sum(len(p) for p in reg_p), 1)
        rpn_loss = F.binary_cross_entropy_with_logits(torch.cat(obj_l), torch.cat(obj_t))
        rpn_loss = rpn_loss + smooth_l1(torch.cat(reg_p), torch.cat(reg_t)) / n if reg_p else rpn_loss
        # The RoI head learns on the RPN's proposals plus the ground truth and jittered copies,
        # so it has positives from the first step, when the proposals are still random.
        proposals = self.propose(rpn, self.train_proposals)
        count = self.train_proposals + 12  # proposals, up to 4 objects and 8 jittered copies
        rois, labels, box_t = [], [], []
        for p, t in zip(proposals, targets, strict=True):
            gt = t["boxes"]
            spread = 0.1 * (gt[:, 2:] - gt[:, :2]).repeat(2, 2)
            jitter = (gt.repeat(2, 1) + torch.randn(2 * len(gt), 4) * spread).clamp(0, SIZE)
            r = torch.cat([p, gt, jitter])
            r = torch.cat([r, p[: count - len(r)]])  # one RoI count per image
            if len(gt):
                # No forced matches here: a RoI that misses every object is background.
                best, index = box_iou(r, gt).max(1)
                pos = best >= 0.5
                labels.append(torch.where(pos, t["labels"][index] + 1, 0))
                box_t.append(encode(gt[index], r))
            else:
                labels.append(torch.zeros(len(r), dtype=torch.long))
                box_t.append(torch.zeros(len(r), 4))
            rois.append(r)
        logits, deltas = self.roi_head(fmap, torch.stack(rois))
        labels_t, box_tt = torch.stack(labels), torch.stack(box_t)
        fg = labels_t > 0
        head_loss = F.cross_entropy(logits.flatten(0, 1), labels_t.flatten())
        head_loss = head_loss + smooth_l1(deltas[fg], box_tt[fg]) / max(int(fg.sum()), 1)
        return rpn_loss + head_loss


def rcnn_detections(out: torch.Tensor) -> list[Target]:
    """Per-image detections from :class:`FasterRCNNLite`'s raw output."""
    out = out.float()
    rois, logits, deltas = out[..., :4], out[..., 4 : 5 + NUM_CLASSES], out[..., 5 + NUM_CLASSES :]
    boxes = decode(deltas, rois)
    probs = logits.softmax(-1)[..., 1:]
    return [detections(b, p) for b, p in zip(boxes, probs, strict=True)]
