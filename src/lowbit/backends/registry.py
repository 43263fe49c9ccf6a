"""Every execution backend lowbit knows, in order of preference on ties (the reference path is
implicit: it runs whatever no backend takes).

>>> [b.name for b in BACKENDS][:2]
['torch-int-mm', 'fbgemm-dynamic']
>>> by_name("nope")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: unknown backend 'nope'; known: torch-int-mm, fbgemm-dynamic, ..., onednn-qconv
"""

from __future__ import annotations

from lowbit.backends.base import Backend
from lowbit.backends.conv import CONV_BACKENDS
from lowbit.backends.linear import LINEAR_BACKENDS
from lowbit.backends.qcpu import QCPU_BACKENDS

BACKENDS: tuple[Backend, ...] = (*LINEAR_BACKENDS, *QCPU_BACKENDS, *CONV_BACKENDS)


def by_name(name: str) -> Backend:
    """The registered backend called ``name``."""
    for backend in BACKENDS:
        if backend.name == name:
            return backend
    raise ValueError(f"unknown backend {name!r}; known: {', '.join(b.name for b in BACKENDS)}")
