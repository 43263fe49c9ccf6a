"""MiniLM: data-aware PTQ next to round-to-nearest on the same grid, with GPTQ's time and memory.

Prints mean / min cosine of sentence embeddings to float (64 held-out built-in sentences) for
plain static W8A8 vs SmoothQuant (same min-max observers), and RTN vs GPTQ vs AWQ at int4
(uint4, groups of 64, zero points), each calibrated on all 128 built-in sentences; plus the wall
time, CPU time and peak resident memory of each quantization. Too slow for the test suite.

Usage::

    python bench/data_aware.py [--threads 2]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

import lowbit
from lowbit.eval.metrics import cosine_per_row, model_outputs
from lowbit.zoo import get
from lowbit.zoo.sentences import SENTENCES
from lowbit.zoo.text import tokenize_batches

PAIRS = [
    ("int8-static", "int8-smoothquant"),
    ("int4-weight-only", "int4-gptq"),
    ("int4-weight-only", "int4-awq"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    zm = get("minilm")
    inputs = zm.eval_inputs()
    reference = model_outputs(zm.model, inputs)
    calibration = tokenize_batches(zm.tokenizer, SENTENCES, 32)  # 128 sequences
    print("| recipe | cosine mean | cosine min | quantize wall s | quantize CPU s | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|")
    done: set[str] = set()
    for pair in PAIRS:
        for recipe in pair:
            if recipe in done:
                continue
            done.add(recipe)
            wall, cpu = time.perf_counter(), time.process_time()
            q = lowbit.quantize(zm.model, recipe, calibration=calibration, progress=False)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            cos = cosine_per_row(reference, model_outputs(q, inputs))
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(
                f"| {recipe} | {cos.mean():.4f} | {cos.min():.4f} | {wall:.1f} | {cpu:.1f} | {rss:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
