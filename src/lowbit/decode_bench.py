"""``lowbit bench decode``: greedy decode tokens/s of a Llama-style model, every variant in one run.

A random-init ``LlamaForCausalLM`` (the size is set by flags; the default is 168M parameters:
hidden 1024, 8 layers, FFN 2816, vocab 32000) runs transformers' ``generate`` with its KV cache as
PyTorch fp32 and bf16, lowbit int8 / int4 (RTN and GPTQ weights) on the kernels this machine chose,
and torchao's int8 / int4 weight-only (when installed), timed interleaved, medians of repeats.

The decode rate excludes the prompt: ``batch * (N - 1) / (t(generate N) - t(generate 1))``. Each row
also shows the weight bytes one decode step reads (stored bytes of every linear layer, the output
head included) and its share of the bytes-moved limit: steps/s x bytes per step / the read
bandwidth measured in the same run. Fidelity is the cosine of the next-token logits with fp32's
over a teacher-forced prompt.

>>> cfg = DecodeConfig(hidden=64, layers=1, ffn=128, vocab=256, heads=4, prompt=4, new_tokens=3,
...                    batches=(1,), repeats=1, variants=("fp32", "lowbit int8"))
>>> report = run(cfg)  # doctest: +SKIP
>>> [r.variant for r in report.rows]  # doctest: +SKIP
['PyTorch fp32', 'lowbit int8-weight-only']
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

VARIANTS = (
    "fp32", "bf16", "lowbit int8", "lowbit int4", "lowbit int4 g32", "lowbit int4 gptq", "torchao int8",
    "torchao int4",
)  # fmt: skip
FIDELITY = "int4-weight-only g32, embeddings and head int8"  # a label: the recipe is built by _recipe
LOWBIT_RECIPES = {
    "lowbit int8": "int8-weight-only",
    "lowbit int4": "int4-weight-only",
    "lowbit int4 g32": FIDELITY,
    "lowbit int4 gptq": "int4-gptq",
}


def _recipe(label: str) -> Any:
    """The recipe behind a ``LOWBIT_RECIPES`` label: a preset, or ``int4-weight-only`` in groups of
    32 with int8 embeddings and head (the fidelity row: random Gaussian weights lose the most at 4
    bits, and the head's error reaches every logit)."""
    if label != FIDELITY:
        return label
    from dataclasses import replace

    from lowbit.recipes import resolve

    base = resolve("int4-weight-only")
    return replace(base, weight=replace(base.weight, granularity="group:32"), embeddings_and_head="int8")


@dataclass
class DecodeConfig:
    """Model size, workload and what to measure."""

    hidden: int = 1024
    layers: int = 8
    ffn: int = 2816
    vocab: int = 32000
    heads: int = 16
    kv_heads: int | None = None
    prompt: int = 32
    new_tokens: int = 32
    batches: tuple[int, ...] = (1, 8)
    threads: int | None = None
    repeats: int = 3
    variants: tuple[str, ...] = VARIANTS
    seed: int = 0


@dataclass
class DecodeRow:
    variant: str
    batch: int
    tokens_per_s: float | None
    vs_fp32: float | None
    bytes_per_step: int
    limit_share: float | None
    cosine: float | None
    backend: str
    note: str = ""


@dataclass
class DecodeReport:
    config: DecodeConfig
    parameters: int
    bandwidth_gbs: float
    cpu: dict[str, Any]
    rows: list[DecodeRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "parameters": self.parameters,
            "bandwidth_gbs": self.bandwidth_gbs,
            "cpu": self.cpu,
            "rows": [asdict(r) for r in self.rows],
            "notes": list(self.notes),
        }

    def to_markdown(self) -> str:
        from lowbit.report.table import markdown_table

        c, cpu = self.config, self.cpu
        names = ("avx2", "avx512", "vnni", "bf16", "amx", "neon")
        flags = ", ".join(k for k in names if cpu.get(k)) or "none"
        head = [
            "variant", "batch", "tokens/s", "vs fp32", "weight MB / step", "of bytes limit", "logits cosine",
            "backend",
        ]  # fmt: skip
        rows = [
            [
                r.variant + (f" — {r.note}" if r.note else ""),
                str(r.batch),
                "" if r.tokens_per_s is None else f"{r.tokens_per_s:.1f}",
                "" if r.vs_fp32 is None else f"{r.vs_fp32:.2f}x",
                f"{r.bytes_per_step / 1e6:.1f}",
                "" if r.limit_share is None else f"{r.limit_share:.0%}",
                "" if r.cosine is None else f"{r.cosine:.4f}",
                r.backend,
            ]
            for r in self.rows
        ]
        lines = [
            f"## lowbit bench decode ({self.parameters / 1e6:.1f}M parameters)",
            "",
            f"Llama-style, hidden {c.hidden}, {c.layers} layers, FFN {c.ffn}, vocab {c.vocab}, random init; "
            f"prompt {c.prompt} tokens, {c.new_tokens} new tokens, greedy, KV cache. CPU: {cpu.get('model')} "
            f"({flags}), {self.config.threads} threads; read bandwidth {self.bandwidth_gbs:.1f} GB/s; "
            f"median of {c.repeats} interleaved repeats; decode rate excludes the prompt.",
            "",
            markdown_table(head, rows),
        ]
        lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def build_model(cfg: DecodeConfig) -> nn.Module:
    """The random-init Llama model ``cfg`` describes (eval mode, seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        hidden_size=cfg.hidden,
        intermediate_size=cfg.ffn,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads or cfg.heads,
        vocab_size=cfg.vocab,
        max_position_embeddings=max(2048, cfg.prompt + cfg.new_tokens + 8),
    )
    return LlamaForCausalLM(config).eval()


def read_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Memory read bandwidth in GB/s: the median time to sum a buffer far larger than the caches.

    >>> read_bandwidth(mib=8, repeats=2) > 0
    True
    """
    buf = torch.ones(mib * (1 << 20) // 4)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - start)
    return buf.numel() * 4 / statistics.median(times[1:]) / 1e9


def weight_bytes_per_step(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every linear layer's stored weight (quantized or
    float), the output head included; embeddings read one row per token and are left out."""
    from lowbit.nn.layers import QuantizedLinear

    total = 0
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            total += m.qweight.stored_bytes
        elif isinstance(m, nn.Linear):
            w = m.weight
            inner = getattr(w, "tensor_impl", None) or getattr(w, "original_weight_tensor", None)
            if inner is not None or type(w).__name__ not in ("Parameter", "Tensor"):
                total += _subclass_bytes(w)
            else:
                total += w.numel() * w.element_size()
    return total


def _subclass_bytes(t: Any) -> int:
    """Stored bytes of a tensor subclass (torchao): the plain tensors it flattens to."""
    try:
        names, _ = t.__tensor_flatten__()
    except (AttributeError, TypeError):
        return t.numel() * t.element_size()
    return sum(_subclass_bytes(getattr(t, n)) for n in names)


def _generate(model: nn.Module, ids: torch.Tensor, n: int) -> Callable[[], None]:
    def call() -> None:
        with torch.inference_mode():
            model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, pad_token_id=0,
            )  # fmt: skip

    return call


def _cosine(
    model: nn.Module, ids: torch.Tensor, reference: torch.Tensor | None
) -> tuple[float, torch.Tensor]:
    with torch.inference_mode():
        logits = model(ids).logits.float().flatten(0, 1)
    if reference is None:
        return 1.0, logits
    return float(nn.functional.cosine_similarity(logits, reference, dim=-1).mean()), logits


def _torchao(model: nn.Module, bits: int) -> tuple[nn.Module, str]:
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    m = copy.deepcopy(model).to(torch.bfloat16)
    if bits == 8:
        quantize_(m, Int8WeightOnlyConfig())
        return m, "torchao int8 weight-only, bf16 model"
    quantize_(m, Int4WeightOnlyConfig(group_size=128))  # its default packing for this device
    return m, "torchao int4 g128, bf16 model"


def _build(
    cfg: DecodeConfig, model: nn.Module, name: str, calib: list[torch.Tensor]
) -> tuple[nn.Module, str, str]:
    """(model, backend label, note) for one variant."""
    import lowbit

    if name == "fp32":
        return model, "pytorch-float32", ""
    if name == "bf16":
        return copy.deepcopy(model).to(torch.bfloat16), "pytorch-bfloat16", ""
    if name in LOWBIT_RECIPES:
        label = LOWBIT_RECIPES[name]
        recipe = _recipe(label)
        data = calib if label.endswith("gptq") or recipe is not label else None  # int8 edges find the head
        q = lowbit.quantize(model, recipe, calibration=data, progress=False)
        from lowbit.backends import kernel_summary

        return q, kernel_summary(q.lowbit_kernels).removeprefix("kernels: "), label
    if name.startswith("torchao"):
        m, note = _torchao(model, 8 if name.endswith("int8") else 4)
        return m, "torchao", note
    raise ValueError(f"unknown decode variant {name!r}; known: {', '.join(VARIANTS)}")


def run(cfg: DecodeConfig, progress: bool = True) -> DecodeReport:
    """Measure every variant of ``cfg`` in one run (see the module docstring)."""
    import sys

    from lowbit.doctor import cpu_features
    from lowbit.runtime import default_threads

    cfg.threads = cfg.threads or default_threads()
    torch.set_num_threads(cfg.threads)
    model = build_model(cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    params = sum(p.numel() for p in model.parameters())
    report = DecodeReport(cfg, params, read_bandwidth(), asdict(cpu_features()))
    calib = [torch.randint(0, cfg.vocab, (1, 128), generator=gen) for _ in range(4)]
    fidelity_ids = torch.randint(0, cfg.vocab, (1, 64), generator=gen)
    built: dict[str, tuple[nn.Module, str, str]] = {}
    for name in cfg.variants:
        if progress:
            print(f"lowbit bench decode: preparing {name}", file=sys.stderr)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                built[name] = _build(cfg, model, name, calib)
        except ImportError as err:
            report.notes.append(f"{name}: not installed ({err.name or err})")
        except Exception as err:  # a competing tool failing is reported, not fatal
            report.notes.append(f"{name}: failed ({type(err).__name__}: {str(err).splitlines()[0][:160]})")
    report.notes.append("llama.cpp rows need GGUF export of the same weights (issue 18)")
    reference = None
    cosines: dict[str, float] = {}
    for name, (m, _, _) in built.items():
        cosines[name], logits = _cosine(m, fidelity_ids, reference)
        if reference is None:
            reference = logits
    for batch in cfg.batches:
        ids = torch.randint(1, cfg.vocab, (batch, cfg.prompt), generator=gen)
        calls = {}
        for name, (m, _, _) in built.items():
            calls[(name, "n")] = _generate(m, ids, cfg.new_tokens)
            calls[(name, "1")] = _generate(m, ids, 1)
            calls[(name, "1")]()  # warm-up (first-call allocations, kernel caches)
        samples: dict[Any, list[float]] = {k: [] for k in calls}
        for _ in range(cfg.repeats):
            for key, call in calls.items():
                start = time.perf_counter()
                call()
                samples[key].append(time.perf_counter() - start)
        rates = {}
        for name in built:
            decode = statistics.median(samples[(name, "n")]) - statistics.median(samples[(name, "1")])
            rates[name] = batch * (cfg.new_tokens - 1) / decode if decode > 0 else None
        base = rates.get("fp32")
        for name, (m, backend, note) in built.items():
            rate = rates[name]
            step_bytes = weight_bytes_per_step(m)
            share = None if rate is None else rate / batch * step_bytes / (report.bandwidth_gbs * 1e9)
            report.rows.append(
                DecodeRow(
                    _label(name, note), batch, rate, None if not (rate and base) else rate / base,
                    step_bytes, share, cosines[name], backend,
                )
            )  # fmt: skip
    return report


def _label(name: str, note: str) -> str:
    if name == "fp32":
        return "PyTorch fp32"
    if name == "bf16":
        return "PyTorch bf16"
    if name in LOWBIT_RECIPES:
        return f"lowbit {note}"
    return note or name
