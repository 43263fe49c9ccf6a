"""Child process for tests/test_onload.py and bench/onload.py: quantize a checkpoint directory in
memory (``reference``) or with onloading (``onload``), save the artifact, and write what it
measured (JSON): the process's peak RSS above its RSS just before the work (``VmHWM`` after
resetting it through ``/proc/self/clear_refs``; the work starts with torch, transformers and
lowbit imported and the calibration batches built).

    python tests/onload_child.py MODE CHECKPOINT RECIPE OUT FIGURES [--max-memory N] [--batches B]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["onload", "reference"])
    parser.add_argument("checkpoint")
    parser.add_argument("recipe")
    parser.add_argument("out")
    parser.add_argument("figures")
    parser.add_argument("--max-memory", type=int, default=None)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()

    import torch
    import transformers

    import lowbit
    from lowbit.ptq import onload, pipeline, preflight  # noqa: F401  (imported before the baseline)

    transformers.AutoModelForCausalLM, transformers.LlamaForCausalLM  # noqa: B018  (lazy imports, before the baseline)

    if args.threads:
        torch.set_num_threads(args.threads)
    vocab = json.loads((Path(args.checkpoint) / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab, (args.batch, args.seq_len), generator=g) for _ in range(args.batches)]
    gc.collect()
    try:  # the high-water mark of this run alone (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    baseline = status("VmRSS")
    started = time.perf_counter()
    figures: dict = {"mode": args.mode, "hwm_reset": reset}
    if args.mode == "onload":
        done = lowbit.quantize_checkpoint(
            args.checkpoint,
            args.recipe,
            batches,
            args.out,
            max_memory=args.max_memory,
            progress=args.progress,
        )
        figures["predicted_peak_bytes"] = done.preflight.peak_bytes
        figures["predicted_phase"] = done.preflight.phase
        figures["reported_peak_bytes"] = done.peak_memory_bytes
        figures["float_bytes"] = done.preflight.float_bytes
        if hasattr(done.model, "lowbit_calibration"):
            stages = done.model.lowbit_calibration.stages
            figures["stage_peaks"] = [s.peak_memory_bytes - baseline for s in stages]
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.checkpoint).eval()
        q = lowbit.quantize(model, args.recipe, batches, inplace=True, progress=args.progress)
        lowbit.save(q, args.out)
    figures["seconds"] = time.perf_counter() - started
    figures["baseline_rss_bytes"] = baseline
    figures["peak_rss_bytes"] = status("VmHWM")
    figures["peak_above_baseline_bytes"] = status("VmHWM") - baseline
    Path(args.figures).write_text(json.dumps(figures))


if __name__ == "__main__":
    sys.exit(main())
