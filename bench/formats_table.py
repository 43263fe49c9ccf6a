"""How much error each number format adds to a weight matrix, as Markdown tables.

For a Gaussian weight and a heavy-tailed one (Student-t, 3 degrees of freedom: a few large outliers,
like real LLM weights), quantize-dequantize with every format at three granularities and report
the mean squared error and the signal-to-quantization-noise ratio, SQNR = 10 log10(sum x^2 / sum e^2).
Plain round-to-nearest with full-range (absmax / min-max) parameters: no clipping search, no
calibration, so the numbers compare the formats themselves.

Usage::

    python bench/formats_table.py [--size 4096] [--seed 0]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from dataclasses import dataclass

import torch

import lowbit.formats as F
from lowbit.granularity import Granularity, PerChannel, PerGroup, PerTensor
from lowbit.primitives import choose_qparams, fake_quantize

GRANULARITIES: list[tuple[str, Granularity]] = [
    ("per-tensor", PerTensor()),
    ("per-channel", PerChannel(0)),
    ("per-group-128", PerGroup(128)),
]


@dataclass(frozen=True)
class Entry:
    """One row of the table: a format and how its parameters are chosen."""

    label: str
    name: str
    symmetric: bool = True
    # Vector formats (pq) learn one codebook for the whole matrix: granularity does not apply.
    per_granularity: bool = True


def entries() -> list[Entry]:
    rows = [Entry(f"int{b}", f"int{b}") for b in range(2, 9)]
    rows += [Entry("int4 asym", "int4", symmetric=False), Entry("uint8 asym", "uint8", symmetric=False)]
    rows += [Entry(name, name) for name in ("binary", "ternary", "fp16", "bf16")]
    rows += [Entry(name, name) for name in ("fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "nf4", "log2_4")]
    # Learned formats join once their algorithms exist (they are written separately).
    if module_exists("lowbit.algorithms.kmeans"):
        rows += [Entry("kmeans_4", "kmeans_4"), Entry("quantile_4", "quantile_4")]
    if module_exists("lowbit.algorithms.pq"):
        rows += [Entry("pq (8 bits x 4 dims)", "pq", per_granularity=False)]
    return rows


def module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def weights(size: int, seed: int) -> dict[str, torch.Tensor]:
    """A unit Gaussian and a Student-t(3) matrix (z / sqrt(chi2_3 / 3)), from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(size, size, generator=gen)
    z = torch.randn(size, size, generator=gen)
    chi2 = sum(torch.randn(size, size, generator=gen) ** 2 for _ in range(3))
    student_t = z / torch.sqrt(chi2 / 3)
    return {"Gaussian N(0, 1)": gaussian, "Student-t, 3 dof": student_t}


def measure(w: torch.Tensor, entry: Entry, gran: Granularity) -> tuple[float, float]:
    """(MSE, SQNR in dB) of quantize-dequantize, accumulated in float64."""
    fmt = F.get(entry.name)
    qp = choose_qparams(w, fmt, gran, entry.symmetric)
    error = (fake_quantize(w, fmt, qp) - w).double()
    noise = float(error.pow(2).sum())
    signal = float(w.double().pow(2).sum())
    sqnr = math.inf if noise == 0 else 10 * math.log10(signal / noise)
    return noise / w.numel(), sqnr


def table(w: torch.Tensor, title: str) -> str:
    header = "| format | code bits | " + " | ".join(f"{g} MSE | {g} SQNR dB" for g, _ in GRANULARITIES) + " |"
    lines = [f"### {title}", "", header, "|" + " --- |" * (2 + 2 * len(GRANULARITIES))]
    for entry in entries():
        cells = [entry.label, f"{F.storage_bits(F.get(entry.name)):g}"]
        for gran_name, gran in GRANULARITIES:
            if not entry.per_granularity and gran_name != "per-tensor":
                cells += ["same", "same"]
                continue
            start = time.perf_counter()
            try:
                mse, sqnr = measure(w, entry, gran)
                cells += [f"{mse:.3e}", f"{sqnr:.2f}"]
            except Exception as exc:  # one broken format must not hide the others' numbers
                print(f"{entry.label} {gran_name}: {type(exc).__name__}: {exc}", file=sys.stderr)
                cells += ["failed", "failed"]
            seconds = time.perf_counter() - start
            print(f"  {title} / {entry.label} / {gran_name}: {seconds:.1f}s", file=sys.stderr)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="the weight is size x size (default 4096)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    missing = [m for m in ("kmeans", "pq") if not module_exists(f"lowbit.algorithms.{m}")]
    print(f"## Quantization error by format ({args.size}x{args.size}, seed {args.seed})\n")
    if missing:
        names = ", ".join(f"lowbit.algorithms.{m}" for m in missing)
        print(f"Not measured (module not available yet): {names}\n")
    for title, w in weights(args.size, args.seed).items():
        print(table(w, title) + "\n")


if __name__ == "__main__":
    main()
