"""Quantized key / value cache for transformers decoding: fp8 e4m3 or int8, one scale per head per token.

Long-context decoding is bound by the cache's bytes, not the weights': each generated token reads
every cached key and value of every layer. ``KVCache`` is a transformers ``Cache`` that stores them
as 8-bit codes with one 16-bit scale per (sequence, head, token), so new tokens append without
re-quantizing what is stored (per-token scales need no residual float window); it hands attention
the dequantized states, which is where the cost in accuracy shows. Stored bytes per value:
``1 + 2 / head_dim`` (0.52x of bf16 at head_dim 64, 0.26x of fp32).

What is saved is memory, not time: attention still runs in float on states dequantized at every
step (as transformers' own quantized caches do); a fused kernel would read the codes directly.

>>> import torch
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
...     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
>>> model = LlamaForCausalLM(config).eval()
>>> cache = KVCache(model.config, "fp8_e4m3")
>>> _ = model(torch.randint(0, 64, (1, 16)), **cache_argument(model, cache), use_cache=True)
>>> cache.stored_bytes(), round(cache.stored_bytes() / cache.float_bytes(torch.bfloat16), 3)
(2304, 0.562)
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import BaseQuantizedLayer, Cache

from lowbit import formats
from lowbit.codecs import codec_for
from lowbit.codecs.scales import scale_buffers, scale_from_buffers
from lowbit.primitives import QParams

# The cache formats: 8-bit codes, a 16-bit scale per head per token (symmetric: keys and values
# are centred enough that a zero point buys nothing at 8 bits).
KV_FORMATS = {"fp8_e4m3": "fp8_e4m3@fp16", "int8": "int8@fp16"}


def _kv_format(name: str) -> formats.Format:
    if name not in KV_FORMATS:
        raise ValueError(f"KV cache format must be one of {', '.join(KV_FORMATS)}, got {name!r}")
    return formats.get(KV_FORMATS[name])


class _Stored:
    """One growing tensor of states ``[batch, heads, tokens, head_dim]`` as codes plus scales."""

    def __init__(self, fmt: formats.Format) -> None:
        self.fmt = fmt
        self.codes: torch.Tensor | None = None
        self.scales: dict[str, torch.Tensor] = {}

    def append(self, states: torch.Tensor) -> None:
        codec = codec_for(self.fmt)
        block = (1, 1, 1, states.shape[-1])  # one scale per (sequence, head, token)
        x = states.detach().float().contiguous()
        qp = codec.choose(x, self.fmt, block, True, 1.0)  # scales already as fp16 stores them
        codes = codec.encode(x, self.fmt, qp)
        stored = scale_buffers(qp.scale, self.fmt)
        if self.codes is None:
            self.codes, self.scales = codes, stored
            return
        self.codes = torch.cat([self.codes, codes], dim=-2)
        self.scales = {k: torch.cat([self.scales[k], v], dim=-2) for k, v in stored.items()}

    def values(self, dtype: torch.dtype) -> torch.Tensor:
        assert self.codes is not None
        block = (1, 1, 1, self.codes.shape[-1])
        qp = QParams(scale_from_buffers(self.scales, self.fmt), None, block)
        return codec_for(self.fmt).decode(self.codes, self.fmt, qp, dtype)

    def select(self, index: torch.Tensor) -> None:
        if self.codes is not None:
            self.codes = self.codes.index_select(0, index.to(self.codes.device))
            self.scales = {k: v.index_select(0, index.to(v.device)) for k, v in self.scales.items()}

    @property
    def nbytes(self) -> int:
        if self.codes is None:
            return 0
        tensors = [self.codes, *self.scales.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


class KVCacheLayer(BaseQuantizedLayer):
    """One attention layer's cache: keys and values stored in ``fmt`` (``fp8_e4m3`` or ``int8``)."""

    def __init__(self, fmt: str = "fp8_e4m3") -> None:
        super().__init__()
        self.format_name = fmt
        self.fmt = _kv_format(fmt)
        self._quantized_keys = _Stored(self.fmt)
        self._quantized_values = _Stored(self.fmt)

    def _quantize(self, tensor: torch.Tensor) -> Any:  # the base class's hooks, unused here
        raise NotImplementedError

    def _dequantize(self, q_tensor: Any) -> torch.Tensor:
        raise NotImplementedError

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new states, return every stored key and value (dequantized, in their dtype)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._quantized_keys is None:  # after reset()
            self._quantized_keys, self._quantized_values = _Stored(self.fmt), _Stored(self.fmt)
        self.cumulative_length += key_states.shape[-2]
        self._quantized_keys.append(key_states)
        self._quantized_values.append(value_states)
        return (
            self._quantized_keys.values(key_states.dtype),
            self._quantized_values.values(value_states.dtype),
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: reorder the stored sequences (per-token scales reorder with them)."""
        if self._quantized_keys is not None:
            self._quantized_keys.select(beam_idx)
            self._quantized_values.select(beam_idx)

    @property
    def stored_bytes(self) -> int:
        """Bytes of codes and scales held for keys and values."""
        if self._quantized_keys is None:
            return 0
        return self._quantized_keys.nbytes + self._quantized_values.nbytes

    @property
    def stored_values(self) -> int:
        """Number of cached key and value numbers."""
        if self._quantized_keys is None or self._quantized_keys.codes is None:
            return 0
        return 2 * self._quantized_keys.codes.numel()


class KVCache(Cache):
    """A transformers ``Cache`` storing keys and values in 8 bits (see the module docstring).

    Pass it where transformers takes a cache: ``model.generate(..., cache=KVCache(model.config))``
    (``past_key_values=`` before transformers 5.24; ``cache_argument`` picks the name) or
    ``model(ids, cache=cache, use_cache=True)``. Only full-attention layers (no sliding windows,
    no linear attention) are supported.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=64)).eval()
    >>> ids = torch.randint(0, 64, (1, 8))
    >>> cache = KVCache(model.config, "int8")
    >>> out = model.generate(ids, max_new_tokens=4, do_sample=False, **cache_argument(model, cache))
    >>> out.shape
    torch.Size([1, 12])
    """

    def __init__(self, config: Any, fmt: str = "fp8_e4m3") -> None:
        _kv_format(fmt)  # refuse an unknown format before anything else
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        kinds = set(_layer_types(text))
        if kinds - {"full_attention"}:
            raise ValueError(
                f"lowbit.KVCache supports models whose layers all use full attention; this one has "
                f"{', '.join(sorted(kinds - {'full_attention'}))}"
            )
        self.format_name = fmt
        super().__init__(layers=[KVCacheLayer(fmt) for _ in range(text.num_hidden_layers)])

    def stored_bytes(self) -> int:
        """Bytes the cache holds now (codes and scales of every layer)."""
        return sum(layer.stored_bytes for layer in self.layers)

    def float_bytes(self, dtype: torch.dtype = torch.float32) -> int:
        """Bytes the same keys and values take in an unquantized cache of ``dtype``."""
        size = torch.empty((), dtype=dtype).element_size()
        return sum(layer.stored_values for layer in self.layers) * size


def _layer_types(config: Any) -> list[str]:
    """Each decoder layer's attention kind, as transformers infers it (sliding windows, chunks)."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        return list(get_layer_types_and_kwargs(config)[0])
    except (ImportError, AttributeError):  # older transformers: the config's own list, if any
        kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
        return list(getattr(config, "layer_types", None) or [kind])


class WithKVCache(nn.Module):
    """``model`` called with a fresh ``KVCache`` on every forward, so that attention reads the
    quantized keys and values of the whole sequence: a one-pass measurement of what decoding with
    the cache does to the model (for ``lowbit.eval.perplexity`` and the other eval verbs).

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=64)).eval()
    >>> from lowbit.eval.perplexity import perplexity
    >>> batch = [{"input_ids": torch.randint(0, 64, (2, 16))}]
    >>> abs(perplexity(WithKVCache(model, "fp8_e4m3"), batch) / perplexity(model, batch) - 1) < 0.01
    True
    """

    def __init__(self, model: nn.Module, fmt: str = "fp8_e4m3") -> None:
        super().__init__()
        _kv_format(fmt)
        self.model = model
        self.format_name = fmt
        self.last_cache: KVCache | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.last_cache = KVCache(self.model.config, self.format_name)
        return self.model(*args, **cache_argument(self.model, self.last_cache), use_cache=True, **kwargs)


def cache_argument(model: nn.Module, cache: Cache) -> dict[str, Cache]:
    """``{"cache": cache}`` where the model's forward takes ``cache`` (transformers >= 5.24), else
    ``{"past_key_values": cache}``.

    >>> class Old(nn.Module):
    ...     def forward(self, input_ids, past_key_values=None): ...
    >>> list(cache_argument(Old(), None))
    ['past_key_values']
    """
    takes = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in takes else {"past_key_values": cache}
