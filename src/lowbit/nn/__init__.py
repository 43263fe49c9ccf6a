"""Quantized modules: packed weights, activation quantizers, and the layers built from them."""

from lowbit.nn.activation import ActivationQuantizer
from lowbit.nn.base import QuantizedModule
from lowbit.nn.layers import QuantizedConv, QuantizedEmbedding, QuantizedLinear, QuantizedRNN
from lowbit.nn.qweight import QuantizedWeight

__all__ = [
    "ActivationQuantizer",
    "QuantizedConv",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "QuantizedModule",
    "QuantizedRNN",
    "QuantizedWeight",
]
