"""The domain tables: image classification, detection, NLP and speech models, each trained (once,
cached) on data that ships with packages or is generated, quantized with every technique and
scored with its own metric. ``lowbit bench --suite domains`` runs it (``lowbit.domains.suite``).

Each domain module exposes ``BUILDERS``: model name -> ``builder(quick: bool) -> DomainTask``.
Modules load lazily, so importing ``lowbit.domains`` costs nothing.

>>> sorted(DOMAIN_MODULES)
['classification', 'detection', 'nlp', 'speech']
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from lowbit.domains.task import DOMAINS, METRICS, DomainTask

DOMAIN_MODULES = {domain: f"lowbit.domains.{domain}" for domain in DOMAINS}


def builders(domain: str) -> dict[str, Callable[[bool], DomainTask]]:
    """Model name -> builder for one domain (imports that domain's module).

    >>> builders("audio")
    Traceback (most recent call last):
    ...
    ValueError: unknown domain 'audio'; choose from classification, detection, nlp, speech
    """
    if domain not in DOMAIN_MODULES:
        raise ValueError(f"unknown domain {domain!r}; choose from {', '.join(DOMAIN_MODULES)}")
    return dict(importlib.import_module(DOMAIN_MODULES[domain]).BUILDERS)


__all__ = ["DOMAINS", "DOMAIN_MODULES", "METRICS", "DomainTask", "builders"]
