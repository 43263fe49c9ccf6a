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


@pytest.fixture
def reference_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exact reference path (what fake-quant simulates); also skips timing the integer
    kernels on a fresh machine (~30 s on the first convert)."""
    monkeypatch.setenv("LOWBIT_KERNELS", "reference")


@pytest.fixture(scope="session")
def digits_cnn_cached(tmp_path_factory):  # noqa: ANN201
    """digits-cnn's trained weights in the zoo cache before the test starts.

    The first load on a fresh machine trains the model and says so on stderr; a test that checks
    stderr line by line must not depend on whether an earlier run left the cache behind. Where the
    cache cannot be written (every load would retrain), a private one is used for the session.
    """
    from pathlib import Path

    from lowbit.zoo import load_model
    from lowbit.zoo.digits import cached_weights_path

    load_model("digits-cnn")
    if Path(cached_weights_path("digits-cnn")).is_file():
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOWBIT_CACHE", str(tmp_path_factory.mktemp("zoo-cache")))
        load_model("digits-cnn")
        assert Path(cached_weights_path("digits-cnn")).is_file(), "the zoo cache cannot be written"
        yield
