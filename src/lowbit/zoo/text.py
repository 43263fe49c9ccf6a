"""Text-model helpers: sentence-embedding wrapper, offline transformers import, tokenised batches.

>>> import torch
>>> class Toy(torch.nn.Module):  # stands in for a Hugging Face encoder
...     def forward(self, input_ids, attention_mask=None):
...         return (torch.nn.functional.one_hot(input_ids, 4).float(),)
>>> emb = SentenceEncoder(Toy())(torch.tensor([[1, 2, 0]]), torch.tensor([[1, 1, 0]]))
>>> emb.shape, round(float(emb.norm()), 4)
(torch.Size([1, 4]), 1.0)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch
from torch import nn

from lowbit.zoo.sentences import SENTENCES

# Our sentences are short; the cap only bounds memory for user-supplied text and long-context models.
MAX_TOKENS = 256
# With 128 built-in sentences and batches of 32: 2 calibration batches, 2 evaluation batches.
CALIBRATION_SENTENCES = 64


def import_transformers() -> ModuleType:
    """Import ``transformers`` with the Hub forced offline (unless the user already chose a setting).

    Nothing in lowbit may download at run time; this makes a missing local file an immediate error
    instead of a network call.

    >>> import_transformers().__name__
    'transformers'
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            "loading Hugging Face models needs the optional package transformers: pip install 'lowbit[hf]'"
        ) from err
    return transformers


class SentenceEncoder(nn.Module):
    """Mean-pooled, L2-normalised sentence embeddings from a Hugging Face encoder.

    This is the sentence-transformers pooling of all-MiniLM-L6-v2 (mean over real tokens, then
    normalise), so cosine similarity is a plain dot product. Output: ``[batch, hidden]``.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # Only pass token_type_ids when given: some encoders (DistilBERT) do not accept them.
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra)[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        # Padding must not dilute the mean, hence the masked sum divided by the real token count.
        mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(mean, p=2, dim=1)


def tokenize_batches(
    tokenizer: Any, sentences: Sequence[str], batch_size: int = 32
) -> list[dict[str, torch.Tensor]]:
    """Tokenise ``sentences`` into dict batches, each padded to its longest sentence.

    >>> class Tok:  # any Hugging Face tokenizer works; this stub shows the call
    ...     def __call__(self, texts, **kw):
    ...         return {"input_ids": torch.zeros(len(texts), 3, dtype=torch.long)}
    >>> [b["input_ids"].shape[0] for b in tokenize_batches(Tok(), ["a", "b", "c"], batch_size=2)]
    [2, 1]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = []
    for start in range(0, len(sentences), batch_size):
        chunk = list(sentences[start : start + batch_size])
        encoded = tokenizer(chunk, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        batches.append(dict(encoded))
    return batches


def sentence_batches(
    tokenizer: Any, batch_size: int = 32
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """``(calibration, eval)`` dict batches: the first 64 built-in sentences, then the other 64.

    >>> class Tok:
    ...     def __call__(self, texts, **kw):
    ...         return {"input_ids": torch.zeros(len(texts), 3, dtype=torch.long)}
    >>> calibration, evaluation = sentence_batches(Tok())
    >>> len(calibration), len(evaluation)
    (2, 2)
    """
    calibration = tokenize_batches(tokenizer, SENTENCES[:CALIBRATION_SENTENCES], batch_size)
    evaluation = tokenize_batches(tokenizer, SENTENCES[CALIBRATION_SENTENCES:], batch_size)
    return calibration, evaluation
