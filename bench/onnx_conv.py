"""Integer conv compute in ONNX Runtime: float Conv vs ConvInteger (dynamic) vs QLinearConv (static).

Exports a small CNN and a ResNet-ish model (transformers ``ResNetForImageClassification``, random
init) as float, int8-dynamic with float convs (lowbit's default before), int8-dynamic with
``ConvInteger`` and int8-static (QDQ fused to ``QLinearConv``), and times every session in the same
run, interleaved, 2 threads, median of repeats, at batch 1 and 8. Prints a markdown table.

    PYTHONPATH=src python bench/onnx_conv.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from torch import nn

import lowbit
from lowbit.eval.latency import interleaved_ms
from lowbit.export.onnx import export_onnx
from lowbit.export.onnx_lower import ExportOptions
from lowbit.runtime import load


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(64, 128, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    ).eval()  # fmt: skip


class _Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def resnet() -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    cfg = ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[2, 2, 2, 2],
                       layer_type="basic", num_labels=10)  # fmt: skip
    return _Logits(ResNetForImageClassification(cfg)).eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    rows = []
    for name, build in (("small CNN", small_cnn), ("ResNet (basic, 2-2-2-2)", resnet)):
        model = build()
        size = args.size if name == "small CNN" else 2 * args.size
        calib = [torch.randn(8, 3, size, size) for _ in range(2)]
        variants = {
            "float": (lowbit.quantize(model, {"weight": None}, progress=False), ExportOptions()),
            "int8-dynamic, float conv": (lowbit.quantize(model, "int8-dynamic", progress=False),
                                         ExportOptions()),
            "int8-dynamic, ConvInteger": (lowbit.quantize(model, "int8-dynamic", progress=False),
                                          ExportOptions(dynamic_conv="ConvInteger")),
            "int8-static, QLinearConv": (lowbit.quantize(model, "int8-static", calibration=calib,
                                                        progress=False), ExportOptions()),
        }  # fmt: skip
        sessions = {}
        for label, (q, opts) in variants.items():
            path = tmp / f"{name[:5]}-{label[:20]}.onnx".replace(" ", "_").replace(",", "")
            export_onnx(q, path, calib[0][:1], options=opts)
            sessions[label] = (q, load(path, threads=2))
        for batch in (1, 8):
            x = torch.randn(batch, 3, size, size)
            feeds = {k: s.feeds(x) for k, (_, s) in sessions.items()}
            with torch.no_grad():
                ref = model(x)
            fns = [lambda s=s, f=feeds[k]: s.run_feeds(f) for k, (_, s) in sessions.items()]
            times = interleaved_ms(fns, repeats=args.repeats, warmup=3)
            for (label, (q, s)), t in zip(sessions.items(), times, strict=True):
                out = s(x)
                with torch.no_grad():
                    qref = q(x)
                cos_q = float(nn.functional.cosine_similarity(out.flatten(), qref.flatten(), dim=0))
                cos_f = float(nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0))
                rows.append((name, batch, label, statistics.median(t), cos_q, cos_f))
    print("| model | batch | export | ORT ms (median) | cosine vs lowbit PyTorch | cosine vs float |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, batch, label, ms, cq, cf in rows:
        print(f"| {name} | {batch} | {label} | {ms:.3f} | {cq:.5f} | {cf:.5f} |")


if __name__ == "__main__":
    main()
