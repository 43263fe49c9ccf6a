"""Quantization-aware training (QAT): fake-quantize during training, then convert to packed layers.

>>> import torch, lowbit.qat as qat
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> m = qat.prepare(model, qat.recipe(4), lsq=True)
>>> _ = m.train()(torch.randn(4, 8))  # any training loop; here one forward to set ranges
>>> type(qat.convert(m)[2]).__name__
'QuantizedLinear'
"""

from lowbit.distill import Distiller
from lowbit.qat.batchnorm import FrozenBatchNorm, fold_batchnorm, reestimate_batchnorm
from lowbit.qat.core import calibrate, convert, freeze_observers, prepare, qat_layers, recipe
from lowbit.qat.fake_quant import ActFakeQuant, WeightFakeQuant
from lowbit.qat.modules import QATRNN, QATConv, QATEmbedding, QATLinear, QATModule
from lowbit.threads import single_thread


def demo_techniques() -> list:
    """Training-time rows for ``lowbit demo`` / ``lowbit compare`` (QAT 4 and 2 bits, ternary QAT,
    50% pruning + int8, Deep Compression), each trained on demand from the float digits model.

    >>> [t.name for t in demo_techniques()][:2]
    ['QAT 4-bit', 'QAT 2-bit']
    """
    from lowbit.eval.compare import Technique
    from lowbit.qat.demo import DEFAULT_KEYS, ROWS, demo_rows

    def builder(key: str):
        def build(zm):
            with single_thread():  # tiny digits models train fastest on one thread
                return demo_rows(zm, keys=(key,))[0]["model"]

        return build

    return [Technique(ROWS[key][0], builder(key), ROWS[key][1]) for key in DEFAULT_KEYS]


__all__ = [
    "ActFakeQuant",
    "Distiller",
    "FrozenBatchNorm",
    "QATConv",
    "QATEmbedding",
    "QATLinear",
    "QATModule",
    "QATRNN",
    "WeightFakeQuant",
    "calibrate",
    "convert",
    "demo_techniques",
    "fold_batchnorm",
    "freeze_observers",
    "prepare",
    "qat_layers",
    "recipe",
    "reestimate_batchnorm",
]
