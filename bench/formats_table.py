"""How much error each number format adds to a weight matrix, as Markdown tables, and how long the
learned k-means grid takes.

For a Gaussian weight and a heavy-tailed one (Student-t, 3 degrees of freedom: a few large outliers,
like real LLM weights), quantize-dequantize with every format at three granularities and report
the mean squared error and the signal-to-quantization-noise ratio, SQNR = 10 log10(sum x^2 / sum e^2).
Plain round-to-nearest with full-range (absmax / min-max) parameters: no clipping search, no
calibration, so the numbers compare the formats themselves. Then time ``choose_qparams`` for
``kmeans_4`` (the learned grid) per tensor, per channel and per group of 128: median of repeats.

Usage::

    python bench/formats_table.py [--size 4096] [--seed 0] [--threads 2] [--repeats 3] [--no-tables]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
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
    """Every format family: integers symmetric and with a zero point, the unsigned integers (the same
    grid as the signed ones once a zero point shifts it), the fixed grids, and the learned ones."""
    rows = []
    for bits in range(8, 1, -1):
        rows += [Entry(f"int{bits}", f"int{bits}"), Entry(f"int{bits} asym", f"int{bits}", symmetric=False)]
    rows += [Entry("uint8 asym", "uint8", symmetric=False), Entry("uint4 asym", "uint4", symmetric=False)]
    rows += [Entry(name, name) for name in ("binary", "ternary", "fp16", "bf16")]
    rows += [Entry(name, name) for name in ("fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "nf4", "log2_4")]
    rows += [Entry("kmeans_4", "kmeans_4"), Entry("quantile_4", "quantile_4")]
    rows += [Entry("pq (8 bits x 4 dims)", "pq", per_granularity=False)]
    return rows


def weights(size: int, seed: int) -> dict[str, torch.Tensor]:
    """A unit Gaussian and a Student-t(3) matrix (z / sqrt(chi2_3 / 3)), from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(size, size, generator=gen)
    z = torch.randn(size, size, generator=gen)
    chi2 = sum(torch.randn(size, size, generator=gen) ** 2 for _ in range(3))
    student_t = z / torch.sqrt(chi2 / 3)
    return {"Gaussian N(0, 1)": gaussian, "Student-t, 3 dof": student_t}


def measure(w: torch.Tensor, entry: Entry, gran: Granularity) -> tuple[float, float]:
    """(MSE, SQNR in dB) of quantize-dequantize, accumulated in float64.

    >>> round(measure(torch.tensor([[0.5, -1.0]]), Entry("int8", "int8"), PerTensor())[0], 12)
    0.0
    """
    fmt = F.get(entry.name)
    qp = choose_qparams(w, fmt, gran, entry.symmetric)
    error = (fake_quantize(w, fmt, qp) - w).double()
    noise = float(error.pow(2).sum())
    signal = float(w.double().pow(2).sum())
    sqnr = math.inf if noise == 0 else 10 * math.log10(signal / noise)
    return noise / w.numel(), sqnr


def table(w: torch.Tensor, title: str) -> str:
    """One Markdown table: a row per format, MSE and SQNR per granularity."""
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


def kmeans_timing(w: torch.Tensor, repeats: int) -> str:
    """Markdown table: wall and CPU seconds of ``choose_qparams(w, kmeans_4, granularity)``.

    CPU time (all threads of this process) is reported next to wall time because on a shared
    machine wall time mostly measures the neighbours; with one thread it is the wall time an idle
    core would take.
    """
    fmt = F.get("kmeans_4")
    lines = [
        "| granularity | wall s (median) | wall s (min) | CPU s (median) | MSE |",
        "| --- | --- | --- | --- | --- |",
    ]
    for gran_name, gran in GRANULARITIES:
        wall, cpu = [], []
        for _ in range(repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            qp = choose_qparams(w, fmt, gran)
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        mse = float((fake_quantize(w, fmt, qp) - w).double().pow(2).mean())
        lines.append(
            f"| {gran_name} | {statistics.median(wall):.2f} | {min(wall):.2f} | "
            f"{statistics.median(cpu):.2f} | {mse:.3e} |"
        )
        print(f"  kmeans_4 {gran_name}: wall {[round(s, 2) for s in wall]}", file=sys.stderr)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="the weight is size x size (default 4096)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats per granularity")
    parser.add_argument("--no-tables", action="store_true", help="only time kmeans_4")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    mats = weights(args.size, args.seed)
    print(f"## Quantization error by format ({args.size}x{args.size}, seed {args.seed})\n")
    if not args.no_tables:
        for title, w in mats.items():
            print(table(w, title) + "\n", flush=True)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"### kmeans_4 `choose_qparams` time, Gaussian {args.size}x{args.size}\n")
    print(f"torch threads: {torch.get_num_threads()}, CPUs: {os.cpu_count()}, load average before: {load}\n")
    print(kmeans_timing(mats["Gaussian N(0, 1)"], args.repeats) + "\n")


if __name__ == "__main__":
    main()
