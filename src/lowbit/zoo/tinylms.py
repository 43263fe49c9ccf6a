"""Three small byte-level causal LMs of different families, trained briefly on any text file.

Data-aware PTQ has to work on models lowbit did not write: Hugging Face layers (GPT-2's
``Conv1D``), Llama's RMSNorm / SwiGLU / rotary blocks, and recurrent layers. This module builds
one of each from a config (no download) and trains it on a text file, for the acceptance bench
of issue 14 (``bench/lm_ptq_table.py``):

* ``gpt2``: ``transformers.GPT2LMHeadModel`` (Conv1D layers, LayerNorm, GELU MLP);
* ``llama``: ``transformers.LlamaForCausalLM`` (RMSNorm, SwiGLU, rotary positions);
* ``lstm``: :class:`LSTMLM`, embedding -> ``nn.LSTM`` -> linear head.

The output heads are untied from the embeddings, so a recipe can keep the embedding float while
quantizing the head. Data and caching follow ``tiny-gpt`` (``lowbit.zoo.tinygpt``): byte tokens,
every 10th 4 KB chunk held out, weights in safetensors under the user cache dir, named by a digest
of the text and of the config.

>>> zm = get_tiny_lm("lstm", "/work/shared/data/tinyshakespeare.txt")  # doctest: +SKIP
>>> zm.name, zm.metric  # doctest: +SKIP
('tiny-lstm', 'perplexity')
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.eval.metrics import output_tensor
from lowbit.zoo.base import ZooModel
from lowbit.zoo.cache import load_weights, save_weights
from lowbit.zoo.tinygpt import MIN_TEXT_BYTES, VOCAB, _batches, _windows, split_text, train_next_byte

ARCHS = ("gpt2", "llama", "lstm")


@dataclass(frozen=True)
class TinyLMConfig:
    """Architecture and training recipe of one tiny LM; any change trains (and caches) another model.

    ``n_layer`` is the number of transformer blocks, or of stacked LSTM layers; ``d_model`` the
    width (the LSTM's hidden size). ``n_head`` is unused by the LSTM.

    >>> TinyLMConfig("llama").digest() != TinyLMConfig("gpt2").digest()
    True
    """

    arch: str = "gpt2"
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    context: int = 128
    steps: int = 600
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 30
    seed: int = 0
    version: int = 1  # bump when the training code changes in a way the fields do not show

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown tiny LM architecture {self.arch!r}; choose one of {', '.join(ARCHS)}")

    def digest(self) -> str:
        """Short stable hash of every field (part of the cache name)."""
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:8]


def default_config(arch: str, **overrides: object) -> TinyLMConfig:
    """The bench's config for ``arch``: 4 blocks of width 128, or a 2-layer LSTM of width 256.

    Sized to train in a few minutes on two shared CPU cores. The LSTM is wider because a 2-layer
    LSTM of width 128 has a quarter of the transformers' weights and learns far less in the same time.

    >>> default_config("lstm").n_layer, default_config("lstm").d_model
    (2, 256)
    """
    base: dict[str, object] = {"arch": arch}
    if arch == "lstm":
        base.update(n_layer=2, d_model=256, lr=4e-3)
    base.update(overrides)
    return TinyLMConfig(**base)  # type: ignore[arg-type]


class LSTMLM(nn.Module):
    """Byte-level LSTM language model: ``model(input_ids)`` -> logits ``[batch, time, 256]``.

    >>> model = LSTMLM(TinyLMConfig("lstm", n_layer=2, d_model=16))
    >>> model(torch.zeros(2, 5, dtype=torch.long)).shape
    torch.Size([2, 5, 256])
    """

    def __init__(self, cfg: TinyLMConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, cfg.d_model)
        self.lstm = nn.LSTM(cfg.d_model, cfg.d_model, num_layers=cfg.n_layer, batch_first=True)
        self.head = nn.Linear(cfg.d_model, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for every position; ``attention_mask`` is accepted for Hugging Face-style calls and
        ignored (our batches have no padding)."""
        hidden, _state = self.lstm(self.embed(input_ids))
        return self.head(hidden)


def build_tiny_lm(cfg: TinyLMConfig) -> nn.Module:
    """An untrained model for ``cfg`` (initialised from the global RNG; seed it for repeatable weights).

    >>> m = build_tiny_lm(TinyLMConfig("gpt2", n_layer=1, d_model=32, n_head=2, context=16))
    >>> type(m).__name__, m.lm_head.weight is m.transformer.wte.weight
    ('GPT2LMHeadModel', False)
    """
    if cfg.arch == "lstm":
        return LSTMLM(cfg)
    import transformers  # only the transformer archs need it

    common = {"vocab_size": VOCAB, "tie_word_embeddings": False, "use_cache": False}
    if cfg.arch == "gpt2":
        config = transformers.GPT2Config(
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_embd=cfg.d_model,
            n_positions=cfg.context,
            bos_token_id=0,
            eos_token_id=0,
            # No dropout: a short run is far from overfitting, and dropout only slows it down.
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_head,
        hidden_size=cfg.d_model,
        # SwiGLU's 2/3 of 4x, rounded up to 128 so that groups of 128 divide every input width.
        intermediate_size=(8 * cfg.d_model // 3 + 127) // 128 * 128,
        max_position_embeddings=cfg.context,
        bos_token_id=0,
        eos_token_id=0,
        **common,
    )
    return transformers.LlamaForCausalLM(config)


def train_tiny_lm(train_data: torch.Tensor, cfg: TinyLMConfig) -> nn.Module:
    """Train from scratch on random windows of ``train_data``; seeded, leaves the global RNG alone.

    >>> data = torch.randint(0, 4, (4096,))
    >>> train_tiny_lm(data, TinyLMConfig("lstm", n_layer=1, d_model=8, context=16, steps=2)).training
    False
    """
    if len(train_data) <= cfg.context + 1:
        raise ValueError(f"training text of {len(train_data)} bytes is shorter than the context")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_tiny_lm(cfg)
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        train_next_byte(
            model,
            train_data,
            cfg,
            lambda _n, p: p.dim() >= 2 and id(p) not in embeddings,
            lambda m, ids: output_tensor(m(input_ids=ids)),
        )
    return model.eval()


def get_tiny_lm(
    arch: str,
    text_path: str | Path,
    config: TinyLMConfig | None = None,
    retrain: bool = False,
    calibration_batches: int = 8,
    batch_size: int = 16,
    max_eval_batches: int | None = None,
) -> ZooModel:
    """Load (or train and cache) the tiny ``arch`` LM on ``text_path``, with its calibration and eval data.

    Args:
        arch: ``gpt2``, ``llama`` or ``lstm``.
        text_path: the training text (bytes are tokens); every 10th 4 KB chunk is held out.
        config: architecture and training recipe (``default_config(arch)`` by default).
        retrain: ignore and overwrite the cached weights.
        calibration_batches: dict batches of ``batch_size`` windows of ``context`` bytes drawn from
            the training split at fixed random positions (128 sequences by default).
        max_eval_batches: cap on the held-out batches (all non-overlapping windows by default).

    >>> zm = get_tiny_lm("llama", "/work/shared/data/tinyshakespeare.txt")  # doctest: +SKIP
    >>> from lowbit.eval.perplexity import perplexity  # doctest: +SKIP
    >>> perplexity(zm.model, zm.eval_data) < 8  # doctest: +SKIP
    True
    """
    cfg = config or default_config(arch)
    if cfg.arch != arch:
        raise ValueError(f"config is for {cfg.arch!r}, not {arch!r}")
    if calibration_batches < 1 or batch_size < 1:
        raise ValueError("calibration_batches and batch_size must be >= 1")
    path = Path(text_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"training text {path} does not exist")
    text = path.read_bytes()
    if len(text) < MIN_TEXT_BYTES:
        raise ValueError(
            f"training text {path} has {len(text)} bytes; a tiny LM needs at least {MIN_TEXT_BYTES}"
        )
    text_digest = hashlib.sha256(text).hexdigest()
    name = f"tiny-{arch}"
    cache_name = f"{name}-{text_digest[:8]}-{cfg.digest()}"
    train_data, held_out = split_text(text)

    state = None if retrain else load_weights(cache_name, cfg.version)
    if state is not None:
        model = build_tiny_lm(cfg)
        model.load_state_dict(state)
        model.eval()
    else:
        print(f"lowbit.zoo: training {name} on {path} ({len(text) // 1024} KB)...", file=sys.stderr)
        started = time.perf_counter()
        model = train_tiny_lm(train_data, cfg)
        seconds = time.perf_counter() - started
        info = {"text": str(path), "text_sha256": text_digest, "config": dataclasses.asdict(cfg)}
        info["train_seconds"] = round(seconds, 1)
        saved = save_weights(cache_name, cfg.version, model.state_dict(), info)
        where = f"cached at {saved}" if saved else "not cached"
        print(f"lowbit.zoo: trained {name} in {seconds:.1f}s, {where}", file=sys.stderr)

    # Fixed random windows of the training split: varied but reproducible calibration data.
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    starts = torch.randint(
        0, len(train_data) - cfg.context, (calibration_batches * batch_size, 1), generator=gen
    )
    calibration = _batches(train_data[starts + torch.arange(cfg.context)], batch_size)
    eval_data = _batches(_windows(held_out, cfg.context), batch_size)
    if max_eval_batches is not None:
        eval_data = eval_data[:max_eval_batches]
    shape = f"{cfg.n_layer} layers, d={cfg.d_model}" + ("" if arch == "lstm" else f", context {cfg.context}")
    return ZooModel(
        name=name,
        model=model,
        calibration=calibration,
        eval_data=eval_data,
        metric="perplexity",
        example_inputs=(calibration[0]["input_ids"],),
        description=f"byte-level {arch} LM ({shape}) trained {cfg.steps} steps on {path.name}",
    )
