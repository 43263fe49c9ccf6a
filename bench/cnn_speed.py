"""Static int8 CNN speed: PyTorch float vs lowbit PyTorch (kernels auto) vs ORT float vs lowbit ONNX.

A ResNet-18 layout (BasicBlocks 2-2-2-2, 64-512 channels, BatchNorm, residual adds; random init,
eval mode, BatchNorm statistics made non-trivial) at 224x224, quantized with ``int8-static``
(BatchNorm folded automatically, calibrated on smoothed-noise images). Every variant is timed in
the same run, interleaved, median of repeats, at batch 1 (and 8); cosine of the logits vs the
float PyTorch model. Prints a markdown table with the machine's features in the header.

    PYTHONPATH=src python bench/cnn_speed.py [--threads 2] [--batches 1 8] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import lowbit
from lowbit.doctor import cpu_features
from lowbit.eval.latency import interleaved_ms


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """ResNet-18's layout (torchvision's), written out: no torchvision needed."""

    def __init__(self, classes: int = 1000, widths: tuple[int, ...] = (64, 128, 256, 512)) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )  # fmt: skip
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks += [BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)]
            cin = w
        self.layers = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build(seed: int = 0) -> nn.Module:
    """Random init (Kaiming, as torchvision) with BatchNorm statistics from a few training-mode
    passes, so folding has real work to do."""
    torch.manual_seed(seed)
    model = ResNet18()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(images(4, 112, seed=seed + 100))
    return model.eval()


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Natural-ish images: white noise blurred at two scales, normalized like ImageNet inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size // 8, size // 8, generator=g)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x + 0.3 * F.avg_pool2d(torch.randn(n, 3, size, size, generator=g), 5, 1, 2)
    return (x - x.mean()) / x.std()


def ort_op_counts(path: Path, threads: int) -> dict[str, int]:
    """Op types of the graph ONNX Runtime really runs (after its Q/DQ fusions)."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    counts: dict[str, int] = {}
    for node in onnx.load(opts.optimized_model_filepath).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def ort_full_qdq(model: nn.Module, calib: list[torch.Tensor], tmp: Path, threads: int) -> Any:
    """ONNX Runtime's own ``quantize_static`` (every tensor Q/DQ, residual adds included): not
    lowbit, an upper bound of what int8 can give in ORT here. ``None`` when it fails."""
    try:
        import onnxruntime as ort
        import onnxruntime.quantization as oq

        path = tmp / "ort-float.onnx"
        axes = {"x": {0: "n"}, "y": {0: "n"}}
        torch.onnx.export(model, (calib[0],), str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes=axes, dynamo=False, opset_version=17)  # fmt: skip

        class Reader(oq.CalibrationDataReader):
            def __init__(self) -> None:
                self.batches = iter([{"x": b.numpy()} for b in calib])

            def get_next(self) -> dict[str, Any] | None:
                return next(self.batches, None)

        out = tmp / "ort-qdq.onnx"
        oq.quantize_static(str(path), str(out), Reader(), quant_format=oq.QuantFormat.QDQ, per_channel=True,
                           activation_type=oq.QuantType.QUInt8, weight_type=oq.QuantType.QInt8)  # fmt: skip
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        return ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # an optional reference row: report, do not fail the benchmark
        print(f"(ORT quantize_static reference skipped: {type(err).__name__}: {err})")
        return None


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--calibration", type=int, default=8, help="calibration batches of 4 images")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from lowbit.export.onnx import export_onnx
    from lowbit.runtime import load as ort_load

    model = build()
    calib = [images(4, args.size, seed=i) for i in range(args.calibration)]
    start = time.perf_counter()
    q = lowbit.quantize(model, "int8-static", calib, progress=False, kernels="auto")
    quantize_s = time.perf_counter() - start
    backends: dict[str, int] = {}
    for c in q.lowbit_kernels:
        backends[c.backend] = backends.get(c.backend, 0) + 1
    tmp = Path(tempfile.mkdtemp())
    sessions = {}
    for label, m in (("float", lowbit.quantize(model, {"weight": None}, progress=False)), ("int8", q)):
        path = tmp / f"{label}.onnx"
        export_onnx(m, path, calib[0][:1])
        sessions[label] = (ort_load(path, threads=args.threads), ort_op_counts(path, args.threads))
    ort_qdq = ort_full_qdq(model, calib, tmp, args.threads)
    cpu = cpu_features()
    feats = [n for n in ("avx2", "avx512", "vnni", "amx", "bf16") if getattr(cpu, n)]
    import onnxruntime

    versions = f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}"
    print(f"Machine: {cpu.model} ({cpu.arch}; {', '.join(feats)}), {cpu.cores} cores visible, "
          f"{args.threads} threads; {versions}")  # fmt: skip
    print(f"int8-static: BatchNorms folded {len(getattr(q, 'lowbit_folded', {}))}, kernels {backends}, "
          f"quantize + kernel choice {quantize_s:.1f} s")  # fmt: skip
    for label, (_, ops) in sessions.items():
        main_ops = {k: v for k, v in sorted(ops.items()) if "Conv" in k or k in ("QLinearAdd", "Gemm")}
        print(f"ORT {label} graph after optimization: {main_ops}")
    print()
    print("| batch | PyTorch float ms | lowbit PyTorch ms | speed-up | ORT float ms | lowbit ONNX ms "
          "| speed-up | cosine lowbit PT | cosine lowbit ONNX | ORT quantize_static ms (cosine) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for batch in args.batches:
        x = images(batch, args.size, seed=999)
        with torch.inference_mode():
            ref = model(x)
            got = q(x)
        f_sess, q_sess = sessions["float"][0], sessions["int8"][0]
        f_feeds, q_feeds = f_sess.feeds(x), q_sess.feeds(x)
        fns = [
            lambda x=x: model(x),
            lambda x=x: q(x),
            lambda s=f_sess, f=f_feeds: s.run_feeds(f),
            lambda s=q_sess, f=q_feeds: s.run_feeds(f),
        ]
        if ort_qdq is not None:
            feed = {"x": x.numpy()}
            fns.append(lambda s=ort_qdq, f=feed: s.run(None, f))
        with torch.inference_mode():
            times = interleaved_ms(fns, repeats=args.repeats, warmup=3, min_seconds=0)
        pt_f, pt_q, ort_f, ort_q = (statistics.median(t) for t in times[:4])
        onnx_out = q_sess(x)
        upper = "-"
        if ort_qdq is not None:
            full = torch.from_numpy(ort_qdq.run(None, {"x": x.numpy()})[0])
            upper = f"{statistics.median(times[4]):.2f} ({_cos(full, ref):.5f})"
        cosines = f"{_cos(got, ref):.5f} | {_cos(onnx_out, ref):.5f}"
        print(f"| {batch} | {pt_f:.2f} | {pt_q:.2f} | {pt_f / pt_q:.2f}x | {ort_f:.2f} | {ort_q:.2f} "
              f"| {ort_f / ort_q:.2f}x | {cosines} | {upper} |")  # fmt: skip
    print()
    print("Medians of interleaved calls (float and int8 alternate), same process; the machine is shared.")


if __name__ == "__main__":
    main()
