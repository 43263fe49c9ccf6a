"""Data-aware PTQ on a small char-level GPT: held-out perplexity of float / RTN / GPTQ / AWQ.

Trains (once; cached) ``tiny-gpt`` on a text file (default: the shared tinyshakespeare), then
quantizes it through ``lowbit.quantize`` and measures held-out perplexity:

1. the algorithms on the same layers and grid: every linear layer (the output head included,
   the embeddings float) at int4 g128 symmetric, int3 g128 symmetric and uint4 g64 asymmetric,
   by round to nearest, GPTQ, AWQ and AWQ then GPTQ, with the share of RTN's perplexity
   increase that each removes, ``(ppl_rtn - ppl) / (ppl_rtn - ppl_float)``;
2. the presets: ``int4-weight-only`` against every data-aware preset;
3. with ``--gptq-options``, instead: GPTQ's recipe options (act-order with static groups, static
   groups alone, the MSE observer) on the same layers and grids;
4. with ``--awq-options``, instead: where AWQ judges its candidate scales (``awq.search``) and
   duo scaling, for AWQ and AWQ then GPTQ.

Each row also gives the quantization's wall time. Too slow for the test suite.

Usage::

    LOWBIT_CACHE=/tmp/lowbit-cache python bench/causal_lm_ptq.py [--d-model 128] [--steps 1000]
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

import lowbit
from lowbit.eval.perplexity import perplexity
from lowbit.recipes import AWQOptions, GPTQOptions, Recipe, WeightSpec
from lowbit.zoo.tinygpt import TinyGPTConfig, get_tiny_gpt

GRIDS = {
    "int4 g128 sym": dict(format="int4", granularity="group:128", symmetric=True),
    "int3 g128 sym": dict(format="int3", granularity="group:128", symmetric=True),
    "uint4 g64 asym": dict(format="uint4", granularity="group:64", symmetric=False),
}
ALGORITHMS = {"RTN": "rtn", "GPTQ": "gptq", "AWQ": "awq", "AWQ+GPTQ": ("awq", "gptq")}
GPTQ_VARIANTS = {
    "default": GPTQOptions(),
    "static groups": GPTQOptions(static_groups=True),
    "act-order": GPTQOptions(act_order=True, static_groups=True),
    "mse observer": GPTQOptions(observer="mse"),
    "act-order + mse": GPTQOptions(act_order=True, static_groups=True, observer="mse"),
}
AWQ_VARIANTS = {
    f"{search}{' duo' if duo else ''}": AWQOptions(search=search, duo_scaling=duo)
    for duo in (False, True)
    for search in ("layer", "module", "parent", "stage")
}
PRESETS = ("int4-weight-only", "int4-gptq", "int4-awq", "int4-awq-gptq", "int3-gptq")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", default=str(Path(__file__).parents[2] / "shared/data/tinyshakespeare.txt"))
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-batches", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gptq-options", action="store_true", help="only the table of GPTQ's options")
    parser.add_argument("--awq-options", action="store_true", help="only the table of AWQ's options")
    parser.add_argument("--grids", default=",".join(GRIDS), help="comma-separated subset of the grids")
    parser.add_argument("--awq-variants", default=",".join(AWQ_VARIANTS), help="subset for --awq-options")
    parser.add_argument("--awq-gptq", action="store_true", help="--awq-options: also AWQ then GPTQ")
    parser.add_argument("--no-references", action="store_true", help="--awq-options: skip RTN / GPTQ rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    cfg = TinyGPTConfig(n_layer=args.layers, n_head=4, d_model=args.d_model, steps=args.steps, lr=args.lr)
    zm = get_tiny_gpt(text_path=args.text, config=cfg, max_eval_batches=args.eval_batches)
    base = perplexity(zm.model, zm.eval_data)
    print(f"{zm.description}; held-out perplexity {base:.4f} on {len(zm.eval_data)} batches of 16 x 128")
    print(f"calibration: {len(zm.calibration)} batches of 16 x 128 tokens\n")

    def run(recipe: str | Recipe) -> tuple[float, float]:
        started = time.perf_counter()
        q = lowbit.quantize(zm.model, recipe, calibration=zm.calibration, progress=False)
        return perplexity(q, zm.eval_data), time.perf_counter() - started

    grids = {g: GRIDS[g] for g in args.grids.split(",")}
    if args.awq_options:
        algorithms = ("awq", ("awq", "gptq")) if args.awq_gptq else ("awq",)
        print("| linear layers at | awq.search | AWQ | AWQ+GPTQ |\n|---|---|---:|---:|")
        for variant in args.awq_variants.split(","):
            for grid, spec in grids.items():
                if not args.no_references and variant == args.awq_variants.split(",")[0]:
                    for name in ("rtn", "gptq"):
                        weight = WeightSpec(**spec, algorithm=name)
                        ppl, seconds = run(Recipe(weight=weight, modules=("linear",)))
                        print(f"| {grid} | {name} reference | {ppl:.4f} ({seconds:.0f} s) | |", flush=True)
                cells = []
                for algorithm in algorithms:
                    weight = WeightSpec(**spec, algorithm=algorithm)
                    recipe = Recipe(weight=weight, modules=("linear",), awq=AWQ_VARIANTS[variant])
                    ppl, seconds = run(recipe)
                    cells.append(f"{ppl:.4f} ({seconds:.0f} s)")
                print(f"| {grid} | {variant} | " + " | ".join(cells) + " |", flush=True)
        return
    if args.gptq_options:
        print("| linear layers at | RTN | " + " | ".join(f"GPTQ {v}" for v in GPTQ_VARIANTS) + " |")
        print("|---|" + "---:|" * (1 + len(GPTQ_VARIANTS)))
        for grid, spec in grids.items():
            rtn, _ = run(Recipe(weight=WeightSpec(**spec, algorithm="rtn"), modules=("linear",)))
            cells = [f"{rtn:.4f}"]
            for options in GPTQ_VARIANTS.values():
                weight = WeightSpec(**spec, algorithm="gptq")
                recipe = Recipe(weight=weight, modules=("linear",), gptq=options)
                ppl, seconds = run(recipe)
                cells.append(f"{ppl:.4f}, {(rtn - ppl) / (rtn - base) * 100:.0f}% ({seconds:.0f} s)")
            print(f"| {grid} | " + " | ".join(cells) + " |", flush=True)
        return

    print("| linear layers at | " + " | ".join(ALGORITHMS) + " |")
    print("|---|" + "---:|" * len(ALGORITHMS))
    for grid, spec in GRIDS.items():
        cells, rtn = [], None
        for algorithm in ALGORITHMS.values():
            recipe = Recipe(weight=WeightSpec(**spec, algorithm=algorithm), modules=("linear",))
            ppl, seconds = run(recipe)
            if rtn is None:
                rtn = ppl
                cells.append(f"{ppl:.4f} ({seconds:.0f} s)")
            else:
                share = (rtn - ppl) / (rtn - base) * 100 if rtn != base else float("nan")
                cells.append(f"{ppl:.4f}, {share:.0f}% ({seconds:.0f} s)")
        print(f"| {grid} | " + " | ".join(cells) + " |", flush=True)

    print("\n| preset | perplexity | vs int4-weight-only | bits / param | quantize s |")
    print("|---|---:|---:|---:|---:|")
    reference = None
    for name in PRESETS:
        started = time.perf_counter()
        q = lowbit.quantize(zm.model, name, calibration=zm.calibration, progress=False)
        seconds = time.perf_counter() - started
        ppl = perplexity(q, zm.eval_data)
        reference = ppl if reference is None else reference
        bits = lowbit.size_report(q).bits_per_param
        print(f"| {name} | {ppl:.4f} | {ppl - reference:+.4f} | {bits:.2f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
