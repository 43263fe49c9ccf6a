"""Bit-identity reference for the format families: hashes of everything a format produces.

Quantizes a fixed set of seeded tensors with every registered format at several granularities
(parameters, codes, dequantized values, fake-quantized values and their gradients, the packed
``QuantizedWeight`` buffers, MSE clipping) and a few small seeded zoo architectures through
``lowbit.quantize`` with several presets + ``lowbit.save`` (artifact bytes), and writes one
SHA-256 per case to a JSON file. Run it before and after a refactor of the primitives / codecs
and compare: every hash must match.

    PYTHONPATH=src python bench/codec_reference.py /tmp/codec-ref-before.json
    PYTHONPATH=src python bench/codec_reference.py /tmp/codec-ref-after.json \
        --compare /tmp/codec-ref-before.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

import lowbit
import lowbit.formats as F
from lowbit.algorithms.rtn import choose_weight_qparams
from lowbit.granularity import PerChannel, PerGroup, PerTensor, PerToken
from lowbit.nn.qweight import QuantizedWeight
from lowbit.primitives import choose_qparams, dequantize, fake_quantize, qparams_from_range, quantize

EXTRA_FORMATS = ["pq_4x2", "pq_2x3", "pq_8x1", "pq_4x4"]
GRANULARITIES = [PerTensor(), PerChannel(0), PerChannel(-1), PerGroup(4), PerGroup(32), PerToken()]
PRESETS = [
    "int8-weight-only",
    "int4-weight-only",
    "int2-weight-only",
    "nf4",
    "fp8",
    "fp16",
    "bf16",
    "log2-4bit",
    "kmeans-4bit",
    "pq",
    "binary",
    "ternary",
    "int8-dynamic",
    "int8-static",
    "int4-gptq",
    "int4-awq",
]


def _digest(h: hashlib._Hash, obj: object) -> None:
    if obj is None:
        h.update(b"<none>")
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for o in obj:
            _digest(h, o)
        h.update(b"]")
    elif isinstance(obj, dict):
        for k in sorted(obj):
            h.update(str(k).encode())
            _digest(h, obj[k])
    else:
        h.update(repr(obj).encode())


def digest(*objs: object) -> str:
    h = hashlib.sha256()
    for o in objs:
        _digest(h, o)
    return h.hexdigest()


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    out = {
        "mat": torch.randn(12, 40, generator=g),
        "mat_t": torch.randn(40, 12, generator=g).t(),  # non-contiguous
        "heavy": torch.randn(8, 64, generator=g) ** 3,
        "conv": torch.randn(6, 3, 3, 3, generator=g),
        "vec": torch.randn(37, generator=g),
        "scalar": torch.tensor(0.37),
        "zeros": torch.zeros(4, 9),
        "consts": torch.full((3, 10), -2.5),
        "few": torch.tensor([[0.0, 1.0, 1.0, -1.0, 0.5, 0.5, 3.0, 3.0]] * 3),
        "wide": torch.randn(4, 300, generator=g),
        "empty": torch.zeros(0, 8),
        "half": torch.randn(5, 16, generator=g).half(),
        "ties": torch.tensor([[0.25, 0.75, -0.25, -1.25, 2.5, -0.0, 0.0, 6.5]]),
        "big": torch.tensor([[3e38, -3e38, 1.0, -1e-30]]),
    }
    return out


def tensor_cases(results: dict[str, str]) -> None:
    names = F.names() + EXTRA_FORMATS
    for fname in names:
        fmt = F.get(fname)
        for tname, x in tensors().items():
            for gran in GRANULARITIES:
                for sym in (True, False):
                    if not sym and fmt.family != "int":
                        continue
                    key = f"{fname}/{tname}/{gran}/{'sym' if sym else 'asym'}"
                    try:
                        results[key] = one_case(x, fmt, gran, sym)
                    except Exception as e:  # the error itself is part of the behaviour
                        results[key] = f"error {type(e).__name__}: {e}"


def range_cases(results: dict[str, str]) -> None:
    """``qparams_from_range`` (the observers' path) for every format, errors included."""
    g = torch.Generator().manual_seed(77)
    lo, hi = -torch.rand(3, 4, generator=g) * 3, torch.rand(3, 4, generator=g)
    ranges = {"mixed": (lo, hi), "positive": (hi * 0.1, hi), "huge": (lo * 1e38, hi * 3e38)}
    for fname in F.names() + EXTRA_FORMATS:
        fmt = F.get(fname)
        for sym in (True, False):
            for what, (a, b) in ranges.items():
                key = f"range/{fname}/{what}/{'sym' if sym else 'asym'}"
                try:
                    qp = qparams_from_range(a, b, fmt, (1, 8), sym)
                    results[key] = digest(qp.scale, qp.zero_point, qp.block, qp.codebook, fmt.code_dtype)
                except Exception as e:
                    results[key] = f"error {type(e).__name__}: {e}"
        results[f"props/{fname}"] = digest(fmt.code_dtype, fmt.packable, F.storage_bits(fmt), fmt.levels)


def one_case(x: torch.Tensor, fmt: F.Format, gran, sym: bool) -> str:
    qp = choose_qparams(x, fmt, gran, sym)
    codes = quantize(x, fmt, qp)
    deq = dequantize(codes, fmt, qp)
    deq16 = dequantize(codes, fmt, qp, dtype=torch.float16)
    xg = x.detach().float().clone().requires_grad_(True)
    fq = fake_quantize(xg, fmt, qp)
    fq.sum().backward()
    parts: list[object] = [qp.scale, qp.zero_point, qp.block, qp.codebook, codes, deq, deq16, fq, xg.grad]
    if x.dim() >= 1:
        qp9 = choose_qparams(x, fmt, gran, sym, clip_ratio=0.9)
        parts += [qp9.scale, qp9.zero_point, qp9.codebook]
    if x.dim() == 2 and x.numel():
        for algorithm in ("rtn", "mse"):
            qpw = choose_weight_qparams(x, fmt, gran, sym, algorithm=algorithm)
            parts += [qpw.scale, qpw.zero_point, qpw.codebook]
    try:
        qw = QuantizedWeight.from_float(x, fmt, gran, sym)
        parts += [dict(qw.state_dict()), qw.manifest(), qw.codes(), qw.dequantize()]
        parts += [qw.expected_buffers(hasattr(qw, "zero_point")), qw.code_count]
        if x.dim() == 2 and x.shape[0] >= 2:
            parts.append(qw.dequantize_rows(torch.tensor([[1, 0], [1, 1]])))
        back = QuantizedWeight.empty(qw.manifest())
        back.load_state_dict(qw.state_dict())
        parts.append(back.dequantize())
    except Exception as e:
        parts.append(f"qweight error {type(e).__name__}: {e}")
    return digest(*parts)


def model_cases(results: dict[str, str]) -> None:
    from lowbit.zoo.digits import DigitsCNN, DigitsLSTM
    from lowbit.zoo.tinygpt import TinyGPT, TinyGPTConfig

    def gpt() -> torch.nn.Module:
        torch.manual_seed(0)
        return TinyGPT(TinyGPTConfig(n_layer=2, d_model=32, n_head=2, context=16)).eval()

    def cnn() -> torch.nn.Module:
        torch.manual_seed(1)
        return DigitsCNN().eval()

    def lstm() -> torch.nn.Module:
        torch.manual_seed(2)
        return DigitsLSTM(hidden=16).eval()

    g = torch.Generator().manual_seed(5)
    calib = {
        "gpt": [torch.randint(0, 256, (4, 16), generator=g) for _ in range(3)],
        "cnn": [torch.randn(8, 1, 8, 8, generator=g) for _ in range(3)],
        "lstm": [torch.randn(8, 1, 8, 8, generator=g) for _ in range(3)],
    }
    builders = {"gpt": gpt, "cnn": cnn, "lstm": lstm}
    with tempfile.TemporaryDirectory() as tmp:
        for mname, build in builders.items():
            for preset in PRESETS:
                key = f"model/{mname}/{preset}"
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        q = lowbit.quantize(build(), preset, calib[mname], progress=False)
                    out = Path(tmp) / f"{mname}-{preset}"
                    lowbit.save(q, out)
                    files = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
                    with torch.no_grad():
                        y = q(calib[mname][0])
                    rep = lowbit.size_report(q).to_dict()
                    results[key] = digest(
                        {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}, y, rep
                    )
                except Exception as e:
                    results[key] = f"error {type(e).__name__}: {e}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--compare", default=None)
    parser.add_argument("--no-models", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, str] = {}
    tensor_cases(results)
    range_cases(results)
    if not args.no_models:
        model_cases(results)
    Path(args.out).write_text(json.dumps(results, indent=0, sort_keys=True))
    errors = sum(v.startswith("error") for v in results.values())
    print(f"{len(results)} cases ({errors} raise an error, recorded as behaviour) -> {args.out}")
    if args.compare:
        ref = json.loads(Path(args.compare).read_text())
        diff = sorted(k for k in set(ref) | set(results) if ref.get(k) != results.get(k))
        for k in diff[:40]:
            print(f"DIFFERS {k}: {ref.get(k)} -> {results.get(k)}")
        print(f"{len(diff)} of {len(ref)} cases differ")
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
