"""Quantization-aware training (QAT): fake-quantize during training, then convert to packed layers.

>>> import torch, lowbit.qat as qat
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> m = qat.prepare(model, qat.recipe(4), lsq=True)
>>> _ = m.train()(torch.randn(4, 8))  # any training loop; here one forward to set ranges
>>> type(qat.convert(m)[2]).__name__
'QuantizedLinear'
"""

from lowbit.qat.bn_fold import fold_batchnorm
from lowbit.qat.core import calibrate, convert, freeze_observers, prepare, qat_layers, recipe
from lowbit.qat.fake_quant import ActFakeQuant, WeightFakeQuant
from lowbit.qat.modules import QATRNN, QATConv, QATEmbedding, QATLinear, QATModule

__all__ = [
    "ActFakeQuant",
    "QATConv",
    "QATEmbedding",
    "QATLinear",
    "QATModule",
    "QATRNN",
    "WeightFakeQuant",
    "calibrate",
    "convert",
    "fold_batchnorm",
    "freeze_observers",
    "prepare",
    "qat_layers",
    "recipe",
]
