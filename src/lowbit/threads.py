"""``single_thread()``: run a block on one PyTorch thread, then restore the previous setting.

Tiny models (the digits zoo) and loops of small ops (GPTQ's per-column solve) pay more for OpenMP
synchronisation than they gain from a second core; measured back to back here, ternary QAT on
digits-cnn took 5.3 s on one thread and 57 s on two.

>>> import torch
>>> before = torch.get_num_threads()
>>> with single_thread():
...     torch.get_num_threads()
1
>>> torch.get_num_threads() == before
True
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def single_thread() -> Iterator[None]:
    """Limit PyTorch to one intra-op thread inside the ``with`` block."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
