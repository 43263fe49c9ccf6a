"""Onloading a checkpoint about 2x larger than the memory budget: peak RSS, time, preflight vs measured.

Issue 21's bench: a Llama-style ``LlamaForCausalLM`` (random init, seeded; the memory and time do
not depend on the values) is generated and saved as safetensors shards in a temporary directory
(never committed), then quantized ``int4-gptq`` with ``lowbit.quantize_checkpoint(...,
max_memory=budget)``, the budget being ``--budget-ratio`` (default 0.5) of the float model's
bytes. Each step runs in its own child process, so that its peak RSS is its own: ``VmHWM`` reset
through ``/proc/self/clear_refs`` after torch, transformers and lowbit are imported and the
calibration batches built, minus the RSS at that moment (the same baseline the preflight's
prediction is relative to). Reported: the preflight's prediction and its largest phase, the
measured peak (and per stage), wall time, and with ``--compare`` the in-memory path
(``from_pretrained``, ``lowbit.quantize(..., inplace=True)``, ``lowbit.save``): its peak, its time,
and whether the two artifacts are byte-identical.

Default size (48 blocks of width 512, FFN 1408, vocabulary 8192: 169.9M parameters, 648 MiB in
float32, budget 324 MiB), 32 calibration sequences of 256 tokens in batches of 2.

Usage::

    python bench/onload.py                     # the run (a few minutes on 2 cores)
    python bench/onload.py --compare --json figures.json
    python bench/onload.py --layers 8 --seqs 8 # seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 2**20


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def generate(args: argparse.Namespace, directory: Path) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seq_len, 128),
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory, max_shard_size=args.shard)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "float_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "shards": len(list(directory.glob("*.safetensors"))),
    }


def run(args: argparse.Namespace, mode: str, directory: Path, out: Path) -> dict:
    """Quantize in this (child) process and measure it."""
    import torch
    import transformers

    import lowbit
    from lowbit.ptq import onload, pipeline, preflight  # noqa: F401  (imported before the baseline)

    transformers.LlamaForCausalLM  # noqa: B018  (transformers imports its model code lazily)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed + 1)
    tokens = torch.randint(0, args.vocab, (args.seqs, args.seq_len), generator=g)
    batches = list(tokens.split(args.batch))
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: this run's peak alone
    baseline = _status("VmRSS")
    started = time.perf_counter()
    figures: dict = {"mode": mode}
    if mode == "onload":
        done = lowbit.quantize_checkpoint(
            directory, args.recipe, batches, out, max_memory=args.budget, progress=not args.no_progress
        )
        p = done.preflight
        figures.update(
            predicted_peak_bytes=p.peak_bytes,
            predicted_phase=p.phase,
            preflight=p.report(),
            cache_bytes=p.cache_bytes,
            stages=[
                {"name": s.name, "seconds": s.seconds, "peak_bytes": s.peak_memory_bytes - baseline}
                for s in done.model.lowbit_calibration.stages
            ],
        )
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
        q = lowbit.quantize(model, args.recipe, batches, inplace=True, progress=not args.no_progress)
        lowbit.save(q, out)
    figures["seconds"] = time.perf_counter() - started
    figures["baseline_rss_bytes"] = baseline
    figures["peak_above_baseline_bytes"] = _status("VmHWM") - baseline
    figures["load_average"] = os.getloadavg()[0]
    return figures


def _child(argv: list[str], step: str, *extra: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "figures.json"
        paths = [str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
        subprocess.run(
            [sys.executable, __file__, *argv, f"--step={step}", f"--result={result}", *extra],
            check=True,
            env=env,
        )
        return json.loads(result.read_text())


def report(r: dict) -> str:
    g, o = r["model"], r["onload"]
    lines = [
        f"LlamaForCausalLM hidden {r['hidden']}, {r['layers']} layers, FFN {r['ffn']}, vocab {r['vocab']}: "
        f"{g['parameters'] / 1e6:.1f}M parameters, {g['float_bytes'] / MIB:.0f} MiB float in "
        f"{g['shards']} shards",
        f"calibration {r['seqs']} x {r['seq_len']} tokens in batches of {r['batch']}; {r['recipe']}; "
        f"{r['threads']} threads; budget {r['budget'] / MIB:.0f} MiB "
        f"({r['budget'] / g['float_bytes']:.2f}x the model)",
        "",
        o["preflight"],
        "",
        f"onloaded: {o['seconds']:.1f} s, peak RSS {o['peak_above_baseline_bytes'] / MIB:.0f} MiB above the "
        f"baseline ({o['baseline_rss_bytes'] / MIB:.0f} MiB: Python, torch, transformers, lowbit); predicted "
        f"{o['predicted_peak_bytes'] / MIB:.0f} MiB at the {o['predicted_phase']}: measured / predicted "
        f"{o['peak_above_baseline_bytes'] / o['predicted_peak_bytes']:.2f}; peak / float model "
        f"{o['peak_above_baseline_bytes'] / g['float_bytes']:.2f}x; load average {o['load_average']:.1f}",
    ]
    stages = o["stages"]
    if stages:
        peaks = [s["peak_bytes"] / MIB for s in stages]
        secs = [s["seconds"] for s in stages]
        lines.append(
            f"  {len(stages)} stages: {min(secs):.1f}-{max(secs):.1f} s each, peak "
            f"{min(peaks):.0f}-{max(peaks):.0f} MiB (highest in {stages[peaks.index(max(peaks))]['name']})"
        )
    if "reference" in r:
        ref = r["reference"]
        lines.append(
            f"in memory: {ref['seconds']:.1f} s, peak RSS {ref['peak_above_baseline_bytes'] / MIB:.0f} MiB "
            f"above its baseline; artifacts byte-identical: {r['identical']}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--ffn", type=int, default=1408)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seqs", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2, help="sequences per calibration batch")
    parser.add_argument("--recipe", default="int4-gptq")
    parser.add_argument(
        "--budget-ratio", type=float, default=0.5, help="max_memory / the float model's bytes"
    )
    parser.add_argument("--shard", default="100MB", help="max_shard_size of the generated checkpoint")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compare", action="store_true", help="also quantize in memory and compare the bytes"
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # internal: generate | onload | reference
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        work = Path(args.dir)
        if args.step == "generate":
            figures = generate(args, work / "checkpoint")
        else:
            figures = run(args, args.step, work / "checkpoint", work / args.step)
        Path(args.result).write_text(json.dumps(figures))
        return
    keys = (
        "hidden",
        "layers",
        "ffn",
        "heads",
        "vocab",
        "seqs",
        "seq_len",
        "batch",
        "recipe",
        "shard",
        "threads",
        "seed",
    )
    argv = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in keys] + [
        "--no-progress"
    ] * args.no_progress
    with tempfile.TemporaryDirectory(prefix="lowbit-onload-bench-") as tmp:
        work = ["--dir", tmp]
        model = _child(argv, "generate", *work)
        budget = int(model["float_bytes"] * args.budget_ratio)
        figures = {
            k: getattr(args, k) for k in ("hidden", "layers", "ffn", "vocab", "seqs", "seq_len", "batch")
        }
        figures.update(recipe=args.recipe, threads=args.threads, budget=budget, model=model)
        figures["onload"] = _child(argv, "onload", *work, f"--budget={budget}")
        if args.json:  # kept if the comparison below is interrupted
            Path(args.json).write_text(json.dumps(figures, indent=1))
        if args.compare:
            figures["reference"] = _child(argv, "reference", *work)
            figures["identical"] = all(
                (Path(tmp) / "onload" / f).read_bytes() == (Path(tmp) / "reference" / f).read_bytes()
                for f in ("model.safetensors", "lowbit.json", "lowbit.sha256")
            )
    print(report(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
