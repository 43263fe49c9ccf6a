"""The tokenizer part of a GGUF file: llama.cpp will not load a model without a vocabulary.

Two sources:

* a Hugging Face fast tokenizer whose model is byte-level BPE with GPT-2's pre-tokenizer: its
  tokens in id order, its merges, its special tokens, as ``tokenizer.ggml.model = "gpt2"``
  (pre-tokenizer ``gpt-2``); other pre-tokenizer regexes (Llama 3, Qwen) are refused, since
  llama.cpp would split text differently;
* a SentencePiece-style BPE tokenizer (``▁`` for spaces, ``<0xNN>`` byte fallback: Llama 2,
  Mistral) as ``tokenizer.ggml.model = "llama"`` with scores from the merge order;
* no tokenizer (a byte-level model such as lowbit's tiny LMs, token id = byte): the 256 byte
  tokens spelled as GPT-2's byte-to-unicode table spells them, no merges, so llama.cpp's BPE
  tokenizer maps every byte to its own id. Ids past 255 become unused control tokens, because
  llama.cpp takes the vocabulary size from the token list and checks it against the embedding.

Slow SentencePiece tokenizers (``tokenizer.model`` only) are not read: load the fast one.

>>> tokens = byte_tokens(258)
>>> tokens[ord("A")], tokens[32], tokens[257]
('A', 'Ġ', '<|unused_257|>')
"""

from __future__ import annotations

import json
from typing import Any

from lowbit.errors import ModelError


def _byte_to_unicode() -> list[str]:
    """GPT-2's printable spelling of each byte (its ``bytes_to_unicode``)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    )
    spelling, extra = {}, 0
    for b in range(256):
        if b in printable:
            spelling[b] = chr(b)
        else:
            spelling[b] = chr(256 + extra)
            extra += 1
    return [spelling[b] for b in range(256)]


def byte_tokens(vocab_size: int) -> list[str]:
    """Token strings of a byte-level vocabulary of ``vocab_size`` ids (>= 256)."""
    if vocab_size < 256:
        raise ModelError(
            f"a model without a tokenizer is written with a byte vocabulary, which needs 256 ids; "
            f"this one has {vocab_size}: pass its tokenizer"
        )
    return _byte_to_unicode() + [f"<|unused_{i}|>" for i in range(256, vocab_size)]


def write_vocab(writer: Any, vocab_size: int, tokenizer: Any | None = None, config: Any = None) -> str:
    """Add the vocabulary keys to a ``gguf.GGUFWriter``; returns what was written, in words.
    Without a tokenizer, the model ``config``'s BOS / EOS ids (when it has them) are recorded."""
    import gguf

    if tokenizer is None:
        _add_special_ids(writer, config, vocab_size)
        tokens = byte_tokens(vocab_size)
        types = [gguf.TokenType.NORMAL] * 256 + [gguf.TokenType.UNUSED] * (vocab_size - 256)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        # llama.cpp refuses a BPE vocabulary without merges (and gguf skips an empty list): one
        # merge of two NUL bytes, whose result is no token, so its tokenizer falls back to the
        # two byte tokens and every byte still maps to its own id.
        writer.add_token_merges([f"{tokens[0]} {tokens[0]}"])
        writer.add_add_bos_token(False)
        return f"byte vocabulary ({vocab_size} ids: token id = byte)"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(
            "GGUF export writes fast (tokenizers-backed) byte-level BPE tokenizers; this one is "
            f"{type(tokenizer).__name__}. Load it with use_fast=True, or pass tokenizer=None to write a "
            "byte vocabulary"
        )
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return _write_sentencepiece_bpe(writer, vocab_size, tokenizer, spec)
    if model.get("type") != "BPE":
        raise ModelError(
            f"GGUF export writes byte-level BPE tokenizers; this one is {model.get('type')!r} "
            "(SentencePiece / WordPiece vocabularies are not supported yet)"
        )
    pre = _gpt2_pre_tokenizer(spec.get("pre_tokenizer"))
    vocab: dict[str, int] = dict(model["vocab"])
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    special = {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
    size = max(vocab_size, max(vocab.values()) + 1)
    by_id = {i: t for t, i in vocab.items()}
    tokens = [by_id.get(i, f"<|unused_{i}|>") for i in range(size)]
    types = [
        gguf.TokenType.CONTROL
        if i in special
        else gguf.TokenType.NORMAL
        if i in by_id
        else gguf.TokenType.UNUSED
        for i in range(size)
    ]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    _add_special_ids(writer, tokenizer, size)
    writer.add_add_bos_token(False)
    return f"byte-level BPE from {type(tokenizer).__name__} ({len(tokens)} tokens, {len(merges)} merges)"


def _add_special_ids(writer: Any, source: Any, vocab_size: int, unk: bool = False) -> None:
    """BOS / EOS (and UNK) ids of ``source`` (a tokenizer or a model config), where it has them
    inside the vocabulary."""
    adders = {"bos_token_id": writer.add_bos_token_id, "eos_token_id": writer.add_eos_token_id}
    if unk:
        adders["unk_token_id"] = writer.add_unk_token_id
    for attr, add in adders.items():
        value = getattr(source, attr, None)
        if isinstance(value, int) and 0 <= value < vocab_size:
            add(value)


def _gpt2_pre_tokenizer(pre: dict[str, Any] | None) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer, or ``ModelError``.

    llama.cpp splits text with one of its built-in regexes, chosen by name; writing the wrong one
    tokenizes differently without any error, so only GPT-2's own (``ByteLevel`` with its regex)
    is written; custom ``Split`` regexes (Llama 3, Qwen, ...) are refused.
    """
    steps = [] if pre is None else pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True):
        return "gpt-2"
    kinds = ", ".join(str(p.get("type")) for p in steps) or "none"
    raise ModelError(
        f"GGUF export: this byte-level BPE tokenizer pre-splits text with {kinds}; llama.cpp would "
        "split it with another regex and tokenize differently. Supported: GPT-2's ByteLevel "
        "pre-tokenizer and SentencePiece-style BPE (Llama 2, Mistral); or pass tokenizer=None and "
        "feed token ids"
    )


def _write_sentencepiece_bpe(writer: Any, vocab_size: int, tokenizer: Any, spec: dict[str, Any]) -> str:
    """A Llama / Mistral style tokenizer (BPE over ``▁``-joined text with ``<0xNN>`` byte fallback)
    as llama.cpp's ``llama`` (SentencePiece) vocabulary.

    llama.cpp's SentencePiece tokenizer merges the adjacent pair whose merged token scores highest;
    BPE applies the earliest-learned merge first, and a BPE vocabulary numbers tokens in the order
    its merges were learned, so the score of a token is minus its id (the base alphabet and byte
    tokens get the lowest score: they are never the product of a merge).
    """
    import re

    import gguf

    vocab: dict[str, int] = dict(spec["model"]["vocab"])
    added = {a["content"]: a for a in spec.get("added_tokens", [])}
    for text, a in added.items():
        vocab[text] = a["id"]
    size = max(vocab_size, max(vocab.values()) + 1)
    by_id = {i: t for t, i in vocab.items()}
    merged = {m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])}
    products = {a.replace(" ", "", 1) if isinstance(a, str) else "".join(a) for a in merged}
    tokens, scores, types = [], [], []
    for i in range(size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"<unused_{i}>")
            scores.append(-1e9)
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(text)
        scores.append(-float(i) if text in products else -1e9)
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            types.append(gguf.TokenType.BYTE)
        elif text in added and added[text].get("special"):
            types.append(gguf.TokenType.CONTROL)
        elif text in added:
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    _add_special_ids(writer, tokenizer, size, unk=True)
    writer.add_add_bos_token(False)
    return f"SentencePiece-style BPE from {type(tokenizer).__name__} ({len(tokens)} tokens, byte fallback)"
