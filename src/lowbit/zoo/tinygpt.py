"""``tiny-gpt``: a small byte-level GPT trained on first use from the Python standard library's source.

Causal language models are where weight-only quantization is judged (GPTQ, AWQ), and their
metric, perplexity, reacts to every layer. This zoo model gives lowbit one that needs no
download: the training text is a fixed list of the standard library's own ``.py`` files, present
in every CPython 3.10+ install, and the model trains in about a minute on two CPU cores.
``text_path`` trains on any other text file instead (``--text FILE`` in the CLI).

Tokens are bytes (vocabulary 256): no tokenizer to ship, any text works, and for source code one
byte is one character. The weights are cached (``lowbit.zoo.cache``) under a name that includes
a digest of the text and of the configuration, so a different text, Python version or config
trains its own model instead of silently reusing another one.

>>> zm = get_tiny_gpt()  # doctest: +SKIP
>>> zm.metric, zm.calibration[0]["input_ids"].shape  # doctest: +SKIP
('perplexity', torch.Size([16, 128]))
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.zoo.base import ZooModel
from lowbit.zoo.cache import load_weights, save_weights

VOCAB = 256  # bytes
# Single-file modules that exist in every CPython 3.10+ (none became a package or a shim since),
# about 480 KB together. Sorted, so the text is the same whatever order the filesystem lists.
STDLIB_FILES = (
    "argparse.py",
    "ast.py",
    "calendar.py",
    "contextlib.py",
    "csv.py",
    "difflib.py",
    "fractions.py",
    "functools.py",
    "heapq.py",
    "queue.py",
    "random.py",
    "shlex.py",
    "textwrap.py",
)
MIN_TEXT_BYTES = 20_000  # below this the held-out split is too small to measure perplexity
HELD_OUT_EVERY = 10  # every 10th chunk of the text is held out for evaluation
CHUNK_BYTES = 4096  # interleaved chunks: the held-out text comes from every file, not just the last


@dataclass(frozen=True)
class TinyGPTConfig:
    """Architecture and training recipe. Any change trains (and caches) a separate model.

    The defaults come from a small sweep at a fixed CPU budget (~85 s on one core): the model is
    far from converged, so a narrow model that sees more tokens wins (held-out perplexity 4.8
    for d=64 and 1000 steps, against 6.7 for d=128 and 500 steps, 6.3 for 6 layers of d=64,
    5.2 for d=96), and a learning rate of 6e-3 diverged where 3e-3 to 4e-3 did not.
    """

    n_layer: int = 4
    n_head: int = 4
    d_model: int = 64
    context: int = 128
    steps: int = 1000
    batch_size: int = 16
    lr: float = 4e-3
    warmup: int = 30
    seed: int = 0
    version: int = 1  # bump when the training code changes in a way the fields do not show

    def digest(self) -> str:
        """Short stable hash of every field (part of the cache name)."""
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:8]


class CausalSelfAttention(nn.Module):
    """Multi-head attention where each position sees only itself and earlier positions."""

    def __init__(self, cfg: TinyGPTConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.n_head:
            raise ValueError(f"d_model={cfg.d_model} must be a multiple of n_head={cfg.n_head}")
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)  # one matmul for q, k and v
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        # The fused kernel applies the causal mask without materialising a [t, t] matrix.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Pre-norm transformer block: normalising before each sublayer keeps a short training stable."""

    def __init__(self, cfg: TinyGPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.fc2 = nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    """Byte-level GPT: ``model(input_ids)`` -> logits ``[batch, time, 256]``.

    The output head is a separate ``nn.Linear`` (not tied to the embedding) so that every
    matmul of the model is an ``nn.Linear`` that weight quantization can treat alike.

    >>> model = TinyGPT(TinyGPTConfig(n_layer=1, d_model=32, n_head=2, context=16))
    >>> model(torch.zeros(2, 10, dtype=torch.long)).shape
    torch.Size([2, 10, 256])
    """

    def __init__(self, cfg: TinyGPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(VOCAB, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, VOCAB, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        # GPT-2's small normal init: PyTorch's default fan-in init is too large for a residual stack.
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for every position. ``attention_mask`` is accepted for Hugging Face-style calls
        and ignored: attention is causal and our batches have no padding."""
        t = input_ids.shape[1]
        if t > self.cfg.context:
            raise ValueError(f"sequence of {t} tokens is longer than the context of {self.cfg.context}")
        pos = torch.arange(t, device=input_ids.device)
        x = self.tok_emb(input_ids) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


# --- data ---------------------------------------------------------------------------------------


def stdlib_text() -> bytes:
    """The default training text: ``STDLIB_FILES`` from this interpreter's standard library.

    >>> len(stdlib_text()) > 300_000  # doctest: +SKIP
    True
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = [(root / name).read_bytes() for name in STDLIB_FILES if (root / name).is_file()]
    text = b"\n".join(parts)
    if len(text) < MIN_TEXT_BYTES:
        raise FileNotFoundError(
            f"the Python standard library sources under {root} are missing (no .py files; some "
            "distributions ship only bytecode); train tiny-gpt on another text with text_path=FILE"
        )
    return text


def split_text(text: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, held_out)`` byte tensors: every ``HELD_OUT_EVERY``-th 4 KB chunk is held out.

    >>> train, held = split_text(bytes(range(256)) * 400)
    >>> len(train) + len(held), len(held)
    (102400, 8192)
    """
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    chunks = data.split(CHUNK_BYTES)
    held = [c for i, c in enumerate(chunks) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    train = [c for i, c in enumerate(chunks) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    if not held:
        raise ValueError(f"text of {len(text)} bytes is too short for a held-out split")
    return torch.cat(train), torch.cat(held)


def _windows(data: torch.Tensor, length: int) -> torch.Tensor:
    """Non-overlapping windows ``[n, length]`` (the tail that does not fill one is dropped)."""
    n = len(data) // length
    return data[: n * length].reshape(n, length)


def _batches(rows: torch.Tensor, size: int) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": rows[i : i + size]} for i in range(0, len(rows), size)]


# --- training -----------------------------------------------------------------------------------


def train_next_byte(
    model: nn.Module,
    train_data: torch.Tensor,
    cfg: Any,
    decays: Callable[[str, nn.Parameter], bool],
    logits_of: Callable[[nn.Module, torch.Tensor], torch.Tensor],
) -> None:
    """Next-byte training on random windows of ``train_data`` (AdamW, warmup + cosine, clipped
    gradients), shared by the zoo's byte-level LMs. ``cfg`` gives ``lr``, ``warmup``, ``steps``,
    ``context`` and ``batch_size``; ``decays(name, param)`` picks the weight-decayed parameters;
    ``logits_of(model, ids)`` runs the model. Draws from the global RNG: seed it first."""
    # No weight decay on norms, biases and embeddings (nanoGPT's split): decaying them only hurts.
    decay = [p for n, p in model.named_parameters() if decays(n, p)]
    rest = [p for n, p in model.named_parameters() if not decays(n, p)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.99),
    )

    def lr_at(step: int) -> float:
        # Linear warmup then cosine decay to 10%: a short run must settle, not stop mid-stride.
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    offsets = torch.arange(cfg.context + 1)
    model.train()
    for _step in range(cfg.steps):
        starts = torch.randint(0, len(train_data) - cfg.context - 1, (cfg.batch_size, 1))
        window = train_data[starts + offsets]
        logits = logits_of(model, window[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), window[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()


def train_tiny_gpt(train_data: torch.Tensor, cfg: TinyGPTConfig) -> TinyGPT:
    """Train from scratch on random windows of ``train_data``; seeded, leaves the global RNG alone.

    >>> data = torch.randint(0, 4, (4096,))
    >>> cfg = TinyGPTConfig(n_layer=1, d_model=16, n_head=2, context=16, steps=2, batch_size=4)
    >>> train_tiny_gpt(data, cfg).training
    False
    """
    if len(train_data) <= cfg.context + 1:
        raise ValueError(f"training text of {len(train_data)} bytes is shorter than the context")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = TinyGPT(cfg)
        train_next_byte(
            model, train_data, cfg, lambda n, p: p.dim() >= 2 and "emb" not in n, lambda m, ids: m(ids)
        )
    return model.eval()


def get_tiny_gpt(
    text_path: str | Path | None = None,
    config: TinyGPTConfig | None = None,
    retrain: bool = False,
    calibration_batches: int = 8,
    batch_size: int = 16,
    max_eval_batches: int | None = None,
) -> ZooModel:
    """Load (or train and cache) tiny-gpt with its calibration and evaluation data.

    Args:
        text_path: train on this text file instead of the standard library sources.
        config: architecture and training recipe (``TinyGPTConfig()`` by default).
        retrain: ignore and overwrite the cached weights.
        calibration_batches: dict batches of ``batch_size`` windows of ``context`` bytes, drawn
            from the training split at fixed random positions (128 sequences by default).
        max_eval_batches: cap on the held-out batches (all non-overlapping windows by default).

    >>> zm = get_tiny_gpt()  # doctest: +SKIP
    >>> from lowbit.eval.perplexity import perplexity  # doctest: +SKIP
    >>> perplexity(zm.model, zm.eval_data) < 6  # doctest: +SKIP
    True
    """
    cfg = config or TinyGPTConfig()
    if calibration_batches < 1 or batch_size < 1:
        raise ValueError("calibration_batches and batch_size must be >= 1")
    if text_path is None:
        text, source = stdlib_text(), f"Python {sys.version_info[0]}.{sys.version_info[1]} stdlib sources"
    else:
        path = Path(text_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"training text {path} does not exist")
        text, source = path.read_bytes(), str(path)
        if len(text) < MIN_TEXT_BYTES:
            raise ValueError(
                f"training text {path} has {len(text)} bytes; tiny-gpt needs at least {MIN_TEXT_BYTES}"
            )
    text_digest = hashlib.sha256(text).hexdigest()
    cache_name = f"tiny-gpt-{text_digest[:8]}-{cfg.digest()}"
    train_data, held_out = split_text(text)

    state = None if retrain else load_weights(cache_name, cfg.version)
    model = TinyGPT(cfg)
    if state is not None:
        model.load_state_dict(state)
        model.eval()
    else:
        print(f"lowbit.zoo: training tiny-gpt on {source} ({len(text) // 1024} KB)...", file=sys.stderr)
        started = time.perf_counter()
        model = train_tiny_gpt(train_data, cfg)
        seconds = time.perf_counter() - started
        info = {"text": source, "text_sha256": text_digest, "config": dataclasses.asdict(cfg)}
        info["train_seconds"] = round(seconds, 1)
        path = save_weights(cache_name, cfg.version, model.state_dict(), info)
        where = f"cached at {path}" if path else "not cached"
        print(f"lowbit.zoo: trained tiny-gpt in {seconds:.1f}s, {where}", file=sys.stderr)

    # Fixed random windows of the training split: varied but reproducible calibration data.
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    starts = torch.randint(
        0, len(train_data) - cfg.context, (calibration_batches * batch_size, 1), generator=gen
    )
    calibration = _batches(train_data[starts + torch.arange(cfg.context)], batch_size)
    eval_data = _batches(_windows(held_out, cfg.context), batch_size)
    if max_eval_batches is not None:
        eval_data = eval_data[:max_eval_batches]
    return ZooModel(
        name="tiny-gpt",
        model=model,
        calibration=calibration,
        eval_data=eval_data,
        metric="perplexity",
        example_inputs=(calibration[0]["input_ids"],),
        description=(
            f"byte-level GPT ({cfg.n_layer} layers, d={cfg.d_model}, context {cfg.context}) "
            f"trained on {source}"
        ),
    )
