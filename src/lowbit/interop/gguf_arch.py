"""Which transformers models GGUF export knows, and how their tensors and settings are named.

Two families, recognised from the model's config (``model_type``), not from layer names:

* ``gpt2`` (``GPT2LMHeadModel``): fused ``c_attn`` (GGUF ``attn_qkv``), LayerNorm, GELU MLP,
  learned positions. Hugging Face's ``Conv1D`` stores weights ``[in, out]``; GGUF wants
  ``[out, in]`` rows, which is how lowbit's quantized linears already hold them.
* ``llama`` (``LlamaForCausalLM`` and configs of the same layout: ``mistral``): RMSNorm, SwiGLU,
  rotary positions. llama.cpp's ``llama`` graph rotates interleaved pairs where transformers
  rotates halves, so q / k rows are permuted per head (as llama.cpp's own converter does); a
  row permutation moves whole rows, so quantized rows keep their codes and scales.

GGUF names come from the ``gguf`` package's ``TensorNameMap`` (the same table llama.cpp's
converter uses); hyper-parameter keys from its writer. Anything else is refused by
``family_of`` with the list of what is supported.

>>> from transformers import GPT2Config
>>> family_of(GPT2Config()).arch
'gpt2'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.errors import ModelError


@dataclass(frozen=True)
class Family:
    """One architecture GGUF export writes: its llama.cpp name and the config types it covers."""

    arch: str  # llama.cpp's general.architecture
    model_types: tuple[str, ...]  # transformers' config.model_type values


FAMILIES = (Family("gpt2", ("gpt2",)), Family("llama", ("llama", "mistral")))


def supported() -> str:
    """The model types GGUF export accepts, for error messages."""
    return ", ".join(f"{t} (llama.cpp '{f.arch}')" for f in FAMILIES for t in f.model_types)


def family_of(config: Any) -> Family:
    """The ``Family`` of a transformers config, or ``ModelError`` listing what is supported."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise ModelError(
        f"GGUF export does not know model type {model_type!r}; supported: {supported()}. "
        "Other architectures: export ONNX (lowbit export --format onnx) or the lowbit artifact"
    )


def gguf_arch(family: Family):  # type: ignore[no-untyped-def]
    import gguf

    return {"gpt2": gguf.MODEL_ARCH.GPT2, "llama": gguf.MODEL_ARCH.LLAMA}[family.arch]


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def write_hparams(writer: Any, family: Family, config: Any) -> None:
    """The hyper-parameters llama.cpp reads for ``family``, from the transformers ``config``."""
    if family.arch == "gpt2":
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)


def config_from_gguf(arch: str, fields: dict[str, Any], vocab_size: int) -> Any:
    """A transformers config for a GGUF file's ``arch`` and its ``fields``: the hyper-parameters
    without the ``<arch>.`` prefix (``{"context_length": ..., ...}``) and ``tokenizer.ggml.*``."""
    import transformers

    def need(key: str) -> Any:
        if key not in fields:
            raise ModelError(f"GGUF file of architecture {arch!r} has no {arch}.{key}")
        return fields[key]

    special = {k: fields.get(f"tokenizer.ggml.{k}") for k in ("bos_token_id", "eos_token_id")}
    common = {"vocab_size": vocab_size, "use_cache": False, **special}
    if arch == "gpt2":
        return transformers.GPT2Config(
            n_positions=int(need("context_length")),
            n_embd=int(need("embedding_length")),
            n_inner=int(need("feed_forward_length")),
            n_layer=int(need("block_count")),
            n_head=int(need("attention.head_count")),
            layer_norm_epsilon=float(need("attention.layer_norm_epsilon")),
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
    if arch == "llama":
        heads = int(need("attention.head_count"))
        return transformers.LlamaConfig(
            max_position_embeddings=int(need("context_length")),
            hidden_size=int(need("embedding_length")),
            intermediate_size=int(need("feed_forward_length")),
            num_hidden_layers=int(need("block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(fields.get("attention.head_count_kv", heads)),
            rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
            rope_theta=float(fields.get("rope.freq_base", 10000.0)),
            **common,
        )
    raise ModelError(f"GGUF import does not know architecture {arch!r}; supported: gpt2, llama")


# --- tensors --------------------------------------------------------------------------------------------


@dataclass
class Entry:
    """One GGUF tensor taken from a module: ``module.<attr>`` under the GGUF ``name``.

    ``rows`` is the row permutation to apply (llama's q / k), ``None`` for none.
    """

    name: str
    hf_name: str
    module: nn.Module
    attr: str  # "weight" or "bias"
    rows: np.ndarray | None = None


def _rope_rows(out: int, heads: int) -> np.ndarray:
    """llama.cpp's q / k row order: per head, halves ``[a0..a_{n/2}, b0..]`` become pairs
    ``[a0, b0, a1, b1, ...]`` (its converter's ``permute``)."""
    return np.arange(out).reshape(heads, 2, out // heads // 2).swapaxes(1, 2).reshape(-1)


def entries(model: nn.Module, family: Family) -> list[Entry]:
    """Every tensor of ``model`` that goes into the GGUF file, with its GGUF name.

    Buffers that are not weights (GPT-2's causal-mask ``attn.bias`` in old transformers, rotary
    tables) have no GGUF name and are left out; a parameter without one is an error, so nothing
    the model computes with is dropped silently.
    """
    import gguf

    config = model.config
    n_layer = config.n_layer if family.arch == "gpt2" else config.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf_arch(family), n_layer)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    head = model.get_output_embeddings() if tied else None
    out: list[Entry] = []
    seen: set[int] = set()
    for hf_name, module in model.named_modules():
        for attr in ("weight", "bias"):
            key = f"{hf_name}.{attr}"
            if not _holds(module, attr):
                continue
            tensor_id = id(_storage_of(module, attr))
            if module is head or tensor_id in seen:
                continue  # a tied head reads token_embd; llama.cpp does the same without output.weight
            seen.add(tensor_id)
            gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise ModelError(
                    f"GGUF export: tensor {key} of this {config.model_type} model has no llama.cpp name; "
                    f"is it a modified architecture? supported: {supported()}"
                )
            out.append(Entry(gguf_name, key, module, attr, _rows_for(gguf_name, module, family, config)))
    return out


def _holds(module: nn.Module, attr: str) -> bool:
    if attr == "weight":
        return hasattr(module, "qweight") or isinstance(getattr(module, "weight", None), nn.Parameter)
    return isinstance(getattr(module, "bias", None), nn.Parameter)


def _storage_of(module: nn.Module, attr: str) -> torch.Tensor:
    if attr == "weight" and hasattr(module, "qweight"):
        return module.qweight.packed
    return getattr(module, attr)


def _rows_for(gguf_name: str, module: nn.Module, family: Family, config: Any) -> np.ndarray | None:
    if family.arch != "llama" or gguf_name.split(".")[-2] not in ("attn_q", "attn_k"):
        return None
    heads = config.num_attention_heads
    if gguf_name.split(".")[-2] == "attn_k":
        heads = getattr(config, "num_key_value_heads", None) or heads
    out = module.out_features
    return _rope_rows(out, heads)


def inverse_rows(rows: np.ndarray) -> np.ndarray:
    """The permutation that undoes ``rows`` (for reading a GGUF file back)."""
    inv = np.empty_like(rows)
    inv[rows] = np.arange(rows.shape[0])
    return inv
