"""Side-by-side MiniLM benchmark (``lowbit bench minilm``): writes markdown and JSON.

Usage: python bench/minilm.py [--threads N] [--repeats R] [--no-kernels] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lowbit.benchmark import bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--no-kernels", action="store_true")
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args()
    report = bench(
        args.model, tuple(args.batch), repeats=args.repeats, threads=args.threads, kernels=not args.no_kernels
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.model}.md").write_text(report.to_markdown())
    (out / f"{args.model}.json").write_text(json.dumps(report.to_dict(), indent=2))
    print(report.to_markdown())


if __name__ == "__main__":
    main()
