"""GGUF files from lowbit, run by llama.cpp (through llama-cpp-python), against llama.cpp's own
quantizer, in one run (issue 18).

For a GPT-2-style and a Llama-style byte-level LM trained on tinyshakespeare (``lowbit.zoo``,
width 256 so the K-quants' 256-blocks fit), on the held-out text:

* lowbit's perplexity of the float model (PyTorch);
* for each file: llama.cpp's perplexity, lowbit's perplexity of the same file (``load_gguf``),
  their gap, the logits cosine between llama.cpp and lowbit on one window, and the mean KL
  divergence of llama.cpp's predictions from the float model's (what quantization cost);
* files: lowbit RTN and GPTQ at Q4_0 and Q8_0 (head Q6_K / Q8_0 as llama.cpp's mix), lowbit
  Q4_K and Q6_K (with and without imatrix), and llama.cpp's own ``llama_model_quantize`` of the
  F16 file to Q4_0 / Q4_K_M / Q8_0, the same model quantized by the tool users would pick.

    .venv/bin/python bench/gguf_llama_cpp.py [--text ../shared/data/tinyshakespeare.txt] [--windows 64]

Needs ``pip install gguf llama-cpp-python`` (llama-cpp-python builds from source, ~16 min).
"""

from __future__ import annotations

import argparse
import ctypes
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lowbit.eval.perplexity import perplexity
from lowbit.interop.gguf_export import export_gguf
from lowbit.interop.gguf_import import load_gguf
from lowbit.zoo.tinylms import default_config, get_tiny_lm

ROOT = Path(__file__).resolve().parents[1]


def llama_cpp_nll(path: Path, windows: list[list[int]], threads: int = 2) -> tuple[float, np.ndarray]:
    """llama.cpp's perplexity over ``windows`` (each predicted from its own start) and its logits
    ``[windows, tokens, vocab]``."""
    import llama_cpp

    n = len(windows[0])
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=n, n_batch=n, logits_all=True, verbose=False, n_threads=threads
    )
    total, count, every = 0.0, 0, []
    for w in windows:
        llm.reset()
        llm.eval(w)
        logits = np.array(llm.scores[:n], dtype=np.float64)
        every.append(logits.astype(np.float32))
        z = logits[:-1]
        lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
        total += float((lse - z[np.arange(n - 1), w[1:]]).sum())
        count += n - 1
    del llm
    return math.exp(total / count), np.stack(every)


def mean_kl(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean per-token KL(reference || other) of two logit arrays ``[..., vocab]`` (llama.cpp's
    KLD statistic: at 4+ bits perplexity moves by noise, the divergence from float does not)."""

    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z.astype(np.float64) - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    p, q = log_softmax(reference), log_softmax(other)
    return float((np.exp(p) * (p - q)).sum(-1).mean())


def llama_cpp_quantize(src: Path, dst: Path, ftype_name: str) -> None:
    """llama.cpp's own quantizer (llama-quantize's library call) on ``src``."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({ftype_name}) failed with {rc}")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", default=str(ROOT.parent / "shared/data/tinyshakespeare.txt"))
    ap.add_argument("--windows", type=int, default=64, help="held-out windows of 128 bytes (default 64)")
    ap.add_argument("--archs", default="gpt2,llama")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="lowbit-gguf-"))
    rows = []
    for arch in args.archs.split(","):
        zm = get_tiny_lm(arch, args.text, config=default_config(arch, d_model=256))
        model, cal = zm.model.eval(), zm.calibration
        eval_rows = torch.cat([b["input_ids"] for b in zm.eval_data])[: args.windows]
        windows = [r.tolist() for r in eval_rows]
        eval_batches = [{"input_ids": eval_rows[i : i + 16]} for i in range(0, len(eval_rows), 16)]
        float_ppl = perplexity(model, eval_batches)
        with torch.no_grad():
            float_logits = np.concatenate([model(**b).logits.numpy() for b in eval_batches])
        rows.append(
            (arch, "float (PyTorch)", "-", float("nan"), float_ppl, float("nan"), float("nan"), 0.0, 0.0)
        )
        files: list[tuple[str, Path, float]] = []
        for label, qtype, kw in [
            ("F16", "F16", {}),
            ("lowbit RTN Q8_0", "Q8_0", {}),
            ("lowbit GPTQ Q8_0", "Q8_0", {"algorithm": "gptq", "calibration": cal}),
            ("lowbit RTN Q4_0", "Q4_0", {}),
            ("lowbit GPTQ Q4_0", "Q4_0", {"algorithm": "gptq", "calibration": cal}),
            ("lowbit Q4_K", "Q4_K", {}),
            ("lowbit Q4_K imatrix", "Q4_K", {"imatrix": True, "calibration": cal}),
            ("lowbit Q6_K", "Q6_K", {}),
        ]:
            path = out / f"{arch}-{label.replace(' ', '_')}.gguf"
            started = time.perf_counter()
            export_gguf(model, path, qtype, progress=False, **kw)  # type: ignore[arg-type]
            files.append((label, path, time.perf_counter() - started))
        f16 = files[0][1]
        for name in ("Q8_0", "Q4_0", "Q4_K_M"):
            path = out / f"{arch}-llamacpp-{name}.gguf"
            started = time.perf_counter()
            llama_cpp_quantize(f16, path, name)
            files.append((f"llama.cpp quantize {name}", path, time.perf_counter() - started))
        for label, path, seconds in files:
            ppl_cpp, logits_cpp = llama_cpp_nll(path, windows)
            back = load_gguf(path, kernels="reference")
            ppl_lowbit = perplexity(back, eval_batches)
            with torch.no_grad():
                mine = back(torch.tensor([windows[0]])).logits[0].numpy()
            size = path.stat().st_size
            gap = ppl_cpp / ppl_lowbit - 1
            kl = mean_kl(float_logits, logits_cpp)
            row = (
                arch,
                label,
                f"{size:,}",
                ppl_cpp,
                ppl_lowbit,
                gap,
                cosine(mine, logits_cpp[0]),
                kl,
                seconds,
            )
            rows.append(row)
            print(f"{arch} {label}: llama.cpp ppl {ppl_cpp:.4f}, lowbit {ppl_lowbit:.4f}", file=sys.stderr)
    head = (
        "arch  | file                       | bytes      | llama.cpp ppl | lowbit ppl | gap     | logits cos "
        "| KL vs float (llama.cpp) | export s"
    )
    print(head)
    print("-" * len(head))
    for arch, label, size, pc, pl, gap, cos, kl, sec in rows:
        cells = f"{arch:5} | {label:26} | {size:>10} | {pc:13.4f} | {pl:10.4f} | {gap:+7.2%} | {cos:10.6f}"
        print(f"{cells} | {kl:23.6f} | {sec:8.1f}")
    print(f"(files in {out}; {len(windows)} held-out windows of {len(windows[0])} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
