"""Kernel table only: one 4096x4096 linear in fp32 and every lowbit ONNX Runtime kernel.

Usage: python bench/kernels.py [--size 4096] [--threads N] [--repeats R]
"""

from __future__ import annotations

import argparse

from lowbit.benchmark import BenchReport, kernel_table
from lowbit.doctor import cpu_features
from lowbit.runtime import default_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    threads = args.threads or default_threads()
    from dataclasses import asdict

    report = BenchReport(f"kernels {args.size}x{args.size}", threads, args.repeats, asdict(cpu_features()))
    report.kernels = kernel_table(size=args.size, repeats=args.repeats, threads=threads)
    print(report.to_markdown())


if __name__ == "__main__":
    main()
