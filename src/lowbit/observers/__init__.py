"""Calibration observers: collect activation statistics over batches, then choose quantization ranges.

Every observer has constant memory (however many batches it sees) and can be merged with another
of its kind and settings, so calibration can be sharded.

==================  ====================================================================
``minmax``          running min / max per block (any granularity); exact merge
``moving_average``  moving average of batch min / max (PyTorch style); approximate merge
``histogram``       exact power-of-two histogram; range = observed min / max
``percentile``      histogram; range between the (100-p) and p percentiles
``mse``             histogram; clip ratio minimising the expected quantization MSE
``entropy``         histogram; TensorRT-style KL-divergence threshold (integer formats)
==================  ====================================================================

>>> import torch, lowbit.formats as F
>>> import lowbit.observers as observers
>>> obs = observers.get("percentile", percentile=99.9)
>>> for _ in range(3):
...     obs.observe(torch.randn(4, 256))
>>> obs.qparams(F.get("int8")).scale.shape
torch.Size([1, 1])
"""

from __future__ import annotations

from typing import Any

from lowbit.observers.base import Observer
from lowbit.observers.entropy import EntropyObserver
from lowbit.observers.histogram import HistogramObserver, PercentileObserver
from lowbit.observers.minmax import MinMaxObserver, MovingAverageMinMaxObserver
from lowbit.observers.mse import MSEObserver

__all__ = [
    "EntropyObserver",
    "HistogramObserver",
    "MSEObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "Observer",
    "PercentileObserver",
    "get",
    "names",
]

_REGISTRY: dict[str, type[Observer]] = {
    cls.name: cls
    for cls in (
        MinMaxObserver,
        MovingAverageMinMaxObserver,
        HistogramObserver,
        PercentileObserver,
        MSEObserver,
        EntropyObserver,
    )
}


def get(name: str, **kwargs: Any) -> Observer:
    """A new observer by registry name; ``kwargs`` go to its constructor.

    >>> get("minmax", granularity="channel:0")
    MinMaxObserver(granularity=PerChannel(axis=0))
    """
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown observer {name!r}; known observers: {', '.join(names())}")
    try:
        return _REGISTRY[key](**kwargs)
    except TypeError as error:
        raise ValueError(f"bad settings for the {key} observer: {error}") from None


def names() -> list[str]:
    """Every observer name ``get`` accepts.

    >>> names()
    ['minmax', 'moving_average', 'histogram', 'percentile', 'mse', 'entropy']
    """
    return list(_REGISTRY)
