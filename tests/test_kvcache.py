"""lowbit.KVCache: 8-bit keys and values per head per token inside transformers decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from lowbit.eval.perplexity import perplexity  # noqa: E402
from lowbit.kvcache import KVCache, WithKVCache, cache_argument  # noqa: E402


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=96, n_positions=64)).eval()


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("build", [_llama, _gpt2])
def test_token_by_token_decoding_reads_what_one_pass_measures(build, fmt: str) -> None:
    model = build()
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        whole = WithKVCache(model, fmt)(ids).logits
        cache = KVCache(model.config, fmt)
        steps = [
            model(ids[:, t : t + 1], **cache_argument(model, cache), use_cache=True).logits for t in range(12)
        ]
    assert torch.allclose(torch.cat(steps, dim=1), whole, atol=1e-5)
    assert cache.get_seq_length() == 12


def test_fp8_keys_match_ml_dtypes() -> None:
    md = pytest.importorskip("ml_dtypes")
    model = _llama()
    cache = KVCache(model.config, "fp8_e4m3")
    ids = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        plain = __import__("transformers").DynamicCache(config=model.config)
        model(ids, **cache_argument(model, plain), use_cache=True)
        model(ids, **cache_argument(model, cache), use_cache=True)
    keys = plain.layers[0].keys.numpy()  # the float keys of layer 0
    scale = np.abs(keys).max(axis=-1, keepdims=True) / np.float32(448.0)
    scale = scale.astype(np.float16).astype(np.float32)  # the cache stores fp16 scales
    expected = (keys / scale).astype(md.float8_e4m3fn).astype(np.float32) * scale
    got = cache.layers[0]._quantized_keys.values(torch.float32).numpy()
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
def test_bytes_and_perplexity(fmt: str) -> None:
    model = _gpt2()
    batches = [{"input_ids": torch.randint(0, 96, (2, 64))} for _ in range(2)]
    wrapped = WithKVCache(model, fmt)
    ratio = perplexity(wrapped, batches) / perplexity(model, batches)
    assert abs(ratio - 1) < 0.01
    cache = wrapped.last_cache
    head_dim = 64 // 4
    assert cache.stored_bytes() == cache.float_bytes(torch.float32) // 4 * (1 + 2 / head_dim)
    assert cache.float_bytes(torch.bfloat16) * 2 == cache.float_bytes(torch.float32)


def test_beam_search_and_refusals() -> None:
    model = _gpt2()
    ids = torch.randint(0, 96, (1, 6))
    cache = KVCache(model.config, "int8")
    out = model.generate(ids, max_new_tokens=3, num_beams=2, do_sample=False, **cache_argument(model, cache))
    assert out.shape == (1, 9)
    with pytest.raises(ValueError, match="KV cache format"):
        KVCache(model.config, "int4")


def test_sliding_window_models_are_refused() -> None:
    from transformers import MistralConfig

    config = MistralConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
    )  # fmt: skip
    with pytest.raises(ValueError, match="sliding_attention"):
        KVCache(config)
