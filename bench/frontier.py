"""Issue 22 bench: below 4 bits and the microscaling formats, on held-out causal LMs.

Models: ``lowbit.zoo.tinylms``' GPT-2 style (transformers ``GPT2LMHeadModel``) and Llama style
(``LlamaForCausalLM``) byte-level LMs trained on tinyshakespeare (cached; ``--d-model`` as trained).
Held-out perplexity on windows of the model's full context (its maximum length).

1. **Formats** (``--formats``): every linear layer (the output head included, embeddings float)
   in mxfp4 (e8m0 scale per 32), nvfp4 (e4m3 per 16 + float32 per tensor), mxfp8, beside uint4 g64
   RTN; perplexity and stored bits per weight of those layers (codes and scales, as stored).
2. **KV cache** (``--kv``): float cache against ``lowbit.KVCache`` fp8 e4m3 and int8 (one fp16
   scale per head per token): perplexity, increase over float, and cache bytes vs bf16 / fp32.
3. **Rotations** (``--rotation``): W4A4 (int4 weights per channel, 4-bit activations per token,
   every linear layer; embeddings float) by RTN and GPTQ, without and with ``rotation: hadamard``;
   the rotated increase over float as a share of plain RTN W4A4's (target <= 25%), for uint4
   asymmetric and int4 symmetric activations, and W4A8 for scale.
4. **Learned rounding** (``--rounding``): every linear layer of the transformer blocks (embeddings
   and head float) at int3 g128 and uint2 g64 (a fitted zero point) by RTN, GPTQ and AutoRound
   on the same calibration batches; AutoRound must beat GPTQ on both architectures.

Usage::

    python bench/frontier.py --arch gpt2 llama [--formats] [--kv] [--rotation] [--rounding]
        [--eval-batches 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import lowbit
from lowbit.eval.perplexity import perplexity
from lowbit.kvcache import WithKVCache
from lowbit.nn.qweight import QuantizedWeight
from lowbit.recipes import AutoRoundOptions, Recipe, WeightSpec
from lowbit.recipes.spec import ActivationSpec
from lowbit.zoo.tinylms import default_config, get_tiny_lm

FORMAT_ROWS = {
    "uint4 g64 asym (RTN)": dict(format="uint4", granularity="group:64", symmetric=False),
    "mxfp4 (g32, e8m0)": dict(format="mxfp4", granularity="group:32"),
    "nvfp4 (g16, e4m3 + fp32)": dict(format="nvfp4", granularity="group:16"),
    "mxfp8 (g32, e8m0)": dict(format="mxfp8", granularity="group:32"),
}


def _recipe(name: str, weight: dict[str, Any]) -> Recipe:
    return Recipe(name=name, weight=WeightSpec(**weight), modules=("linear",))


def _weight_bits(qmodel: torch.nn.Module) -> float:
    qws = [m for m in qmodel.modules() if isinstance(m, QuantizedWeight)]
    return sum(q.stored_bytes for q in qws) * 8 / sum(q.numel for q in qws)


def formats_table(zm: Any, base: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    print("| linear layers at | perplexity | vs float | stored bits / weight | quantize s |")
    print("|---|---:|---:|---:|---:|")
    for label, weight in FORMAT_ROWS.items():
        started = time.perf_counter()
        q = lowbit.quantize(zm.model, _recipe(label, weight), progress=False)
        seconds = time.perf_counter() - started
        ppl, bits = perplexity(q, zm.eval_data), _weight_bits(q)
        out[label] = {"ppl": ppl, "bits": bits, "seconds": seconds}
        print(f"| {label} | {ppl:.4f} | {(ppl / base - 1) * 100:+.2f}% | {bits:.3f} | {seconds:.1f} |")
    return out


def kv_table(zm: Any, base: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    print("| KV cache | perplexity | increase | cache bytes | vs bf16 | vs fp32 |")
    print("|---|---:|---:|---:|---:|---:|")
    for fmt in ("fp8_e4m3", "int8"):
        wrapped = WithKVCache(zm.model, fmt)
        ppl = perplexity(wrapped, zm.eval_data)
        cache = wrapped.last_cache
        assert cache is not None
        stored, bf16, fp32 = cache.stored_bytes(), cache.float_bytes(torch.bfloat16), cache.float_bytes()
        out[fmt] = {"ppl": ppl, "bytes": stored, "vs_bf16": stored / bf16, "vs_fp32": stored / fp32}
        print(
            f"| {fmt} | {ppl:.4f} | {(ppl / base - 1) * 100:+.3f}% | {stored:,} (last batch) | "
            f"{stored / bf16:.3f}x | {stored / fp32:.3f}x |"
        )
    return out


ACTIVATIONS = {
    "A4 uint4 asym": ActivationSpec(mode="dynamic", format="uint4", granularity="token", symmetric=False),
    "A4 int4 sym": ActivationSpec(mode="dynamic", format="int4", granularity="token", symmetric=True),
    "A8 uint8 asym": ActivationSpec(mode="dynamic", format="uint8", granularity="token", symmetric=False),
}


def rotation_table(zm: Any, base: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    print("| W4, activations | algorithm | plain | rotated | rotated increase / plain RTN increase | s |")
    print("|---|---|---:|---:|---:|---:|")
    for act_label, act in ACTIVATIONS.items():
        plain_rtn = None
        for algorithm in ("rtn", "gptq"):
            row = {}
            for rotation in ("none", "hadamard"):
                weight = WeightSpec(format="int4", granularity="channel", symmetric=True, algorithm=algorithm)
                recipe = Recipe(
                    name="w4", weight=weight, activation=act, modules=("linear",), rotation=rotation
                )
                started = time.perf_counter()
                data = zm.calibration if algorithm == "gptq" else None
                q = lowbit.quantize(zm.model, recipe, calibration=data, progress=False, kernels="reference")
                row[rotation] = (perplexity(q, zm.eval_data), time.perf_counter() - started)
            if plain_rtn is None:
                plain_rtn = row["none"][0]
            share = (row["hadamard"][0] - base) / (plain_rtn - base) * 100
            out[f"{act_label} {algorithm}"] = {
                "plain": row["none"][0],
                "rotated": row["hadamard"][0],
                "share": share,
            }
            print(
                f"| {act_label} | {algorithm} | {row['none'][0]:.4f} | {row['hadamard'][0]:.4f} | "
                f"{share:.1f}% | {row['none'][1]:.0f} / {row['hadamard'][1]:.0f} |"
            )
    return out


ROUNDING_GRIDS = {
    "int3 g128": dict(format="int3", granularity="group:128", symmetric=True),
    "uint2 g64 asym": dict(format="uint2", granularity="group:64", symmetric=False),
}


def rounding_table(zm: Any, base: float, steps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    head = _output_head(zm.model)
    print("| block linears at | RTN | GPTQ | AutoRound | AutoRound vs GPTQ | s (GPTQ / AutoRound) |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, grid in ROUNDING_GRIDS.items():
        row: dict[str, Any] = {}
        for algorithm in ("rtn", "gptq", "autoround"):
            recipe = Recipe(
                name=label,
                weight=WeightSpec(**grid, algorithm=algorithm),
                modules=("linear",),
                exclude=(head,),
                autoround=AutoRoundOptions(steps=steps),
            )
            started = time.perf_counter()
            data = zm.calibration if algorithm != "rtn" else None
            q = lowbit.quantize(zm.model, recipe, calibration=data, progress=False, kernels="reference")
            row[algorithm] = {"ppl": perplexity(q, zm.eval_data), "seconds": time.perf_counter() - started}
        out[label] = row
        ppl = {k: v["ppl"] for k, v in row.items()}
        print(
            f"| {label} | {ppl['rtn']:.4f} | {ppl['gptq']:.4f} | {ppl['autoround']:.4f} | "
            f"{(ppl['autoround'] / ppl['gptq'] - 1) * 100:+.2f}% | "
            f"{row['gptq']['seconds']:.0f} / {row['autoround']['seconds']:.0f} |"
        )
    return out


def _output_head(model: torch.nn.Module) -> str:
    """The name of the linear layer that produces the logits (kept float in the rounding table)."""
    out = model.get_output_embeddings()
    return next(name for name, m in model.named_modules() if m is out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", default=["gpt2", "llama"])
    parser.add_argument("--text", default="/work/shared/data/tinyshakespeare.txt")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--eval-batches", type=int, default=32)
    parser.add_argument("--formats", action="store_true")
    parser.add_argument("--kv", action="store_true")
    parser.add_argument("--rotation", action="store_true")
    parser.add_argument("--rounding", action="store_true")
    parser.add_argument("--steps", type=int, default=200, help="AutoRound steps per block")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not (args.formats or args.kv or args.rotation or args.rounding):
        args.formats = args.kv = args.rotation = args.rounding = True
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results: dict[str, Any] = {}
    for arch in args.arch:
        cfg = default_config(arch, d_model=args.d_model)
        zm = get_tiny_lm(arch, args.text, cfg, max_eval_batches=args.eval_batches)
        base = perplexity(zm.model, zm.eval_data)
        print(f"\n## {arch}: {zm.description}; float perplexity {base:.4f}, {len(zm.eval_data)} batches\n")
        results[arch] = {"float_ppl": base}
        if args.formats:
            results[arch]["formats"] = formats_table(zm, base)
            print()
        if args.kv:
            results[arch]["kv"] = kv_table(zm, base)
            print()
        if args.rotation:
            results[arch]["rotation"] = rotation_table(zm, base)
            print()
        if args.rounding:
            results[arch]["rounding"] = rounding_table(zm, base, args.steps)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
