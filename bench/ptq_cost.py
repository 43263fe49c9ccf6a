"""Cost of data-aware PTQ on a ~100M-parameter Llama: wall time, peak RSS, forward passes.

Issue 14's cost point: a Llama-style ``LlamaForCausalLM`` (random init, seeded; the cost does not
depend on the weights' values), 128 calibration sequences of 512 random tokens, the ``int4-gptq``
preset through ``lowbit.quantize(..., inplace=True)`` on 2 cores. The quantization runs in a
child process so that its peak RSS (``VmHWM``) belongs to this run alone. Reported:

- wall time of ``lowbit.quantize`` and of each pipeline stage (``StageReport.seconds``);
- peak RSS as a ratio to the float model's bytes, both whole (``VmHWM / float bytes``) and above
  what the process held before the model was built (torch and transformers imported);
- forward passes: calls of the model's own forward, and runs of each stage.

Default size (134.1M parameters, 512 MiB in float32): hidden 768, 12 layers, FFN 2048, 12 heads,
vocabulary 32000, untied head (the embeddings and head are 49M of it; the 12 blocks 85M).
Calibration batches of 2 sequences: the probe pass's logits (batch x 512 x 32000 floats) stay
at 125 MiB.

Usage::

    python bench/ptq_cost.py                 # the full run (minutes)
    python bench/ptq_cost.py --quick         # 4 layers of 256, 32 x 128 tokens (seconds)
    python bench/ptq_cost.py --layers 4 --seqs 32 --preset int4-awq --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUICK = dict(hidden=256, layers=4, ffn=688, heads=4, vocab=4096, seqs=32, seq_len=128)


def _status_bytes(key: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def matmul_gflops(seconds: float = 1.0) -> float:
    """What the machine delivers right now on a float32 matmul of a block's size (other sessions
    share the cores, so the run's time is best read against this)."""
    import torch

    x, w = torch.randn(1024, 768), torch.randn(2048, 768)
    x @ w.T
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        x @ w.T
        count += 1
    return 2 * 1024 * 768 * 2048 * count / (time.perf_counter() - started) / 1e9


def child(args: argparse.Namespace) -> dict:
    """Build the model, quantize it, return the figures (runs in its own process)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import lowbit

    torch.set_num_threads(args.threads)
    rss_start = _status_bytes("VmRSS")
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
    model = LlamaForCausalLM(config).eval()
    params = sum(p.numel() for p in model.parameters())
    float_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    rss_model = _status_bytes("VmRSS")
    g = torch.Generator().manual_seed(args.seed + 1)
    tokens = torch.randint(0, args.vocab, (args.seqs, args.seq_len), generator=g)
    batches = list(tokens.split(args.batch))

    speed_before, load_before = matmul_gflops(), os.getloadavg()[0]
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    started = time.perf_counter()
    q = lowbit.quantize(
        model,
        args.preset,
        calibration=batches,
        inplace=True,
        progress=not args.no_progress,
        cache_bytes=args.cache_bytes,
    )
    seconds = time.perf_counter() - started
    peak = _status_bytes("VmHWM")
    speed_after, load_after = matmul_gflops(), os.getloadavg()[0]
    result = q.lowbit_calibration
    return {
        "config": {k: getattr(args, k) for k in ("hidden", "layers", "ffn", "heads", "vocab", "preset")},
        "calibration": {"sequences": args.seqs, "tokens": args.seq_len, "batch": args.batch},
        "threads": torch.get_num_threads(),
        "parameters": params,
        "float_bytes": float_bytes,
        "rss_start_bytes": rss_start,
        "rss_model_bytes": rss_model,
        "peak_rss_bytes": peak,
        "rss_end_bytes": _status_bytes("VmRSS"),
        "seconds": seconds,
        "model_forward_calls": calls[0],
        "model_passes": result.model_passes,
        "stages": [
            {
                "name": s.name,
                "layers": s.layers,
                "runs": s.runs,
                "seconds": s.seconds,
                "peak_memory_bytes": s.peak_memory_bytes,
                "cached_bytes": s.cached_bytes,
                "spilled_bytes": s.spilled_bytes,
                "stats_bytes": s.stats_bytes,
                "stats_seconds": getattr(s, "stats_seconds", 0.0),  # older pipelines lack them
                "quantize_seconds": getattr(s, "quantize_seconds", 0.0),
            }
            for s in result.stages
        ],
        "bits_per_param": lowbit.size_report(q).bits_per_param,
        "matmul_gflops": [speed_before, speed_after],
        "load_average": [load_before, load_after],
    }


def report(r: dict) -> str:
    mib = 2**20
    fb = r["float_bytes"]
    c, cal = r["config"], r["calibration"]
    lines = [
        f"LlamaForCausalLM hidden {c['hidden']}, {c['layers']} layers, FFN {c['ffn']}, {c['heads']} heads, "
        f"vocab {c['vocab']}: {r['parameters'] / 1e6:.1f}M parameters, {fb / mib:.0f} MiB float",
        f"calibration {cal['sequences']} x {cal['tokens']} tokens in batches of {cal['batch']}; "
        f"preset {c['preset']}; {r['threads']} threads",
        f"quantize: {r['seconds']:.1f} s, {r['bits_per_param']:.2f} bits / parameter; the machine: "
        f"{r['matmul_gflops'][0]:.0f} / {r['matmul_gflops'][1]:.0f} GFLOPS on a float32 matmul, load "
        f"{r['load_average'][0]:.1f} / {r['load_average'][1]:.1f} (before / after)",
        f"RSS: before the model {r['rss_start_bytes'] / mib:.0f} MiB, with the model "
        f"{r['rss_model_bytes'] / mib:.0f} MiB, peak {r['peak_rss_bytes'] / mib:.0f} MiB, "
        f"end {r['rss_end_bytes'] / mib:.0f} MiB",
        f"peak / float model: {r['peak_rss_bytes'] / fb:.2f}x whole, "
        f"{(r['peak_rss_bytes'] - r['rss_start_bytes']) / fb:.2f}x above the RSS before the model",
        f"forward passes: the model's forward called {r['model_forward_calls']} times "
        f"({r['model_passes']} passes over the batches, plus the one-batch probe); "
        f"{len(r['stages'])} stages",
        "",
        "| stage | layers | runs | s | of which statistics | modifiers | peak MiB | cached MiB | spilled MiB "
        "| stats MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in r["stages"]:
        lines.append(
            f"| {s['name']} | {s['layers']} | {s['runs']} | {s['seconds']:.1f} | {s['stats_seconds']:.1f} | "
            f"{s['quantize_seconds']:.1f} | "
            f"{s['peak_memory_bytes'] / mib:.0f} | {s['cached_bytes'] / mib:.0f} | "
            f"{s['spilled_bytes'] / mib:.0f} | {s['stats_bytes'] / mib:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seqs", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2, help="sequences per calibration batch")
    parser.add_argument("--preset", default="int4-gptq")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-bytes", type=int, default=None, help="activation budget (default: lowbit's)")
    parser.add_argument("--quick", action="store_true", help="a small model and few tokens (seconds)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: write the figures to this file
    args = parser.parse_args()
    if args.quick:
        for key, value in QUICK.items():
            if parser.get_default(key) == getattr(args, key):
                setattr(args, key, value)
    if args.child:
        Path(args.child).write_text(json.dumps(child(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "figures.json"
        argv = [a for a in sys.argv[1:] if a != "--quick"]
        fixed = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in QUICK]
        paths = [str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
        subprocess.run([sys.executable, __file__, *argv, *fixed, f"--child={out}"], check=True, env=env)
        figures = json.loads(out.read_text())
    print(report(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
