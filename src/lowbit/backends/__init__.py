"""Execution backends: real integer kernels for quantized layers, chosen per machine.

A quantized layer's ``forward`` is the reference path (dequantize, then the float op) until a
kernel is attached. ``use_kernels(model)`` attaches, layer by layer, the fastest registered
backend that computes what the recipe says within its tolerance, measured once per machine and
cached (``lowbit.backends.choose``). ``lowbit.quantize`` and ``lowbit.load`` call it; every layer's
``backend`` names what runs, and ``lowbit doctor`` prints the table.

>>> import torch, lowbit
>>> q = lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(64, 64)), "int8-dynamic", progress=False)
>>> q[0].backend in {b.name for b in BACKENDS} | {"reference"}
True
"""

from lowbit.backends.base import Backend, Kernel
from lowbit.backends.choose import KernelChoice, kernel_summary, use_kernels
from lowbit.backends.registry import BACKENDS, by_name

__all__ = ["BACKENDS", "Backend", "Kernel", "KernelChoice", "by_name", "kernel_summary", "use_kernels"]
