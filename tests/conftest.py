"""Shared fixtures: a seeded generator so every random test is reproducible."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator with a fixed seed (each test gets a fresh one, so tests do not depend on order)."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="module")
def one_thread():  # noqa: ANN201
    """The digits models are tiny: one thread is faster than two fighting over a busy machine."""
    from lowbit.threads import single_thread

    with single_thread():
        yield
