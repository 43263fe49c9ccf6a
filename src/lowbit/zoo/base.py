"""``ZooModel``: a model bundled with the data needed to calibrate and evaluate it.

Batch convention (one rule for every model in the zoo, see :func:`call_model`):

* a ``dict`` batch (tokenised text) is passed as keyword arguments: ``model(**batch)``;
* a ``tuple``/``list`` batch is passed positionally: ``model(*batch)``;
* a tensor batch is passed as the single argument: ``model(x)``.

>>> import torch
>>> zm = ZooModel(name="id", model=torch.nn.Identity(), example_inputs=(torch.ones(2, 3),))
>>> zm.forward(torch.ones(2, 3)).shape
torch.Size([2, 3])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit import batches

# A batch is a tensor (image models) or a dict of tensors (tokenised text).
Batch = torch.Tensor | dict[str, torch.Tensor] | tuple[torch.Tensor, ...]


def call_model(model: nn.Module, batch: Batch) -> Any:
    """Call ``model`` on one batch following the zoo convention (mapping -> kwargs, tuple -> args;
    see ``lowbit.batches`` for lists).

    Works for any module, so evaluation code can call the float and the quantized model alike.
    Gradients are not disabled here; wrap the call in ``torch.no_grad()`` when evaluating.

    >>> import torch
    >>> call_model(torch.nn.Linear(4, 2), torch.ones(3, 4)).shape
    torch.Size([3, 2])
    >>> call_model(torch.nn.Bilinear(2, 2, 1), (torch.ones(1, 2), torch.ones(1, 2))).shape
    torch.Size([1, 1])
    """
    return batches.call_model(model, batch)


@dataclass
class ZooModel:
    """A model in eval mode plus the data to calibrate and evaluate it.

    Fields:
        name: registry name (``"digits-cnn"``) or the spec it was loaded from.
        model: the ``nn.Module``, in eval mode.
        calibration: input batches drawn from the *training* split (never from ``eval_data``).
        eval_data: held-out batches, or ``None`` when the model comes without data. For
            ``metric == "accuracy"`` each item is ``(inputs, labels)``; for ``"cosine"`` each item
            is an input batch (a dict) whose reference output is the float model's own output;
            for ``"perplexity"`` items are dict batches with ``input_ids`` (labels = inputs).
        metric: ``"accuracy"``, ``"cosine"``, ``"perplexity"`` or ``None`` (unknown).
        example_inputs: positional arguments suitable for ``torch.export`` / tracing.
        description: one line for humans.
        tokenizer: the text tokenizer for text models, else ``None``.

    >>> import torch
    >>> zm = ZooModel(name="lin", model=torch.nn.Linear(4, 2), example_inputs=(torch.ones(1, 4),))
    >>> zm.metric is None and zm.eval_data is None and zm.calibration == []
    True
    """

    name: str
    model: nn.Module
    calibration: list[Batch] = field(default_factory=list)
    eval_data: list[Any] | None = None
    metric: str | None = None
    example_inputs: tuple[torch.Tensor, ...] = ()
    description: str = ""
    tokenizer: Any = None

    def forward(self, batch: Batch) -> Any:
        """Run ``self.model`` on one batch (see :func:`call_model`).

        >>> import torch
        >>> ZooModel(name="id", model=torch.nn.Identity()).forward(torch.zeros(1)).tolist()
        [0.0]
        """
        return call_model(self.model, batch)

    def eval_inputs(self) -> list[Batch]:
        """The input part of every ``eval_data`` item (drops labels); ``[]`` when there is no data.

        >>> import torch
        >>> zm = ZooModel(name="id", model=torch.nn.Identity(), metric="accuracy",
        ...               eval_data=[(torch.zeros(2, 3), torch.tensor([0, 1]))])
        >>> [x.shape for x in zm.eval_inputs()]
        [torch.Size([2, 3])]
        """
        if not self.eval_data:
            return []
        if self.metric == "accuracy":
            return [inputs for inputs, _labels in self.eval_data]
        return list(self.eval_data)
