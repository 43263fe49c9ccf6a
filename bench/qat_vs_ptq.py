"""QAT vs PTQ on digits-cnn / digits-lstm at 4, 3 and 2 bits, over several seeds and data splits.

Every row quantizes weights and activations at the same width, every layer included:

- ``float``: the float model;
- ``PTQ``: ``lowbit.quantize`` with the QAT recipe itself (MSE-clipped int weights per channel,
  static MSE-clipped uint activations per tensor): the "same recipe" baseline;
- ``plain PTQ``: the same formats with round-to-nearest weights and a min-max activation observer;
- ``QAT``: ``lowbit.qat.demo.qat_train`` (LSQ + distillation, the demo's configuration).

Protocols (``--protocol``):

- ``test``: the zoo's fixed split and cached float model; accuracy on the 360 test images
  (1 image = 0.28 points). Seed ``s`` is the QAT training seed and picks the PTQ calibration
  images (256 training images; seed 0 = the zoo's calibration batches).
- ``kfold``: stratified K-fold over all 1797 images; each fold retrains the float model with the
  zoo's own recipe (``lowbit.zoo.digits.train``) on the other folds. Seed = fold index.
  Every image is tested once per repeat (1797 images: 1 image = 0.056 points).
- ``val``: for choosing hyper-parameters: stratified K-fold inside the fixed *training* split
  (1437 images); the 360 test images are never used.
- ``--repeats R`` repeats ``kfold`` / ``val`` with R different shuffles (R * K runs).

The table gives mean ± standard deviation over seeds / folds, and the paired difference QAT - PTQ
as mean ± standard error with wins / ties / losses of QAT.

Runs on one torch thread (tiny models). A ``test`` run of both models at 4/3/2 bits with 5 seeds
takes about 10 minutes of one core.

Usage::

    python bench/qat_vs_ptq.py --protocol test --seeds 5
    python bench/qat_vs_ptq.py --protocol kfold --folds 5
    python bench/qat_vs_ptq.py --protocol val --folds 4 --bits 4 3 --qat lr=3e-4 --epochs 4:6
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

import lowbit
from lowbit import qat
from lowbit.eval.metrics import accuracy
from lowbit.qat.demo import QAT_EPOCHS, qat_train
from lowbit.recipes import ActivationSpec, Recipe, WeightSpec
from lowbit.threads import single_thread
from lowbit.train import batches
from lowbit.zoo.digits import load_split, train

METHODS = ("float", "PTQ", "plain PTQ", "QAT")


@dataclass
class Split:
    """One train / evaluation split with its float model."""

    name: str
    seed: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_eval: torch.Tensor
    y_eval: torch.Tensor
    model: nn.Module


def plain_recipe(bits: int) -> Recipe:
    """The QAT formats with round-to-nearest weights and min-max activation ranges."""
    return Recipe(
        name=f"plain-w{bits}a{bits}",
        weight=WeightSpec(format=f"int{bits}", granularity="channel", symmetric=True, algorithm="rtn"),
        activation=ActivationSpec(
            mode="static", format=f"uint{bits}", granularity="tensor", symmetric=False, observer="minmax"
        ),
    )


def calibration(x: torch.Tensor, seed: int, count: int = 8, size: int = 32) -> list[torch.Tensor]:
    """``count`` batches of ``size`` training images in a seeded order (seed 0: the zoo's batches)."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return [x[order[i * size : (i + 1) * size]] for i in range(count)]


def _folds(y: torch.Tensor, k: int, seed: int = 0) -> Iterator[tuple[list[int], list[int]]]:
    from sklearn.model_selection import StratifiedKFold

    folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for train_idx, eval_idx in folds.split(torch.zeros(len(y)), y.numpy()):
        yield train_idx.tolist(), eval_idx.tolist()


def splits(model_name: str, protocol: str, seeds: int, folds: int, repeats: int = 1) -> Iterator[Split]:
    x_train, y_train, x_test, y_test = load_split()
    if protocol == "test":
        model = lowbit.zoo.get(model_name).model.eval()
        for seed in range(seeds):
            yield Split("test", seed, x_train, y_train, x_test, y_test, model)
        return
    if protocol == "kfold":
        x, y = torch.cat([x_train, x_test]), torch.cat([y_train, y_test])
    elif protocol == "val":
        x, y = x_train, y_train
    else:
        raise ValueError(f"unknown protocol {protocol!r}")
    for repeat in range(repeats):
        for fold, (tr, ev) in enumerate(_folds(y, folds, seed=repeat)):
            model = train(model_name, x[tr], y[tr])
            name = f"{protocol}{fold}" if repeats == 1 else f"{protocol}{repeat}.{fold}"
            yield Split(name, repeat * folds + fold, x[tr], y[tr], x[ev], y[ev], model)


def evaluate(model: nn.Module, split: Split) -> tuple[float, int]:
    acc = accuracy(model, [(split.x_eval, split.y_eval)])
    return acc * 100.0, round(acc * len(split.y_eval))


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for model_name in args.models:
        for split in splits(model_name, args.protocol, args.seeds, args.folds, args.repeats):
            calib = calibration(split.x_train, split.seed)
            float_acc = evaluate(split.model, split)
            for bits in args.bits:
                results = {"float": float_acc}
                ptq = lowbit.quantize(split.model, qat.recipe(bits), calibration=calib, progress=False)
                results["PTQ"] = evaluate(ptq, split)
                plain = lowbit.quantize(split.model, plain_recipe(bits), calibration=calib, progress=False)
                results["plain PTQ"] = evaluate(plain, split)
                seconds = 0.0
                if not args.no_qat:
                    data = batches(split.x_train, split.y_train, 64, seed=split.seed)
                    model, seconds = qat_train(
                        split.model, data, calib, bits, args.epochs.get(bits, QAT_EPOCHS[bits]),
                        seed=split.seed, **args.qat,
                    )  # fmt: skip
                    results["QAT"] = evaluate(model, split)
                row = {
                    "model": model_name,
                    "split": split.name,
                    "seed": split.seed,
                    "bits": bits,
                    "n": len(split.y_eval),
                    "qat_seconds": round(seconds, 2),
                    **{m: round(a, 3) for m, (a, _) in results.items()},
                    **{f"{m} correct": c for m, (_, c) in results.items()},
                }
                rows.append(row)
                text = "  ".join(f"{m} {a:6.2f}" for m, (a, _) in results.items())
                where = f"{model_name:12s} {split.name:6s} W{bits}A{bits}"
                print(f"{where}  {text}  ({seconds:.1f}s)", flush=True)
    return rows


def _paired(group: list[dict], base: str) -> str:
    """Paired difference QAT - ``base`` over runs: mean ± standard error (QAT wins / ties / losses)."""
    diffs = [r["QAT"] - r[base] for r in group if "QAT" in r]
    if len(diffs) < 2:
        return ""
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    se = statistics.stdev(diffs) / len(diffs) ** 0.5
    return f"{statistics.mean(diffs):+.2f} ± {se:.2f} ({wins}/{len(diffs) - wins - losses}/{losses})"


def summarize(rows: list[dict]) -> None:
    print()
    print("| model | bits | runs | " + " | ".join(METHODS) + " | QAT - PTQ | QAT - plain PTQ | QAT s |")
    print("| --- | ---: | ---: | " + " | ".join("---:" for _ in METHODS) + " | ---: | ---: | ---: |")
    keys = sorted({(r["model"], r["bits"]) for r in rows}, key=lambda k: (k[0], -k[1]))
    for model, bits in keys:
        group = [r for r in rows if r["model"] == model and r["bits"] == bits]
        cells = []
        for m in METHODS:
            values = [r[m] for r in group if m in r]
            if not values:
                cells.append("")
                continue
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.2f} ± {sd:.2f}")
        diffs = [_paired(group, base) for base in ("PTQ", "plain PTQ")]
        secs = statistics.mean(r["qat_seconds"] for r in group)
        runs = len(group)
        print(f"| {model} | {bits} | {runs} | " + " | ".join(cells + diffs) + f" | {secs:.1f} |")
    print()
    print("per seed / fold (float, PTQ, plain PTQ, QAT):")
    for model, bits in keys:
        group = [r for r in rows if r["model"] == model and r["bits"] == bits]
        for m in METHODS:
            values = [f"{r[m]:.2f}" for r in group if m in r]
            if values:
                print(f"  {model} W{bits}A{bits} {m:9s}: {' '.join(values)}")


def _parse_value(text: str) -> object:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", choices=("test", "kfold", "val"), default="test")
    parser.add_argument("--models", nargs="+", default=["digits-cnn", "digits-lstm"])
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 3, 2])
    parser.add_argument("--seeds", type=int, default=5, help="seeds for --protocol test")
    parser.add_argument("--folds", type=int, default=5, help="folds for --protocol kfold / val")
    parser.add_argument("--repeats", type=int, default=1, help="repeated K-fold (new shuffle each time)")
    parser.add_argument("--qat", nargs="*", default=[], help="qat_train options, e.g. lr=3e-4 alpha=1")
    parser.add_argument("--epochs", default="", help="QAT epochs per width, e.g. 4:6,3:8")
    parser.add_argument("--no-qat", action="store_true", help="float and PTQ rows only")
    parser.add_argument("--json", help="also write every run to this JSON file")
    parser.add_argument("--summarize", metavar="JSON", help="only print the tables of an earlier --json")
    args = parser.parse_args()
    if args.summarize:
        with open(args.summarize) as f:
            saved = json.load(f)
        print(f"from {args.summarize}: {saved['args']}")
        summarize(saved["rows"])
        return
    args.qat = {k: _parse_value(v) for k, v in (item.split("=", 1) for item in args.qat)}
    args.epochs = {int(b): int(e) for b, e in (p.split(":") for p in args.epochs.split(",") if p)}
    epochs = args.epochs or QAT_EPOCHS
    print(f"protocol {args.protocol}, QAT options {args.qat or 'default'}, epochs {epochs}")
    # PTQ's calibration diagnostics (256 images, some ranges still moving) would repeat every run.
    warnings.filterwarnings("ignore", message="lowbit: activation ranges were still changing")
    started = time.perf_counter()
    with single_thread():
        rows = run(args)
    summarize(rows)
    print(f"\n{time.perf_counter() - started:.0f} s; command: {' '.join(sys.argv)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {**vars(args), "epochs": args.epochs}, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
