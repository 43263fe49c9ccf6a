"""The detection domain: procedural scenes, box arithmetic, mAP scoring, the two detectors' shapes
and losses (untrained: nothing is trained here), and the MTCNN task (skips without its weights)."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

from lowbit.domains.detection_data import (
    CLASSES,
    SIZE,
    batched_nms,
    decode,
    encode,
    make_scenes,
    mean_average_precision,
    nms,
    to_input,
)
from lowbit.domains.detection_models import (
    NUM_CLASSES,
    FasterRCNNLite,
    SSDLite,
    rcnn_detections,
    ssd_detections,
)
from lowbit.zoo.mtcnn import box_iou


@pytest.fixture(scope="module")
def scenes():
    return make_scenes(8, seed=0)


def test_scenes_are_valid_and_deterministic(scenes):
    images, targets = scenes
    assert images.shape == (8, 3, SIZE, SIZE) and images.dtype == torch.uint8
    for t in targets:
        boxes, labels = t["boxes"], t["labels"]
        assert 1 <= len(boxes) <= 4 and len(labels) == len(boxes)
        assert bool((boxes >= 0).all() and (boxes <= SIZE).all())
        assert bool((boxes[:, 2:] > boxes[:, :2]).all())
        assert bool(((labels >= 0) & (labels < len(CLASSES))).all())
    again, targets_again = make_scenes(8, seed=0)
    assert torch.equal(images, again)
    assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(targets, targets_again, strict=True))
    assert not torch.equal(images, make_scenes(8, seed=1)[0])
    # A seed's first scenes do not depend on how many are drawn (calibration reads a prefix).
    assert torch.equal(make_scenes(3, seed=0)[0], images[:3])


def test_objects_are_drawn_where_their_boxes_say(scenes):
    images, targets = scenes
    x = to_input(images)
    for image, t in zip(x, targets, strict=True):
        # The last object drawn is never covered: its centre pixel differs from the background
        # just outside its box on at least one side (the colour is chosen to stand out).
        x1, y1, x2, y2 = t["boxes"][-1].tolist()
        cx, cy = int((x1 + x2) / 2), int((y1 + y2) / 2)
        inside = image[:, cy, cx]
        outside = [image[:, cy, int(x)] for x in (x1 - 2, x2 + 2) if 0 <= x < SIZE]
        outside += [image[:, int(y), cx] for y in (y1 - 2, y2 + 2) if 0 <= y < SIZE]
        assert max(float((inside - o).abs().sum()) for o in outside) > 0.3


def test_encode_decode_round_trip():
    anchors = torch.tensor([[0.0, 0, 10, 10], [20, 20, 44, 44]])
    boxes = torch.tensor([[1.0, 2, 9, 13], [18, 25, 40, 50]])
    torch.testing.assert_close(decode(encode(boxes, anchors), anchors), boxes, rtol=0, atol=1e-4)


def test_nms_keeps_the_best_of_each_overlapping_group():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [30, 30, 40, 40], [31, 31, 41, 41]])
    scores = torch.tensor([0.5, 0.9, 0.8, 0.1])
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert nms(boxes, scores, 0.99).tolist() == [1, 2, 0, 3]
    labels = torch.tensor([0, 1, 0, 0])  # different classes never suppress each other
    assert sorted(batched_nms(boxes, scores, labels, 0.5).tolist()) == [0, 1, 2]


def _perfect(targets):
    return [{**t, "scores": torch.ones(len(t["labels"]))} for t in targets]


def test_map_is_one_for_perfect_predictions_and_falls_with_shifted_boxes(scenes):
    pytest.importorskip("pycocotools")
    _, targets = scenes
    perfect = mean_average_precision(_perfect(targets), targets)
    assert perfect == pytest.approx({"map50": 1.0, "map": 1.0})
    shifted = [{**p, "boxes": p["boxes"] + 3.0} for p in _perfect(targets)]
    worse = mean_average_precision(shifted, targets)
    assert worse["map"] < 0.9 and worse["map"] <= worse["map50"]
    wrong_class = [{**p, "labels": (p["labels"] + 1) % NUM_CLASSES} for p in _perfect(targets)]
    assert mean_average_precision(wrong_class, targets)["map50"] == 0.0


def test_detectors_forward_shapes_and_loss(scenes):
    images, targets = scenes
    x = to_input(images[:4])
    torch.manual_seed(0)
    for model, width in ((SSDLite(), 1 + NUM_CLASSES + 4), (FasterRCNNLite(), 4 + 1 + NUM_CLASSES + 4)):
        out = model.eval()(x)
        assert out.shape[0] == 4 and out.shape[2] == width
        loss = model.train().loss(x, targets[:4])
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
    assert SSDLite()(x).shape[1] == len(SSDLite().anchors)
    assert FasterRCNNLite(proposals=5).eval()(x).shape[1] == 5


def test_ssd_decoding_recovers_encoded_boxes(scenes):
    pytest.importorskip("pycocotools")
    _, targets = scenes
    anchors = SSDLite().anchors
    # A raw head output that puts each object on its best anchor with a confident class logit.
    out = torch.zeros(len(targets), len(anchors), 1 + NUM_CLASSES + 4)
    out[..., 0] = 10.0  # background everywhere else
    for i, t in enumerate(targets):
        best = box_iou(anchors, t["boxes"]).argmax(0)
        out[i, best, 0] = 0.0
        out[i, best, 1 + t["labels"]] = 10.0
        out[i, best, 1 + NUM_CLASSES :] = encode(t["boxes"], anchors[best])
    assert mean_average_precision(ssd_detections(out, anchors), targets)["map"] > 0.99


def test_rcnn_decoding_refines_proposals(scenes):
    pytest.importorskip("pycocotools")
    _, targets = scenes
    k = 5  # proposals per image: every object 2 px off, the rest a background box
    out = torch.zeros(len(targets), k, 4 + 1 + NUM_CLASSES + 4)
    for i, t in enumerate(targets):
        n = len(t["boxes"])
        rois = torch.tensor([[0.0, 0, 8, 8]]).repeat(k, 1)
        rois[:n] = t["boxes"] + 2.0
        out[i, :, :4] = rois
        out[i, n:, 4] = 10.0
        out[i, torch.arange(n), 5 + t["labels"]] = 10.0
        out[i, :n, 5 + NUM_CLASSES :] = encode(t["boxes"], rois[:n])
    assert mean_average_precision(rcnn_detections(out), targets)["map"] > 0.99
    out[..., 5 + NUM_CLASSES :] = 0.0  # unrefined: the proposals as they are, 2 px off
    assert mean_average_precision(rcnn_detections(out), targets)["map"] < 0.9


@pytest.mark.usefixtures("reference_kernels", "one_thread")
@pytest.mark.parametrize("factory", [SSDLite, FasterRCNNLite])
def test_int8_static_folds_every_batchnorm(scenes, factory):
    import lowbit

    torch.manual_seed(0)
    model = factory().eval()
    x = to_input(scenes[0][:4])
    bns = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an untrained model: its fidelity warnings mean nothing
        q = lowbit.quantize(model, "int8-static", calibration=[x], progress=False)
    assert len(q.lowbit_folded) == bns
    assert q(x).shape == model(x).shape


def test_builders_are_listed():
    from lowbit.domains import builders

    assert sorted(builders("detection")) == ["faster-rcnn-lite", "mtcnn", "ssd-lite"]


def test_mtcnn_task_names_the_missing_package(monkeypatch):
    import lowbit.zoo.mtcnn as zoo_mtcnn
    from lowbit.domains.detection_faces import mtcnn_task

    monkeypatch.setattr(zoo_mtcnn, "PACKAGE", "no_such_package_for_lowbit")
    with pytest.raises(ImportError, match="facenet-pytorch"):
        mtcnn_task(quick=True)


@pytest.mark.skipif(
    importlib.util.find_spec("facenet_pytorch") is None,
    reason="needs facenet-pytorch (pip install --no-deps facenet-pytorch==2.6.0)",
)
def test_mtcnn_task_scores_float_as_perfect(monkeypatch):
    import lowbit.domains.detection_faces as faces
    from lowbit.domains.detection import BUILDERS

    scored, calibration = faces.photos()
    # Two of the seven photos keep the test short: one face, and none.
    small = {n: scored[n] for n in ("hopper_x0.5", "flower")}
    monkeypatch.setattr(faces, "photos", lambda: (small, calibration))
    faces.float_faces.cache_clear()
    try:
        task = BUILDERS["mtcnn"](True)
        assert task.domain == "detection" and task.primary == "iou"
        assert [len(b) for b in faces.float_faces().values()] == [1, 0]
        assert task.score(task.model) == {"iou": 1.0, "count_agreement": 1.0}
    finally:
        faces.float_faces.cache_clear()  # the next caller sees every photo again
    assert list(task.train_data) == [] and {"QAT 4-bit", "pruned 50% + int8"} <= set(task.skip)
    with pytest.raises(NotImplementedError):
        task.loss(task.model, None)
