"""Perplexity of a causal language model: ``exp`` of the mean next-token negative log-likelihood.

Works with any model that maps ``input_ids`` to logits ``[batch, time, vocab]``, returned as a
tensor (lowbit's ``tiny-gpt``) or as an object with ``.logits`` (Hugging Face causal LMs).
Every token is predicted from the tokens before it in its own sequence; tokens are weighted
equally across batches (not batches equally), so the result does not depend on batch sizes.

>>> import torch
>>> class Uniform(torch.nn.Module):  # predicts every one of 50 tokens with equal probability
...     def forward(self, input_ids, attention_mask=None):
...         return torch.zeros(*input_ids.shape, 50)
>>> round(perplexity(Uniform(), [{"input_ids": torch.randint(0, 50, (4, 9))}]), 4)
50.0
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.eval.metrics import output_tensor
from lowbit.ptq.convert import model_device

IGNORE_INDEX = -100  # Hugging Face's label value for "no target here"


def _targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token targets ``[batch, time - 1]``: explicit ``labels`` if given, else the inputs,
    with padded positions (``attention_mask == 0``) ignored."""
    labels = batch.get("labels")
    if labels is None:
        labels = batch["input_ids"]
        mask = batch.get("attention_mask")
        if mask is not None:
            labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
    return labels[:, 1:]


def perplexity(model: nn.Module, batches: Iterable[Any]) -> float:
    """Perplexity of ``model`` on ``batches`` (dicts with ``input_ids``, optionally ``attention_mask``
    and ``labels``; a bare tensor is taken as ``input_ids``). Runs without gradients, in eval mode,
    on the model's device; the model's training flag is restored afterwards.

    >>> import torch
    >>> class Copy(torch.nn.Module):  # puts (almost) all probability on repeating the last token
    ...     def forward(self, input_ids):
    ...         return torch.nn.functional.one_hot(input_ids, 8).float() * 30
    >>> ids = torch.full((2, 6), 3)
    >>> perplexity(Copy(), [ids]) < 1.001
    True
    """
    device = model_device(model)
    was_training = model.training
    model.eval()
    total_nll = 0.0
    total_tokens = 0
    try:
        with torch.no_grad():
            for batch in batches:
                if isinstance(batch, torch.Tensor):
                    batch = {"input_ids": batch}
                if not isinstance(batch, dict) or "input_ids" not in batch:
                    raise TypeError("perplexity needs dict batches with 'input_ids' (or input-id tensors)")
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                inputs = {
                    k: v for k, v in batch.items() if k != "labels"
                }  # no loss computed inside HF models
                logits = output_tensor(model(**inputs))[:, :-1]
                targets = _targets(batch)
                # float32 log-softmax: half-precision logits lose the small probabilities that dominate NLL.
                nll = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(),
                    targets.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
                total_nll += float(nll)
                total_tokens += int((targets != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if total_tokens == 0:
        raise ValueError("no tokens to predict: perplexity needs sequences of at least 2 tokens")
    return math.exp(total_nll / total_tokens)
