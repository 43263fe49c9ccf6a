"""Issue 20 bench: QAT against PTQ on a task where 4-bit PTQ loses points (a byte-level Llama LM).

The zoo's tiny Llama (``lowbit.zoo.tinylms``, 4 x 256, trained 600 steps on tinyshakespeare) is
quantized with ``lowbit.qat.recipe(bits, activation_bits)`` (intN weights per channel, static
uintN activations per tensor): PTQ (``lowbit.quantize`` with calibration), and QAT (``qat.prepare``
with LSQ, ``qat.calibrate``, ``--steps`` of Adam at 1e-4 on random training windows in a plain
user loop, ``qat.convert``). Fine-tuning alone improves this briefly trained model, so the float
model is fine-tuned for the same steps too: QAT's loss is read against that, and "recovered" is
``1 - (float_ft - qat) / (float - ptq)``. Metric: next-byte top-1 accuracy and perplexity on
held-out windows.

Usage::

    python bench/qat_char_lm.py --widths w4a4 w2 --steps 150
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from typing import Any

import torch

import lowbit
from lowbit import qat
from lowbit.eval.perplexity import perplexity
from lowbit.zoo.tinygpt import split_text
from lowbit.zoo.tinylms import default_config, get_tiny_lm

WIDTHS = {"w4a4": (4, 4), "w3a3": (3, 3), "w4": (4, None), "w3": (3, None), "w2": (2, None)}


def accuracy(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Next-byte top-1 accuracy (%)."""
    hit = total = 0
    with torch.no_grad():
        for b in batches:
            ids = b["input_ids"]
            out = model(input_ids=ids)
            logits = out.logits if hasattr(out, "logits") else out
            hit += int((logits[:, :-1].argmax(-1) == ids[:, 1:]).sum())
            total += ids[:, 1:].numel()
    return 100 * hit / total


def train(model: torch.nn.Module, data: torch.Tensor, steps: int, seed: int = 5) -> float:
    """``steps`` of Adam (lr 1e-4) on random 16 x 128 windows of ``data``; returns seconds."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    started = time.perf_counter()
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - 129, (16,), generator=g)
        ids = torch.stack([data[s : s + 128] for s in starts]).long()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text", default="/work/shared/data/tinyshakespeare.txt")
    parser.add_argument("--widths", nargs="+", default=["w4a4", "w2"], choices=list(WIDTHS))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-batches", type=int, default=16)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    cfg = default_config("llama", d_model=256)
    zm = get_tiny_lm("llama", args.text, cfg, max_eval_batches=args.eval_batches)
    data, _ = split_text(open(args.text, "rb").read())
    base = zm.model.eval()
    rows: list[tuple[str, Any, Any]] = []
    rows.append(("float", accuracy(base, zm.eval_data), perplexity(base, zm.eval_data)))
    tuned = copy.deepcopy(base)
    train(tuned, data, args.steps)
    float_ft = accuracy(tuned, zm.eval_data)
    rows.append((f"float, fine-tuned {args.steps} steps", float_ft, perplexity(tuned, zm.eval_data)))
    print("| model | next-byte accuracy % | perplexity |\n|---|---:|---:|")
    for label, acc, ppl in rows:
        print(f"| {label} | {acc:.2f} | {ppl:.4f} |")
    print("\n| width | PTQ acc (loss) | QAT acc | QAT vs fine-tuned float | recovered | QAT s |")
    print("|---|---:|---:|---:|---:|---:|")
    for width in args.widths:
        bits, act = WIDTHS[width]
        recipe = qat.recipe(bits, activation_bits=act)
        ptq = lowbit.quantize(base, recipe, calibration=zm.calibration, progress=False, kernels="reference")
        ptq_acc = accuracy(ptq, zm.eval_data)
        model = qat.prepare(copy.deepcopy(base), recipe, lsq=True, progress=False)
        if act is not None:
            qat.calibrate(model, zm.calibration)
        seconds = train(model, data, args.steps)
        q = qat.convert(model, progress=False)
        qat_acc = accuracy(q, zm.eval_data)
        loss = rows[0][1] - ptq_acc
        recovered = 1 - (float_ft - qat_acc) / loss if loss > 0 else float("nan")
        print(
            f"| {width} | {ptq_acc:.2f} ({-loss:+.2f}) | {qat_acc:.2f} | {qat_acc - float_ft:+.2f} | "
            f"{recovered * 100:.0f}% | {seconds:.0f} |"
        )


if __name__ == "__main__":
    main()
