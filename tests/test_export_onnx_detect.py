"""ONNX export of detectors (a list of images in, a list of dicts out), integer convs, and the
export's own check (traced control flow, denormal activations, all-zero outputs)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit.export import onnx_check
from lowbit.export.onnx import export_onnx
from lowbit.export.onnx_lower import ExportOptions
from lowbit.runtime import load

pytest.importorskip("onnxruntime", reason="ONNX export tests need the onnx extra")


class TinyDetector(nn.Module):
    """torchvision's convention without torchvision: ``forward(images: list[Tensor])`` returning one
    ``{"boxes", "scores", "labels"}`` per image; ``threshold`` keeps confident boxes only (a
    data-dependent output size, written with tensor ops)."""

    def __init__(self, classes: int = 3, threshold: float | None = None) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
        )  # fmt: skip
        self.box_head = nn.Conv2d(32, 4, 1)
        self.cls_head = nn.Conv2d(32, classes, 1)
        self.threshold = threshold

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out = []
        for image in images:
            features = self.backbone(image.unsqueeze(0))
            boxes = self.box_head(features).flatten(2)[0].t()
            scores, labels = self.cls_head(features).flatten(2)[0].t().softmax(-1).max(-1)
            if self.threshold is not None:
                keep = scores > self.threshold
                boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            out.append({"boxes": boxes, "scores": scores, "labels": labels})
        return out


class PythonNmsDetector(TinyDetector):
    """Post-processing in Python on tensor values: the tracer records one path (the example's)."""

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out = []
        for det in super().forward(images):
            kept = [i for i in range(det["scores"].shape[0]) if float(det["scores"][i]) > 0.4]
            out.append({k: v[kept] for k, v in det.items()})
        return out


def _images(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 32, 32, generator=g), torch.randn(3, 24, 40, generator=g)]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


@pytest.mark.parametrize("threshold", [None, 0.35])
@pytest.mark.parametrize("preset", ["int8-static", "int8-dynamic", "int4-weight-only"])
def test_a_list_of_images_exports_and_runs_like_the_model(tmp_path, preset, threshold):
    torch.manual_seed(0)
    model = TinyDetector(threshold=threshold).eval()
    calibration = [_images(s) for s in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few calibration examples: not what this test is about
        q = lowbit.quantize(model, preset, calibration=calibration, progress=False)
    report = export_onnx(q, tmp_path / "det.onnx", calibration[0])
    assert not report.warnings, report.warnings
    ort_model = load(tmp_path / "det.onnx")
    assert ort_model.input_names == ["images_0", "images_1"]
    assert ort_model.output_names == [f"{i}.{k}" for i in range(2) for k in ("boxes", "scores", "labels")]
    images = _images(10)  # not the example: the graph must follow the model on new images
    got = ort_model(images)
    with torch.no_grad():
        ref = q(images)
    assert isinstance(got, list) and len(got) == 2
    if threshold is not None:  # the premise: the threshold keeps some boxes, not all
        assert 0 < sum(len(r["scores"]) for r in ref) < 64 + 60
    for g, r in zip(got, ref, strict=True):
        assert sorted(g) == sorted(r)
        for key in r:
            assert g[key].shape == r[key].shape, key
        assert _cosine(g["boxes"], r["boxes"]) > 0.999
        assert torch.equal(g["labels"], r["labels"]) or _cosine(g["scores"], r["scores"]) > 0.999
    # Each layer is lowered once per image, its constants (weights, scales) stored once.
    export_onnx(q, tmp_path / "one.onnx", [calibration[0][0]])
    assert _constant_bytes(tmp_path / "det.onnx") == _constant_bytes(tmp_path / "one.onnx")


def _constant_bytes(path) -> int:
    import onnx

    return sum(len(t.raw_data) for t in onnx.load(str(path)).graph.initializer)


def test_python_control_flow_on_values_is_reported_not_silent(tmp_path):
    torch.manual_seed(0)
    q = lowbit.quantize(PythonNmsDetector().eval(), "int8-dynamic", progress=False)
    with pytest.warns(UserWarning, match="second input.*control flow"):
        report = export_onnx(q, tmp_path / "nms.onnx", _images(0))
    assert report.check["second_input"]["traced_shapes"]
    assert any("control flow" in w for w in report.warnings)


def test_a_plain_model_passes_the_check_without_warnings(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    q = lowbit.quantize(model, "int8-dynamic", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = export_onnx(q, tmp_path / "m.onnx", torch.randn(2, 3, 8, 8))
    assert report.check["example"]["min_cosine"] > 0.999
    assert report.check["second_input"]["min_cosine"] > 0.999
    assert report.check["subnormal_layers"] == []
    assert "check" in report.to_dict()


# --- denormal activations ---------------------------------------------------------------------------


class _Tiny(nn.Module):
    """Intermediate values ~1e-40 (float32 denormals), scaled back to normal at the output."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 4)
        with torch.no_grad():
            self.a.weight.mul_(1e-20)
            self.a.bias.zero_()
            self.b.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x * 1e-19)) * 1e38


def test_denormal_activations_warn_at_export(tmp_path):
    torch.manual_seed(0)
    model = _Tiny().eval()
    q = lowbit.quantize(model, {"weight": {"format": "int8"}}, progress=False)
    x = torch.randn(2, 16)
    with torch.no_grad():
        inner = q.a(x * 1e-19)
    assert 0 < float(inner.abs().max()) < onnx_check.TINY  # the premise: denormal intermediates
    with pytest.warns(UserWarning, match="smallest normal.*in a"):
        report = export_onnx(q, tmp_path / "tiny.onnx", x)
    assert report.check["subnormal_layers"][0] == "a"


def test_a_flushing_runtime_gives_an_all_zero_warning_naming_the_cause(tmp_path):
    torch.manual_seed(0)
    q = lowbit.quantize(_Tiny().eval(), {"weight": None}, progress=False)
    x = torch.randn(2, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export_onnx(q, tmp_path / "tiny.onnx", x)
    with torch.no_grad():
        ref = q(x)
        # What a runtime that flushes denormals computes: PyTorch itself in flush-to-zero mode.
        if not torch.set_flush_denormal(True):
            pytest.skip("this CPU cannot flush denormals")
        try:
            flushed = q(x)
        finally:
            torch.set_flush_denormal(False)
    assert ref.abs().max() > 1e-3 and not flushed.any()  # the premise: flushing zeroes the output
    result = onnx_check.compare(["output_0"], [flushed], [ref])
    assert result["all_zero_in_ort"] == ["output_0"]
    text = " ".join(onnx_check.messages(result, None, report.check["subnormal_layers"]))
    assert "all zero" in text and "denormal activations flushed to zero" in text


def test_compare_reports_shapes_and_cosine():
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, -3.0])
    out = onnx_check.compare(["x", "y"], [a, torch.zeros(2)], [b, torch.zeros(3)])
    assert out["shape_mismatch"] == ["y"]
    assert out["min_cosine"] == pytest.approx(float(np.dot(a.numpy(), b.numpy())) / 14.0, abs=1e-6)


# --- integer convs ----------------------------------------------------------------------------------


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, stride=2, groups=2),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 5),
    ).eval()  # fmt: skip


def test_dynamic_convs_say_plainly_they_run_in_float(tmp_path):
    q = lowbit.quantize(_cnn(), "int8-dynamic", progress=False)
    report = export_onnx(q, tmp_path / "m.onnx", torch.randn(2, 3, 16, 16))
    convs = [layer for layer in report.fallbacks if layer.kind == "conv"]
    assert len(convs) == 2 and all("float Conv" in layer.note and "slower" in layer.note for layer in convs)
    assert all(f"float: {layer.name}" in report.to_text() for layer in convs)
    assert report.op_counts.get("ConvInteger", 0) == 0 and report.op_counts["Conv"] == 2


def test_convinteger_opt_in_runs_integer_convs_close_to_the_reference(tmp_path):
    q = lowbit.quantize(_cnn(), "int8-dynamic", progress=False)
    x = torch.randn(3, 3, 16, 16)
    report = export_onnx(q, tmp_path / "m.onnx", x, options=ExportOptions(dynamic_conv="ConvInteger"))
    assert [layer.kernel for layer in report.layers if layer.kind == "conv"] == ["ConvInteger"] * 2
    assert report.op_counts["ConvInteger"] == 2 and "Conv" not in report.op_counts
    with torch.no_grad():
        ref = q(x)
    # Per-tensor activations in ORT vs lowbit's per-row reference: close, not equal.
    assert _cosine(load(tmp_path / "m.onnx")(x), ref) > 0.999


@pytest.mark.parametrize("preset", ["int8-dynamic", "int8-static"])
def test_yolos_detector_exports_and_matches_ort(tmp_path, preset):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.YolosConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=[64, 64],
        patch_size=16, num_detection_tokens=5, num_labels=3,
    )  # fmt: skip
    model = transformers.YolosForObjectDetection(cfg).eval()
    calibration = [{"pixel_values": torch.randn(4, 3, 64, 64)} for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = lowbit.quantize(model, preset, calibration=calibration, progress=False)
    report = export_onnx(q, tmp_path / "yolos.onnx", calibration[0])
    assert not report.warnings
    ort_model = load(tmp_path / "yolos.onnx")
    x = torch.randn(3, 3, 64, 64)  # another batch size: the batch axis is free
    logits, boxes = ort_model(pixel_values=x)[:2]
    with torch.no_grad():
        ref = q(pixel_values=x)
    assert ort_model.output_names[:2] == ["logits", "pred_boxes"]
    assert logits.shape == ref.logits.shape == (3, 5, 4) and boxes.shape == ref.pred_boxes.shape
    assert _cosine(logits, ref.logits) > 0.999 and _cosine(boxes, ref.pred_boxes) > 0.999
