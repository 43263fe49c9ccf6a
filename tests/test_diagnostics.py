"""Calibration diagnostics: too little data, ranges still moving, dead layers, unrepresentative data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.analysis import check_calibration, diagnose, snapshot_ranges
from lowbit.ptq.convert import prepare, run_batches


@pytest.fixture(autouse=True)
def seeded() -> None:
    """Branchy's layers initialise from the global RNG: fix it, so no test depends on test order."""
    torch.manual_seed(0)


class Branchy(nn.Module):
    """An MLP with a second head that ``forward`` only uses when asked to."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.rare = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, use_rare: bool = False) -> torch.Tensor:
        h = self.body[1](self.body[0](x))
        return self.rare(h) if use_rare else self.body[2](h)


def uniform(gen: torch.Generator, n: int, size: int, high: float = 1.0) -> list[torch.Tensor]:
    return [torch.rand(size, 8, generator=gen) * high for _ in range(n)]


def kinds(found: list) -> list[str]:
    return [w.kind for w in found]


def test_too_few_samples_is_flagged_with_a_suggestion(gen: torch.Generator) -> None:
    found = check_calibration(Branchy(), uniform(gen, 2, 8))
    assert "too_few_samples" in kinds(found)
    warning = next(w for w in found if w.kind == "too_few_samples")
    assert warning.suggested_samples is not None and warning.suggested_samples >= 128
    assert "16 examples" in str(warning)


def test_enough_stable_data_gives_no_range_or_size_warning(gen: torch.Generator) -> None:
    found = check_calibration(Branchy(), uniform(gen, 8, 64))
    assert "too_few_samples" not in kinds(found) and "ranges_still_changing" not in kinds(found)


def test_ranges_still_changing_when_the_second_half_is_wider(gen: torch.Generator) -> None:
    batches = uniform(gen, 4, 64) + uniform(gen, 4, 64, high=3.0)  # the data drifts mid-calibration
    found = check_calibration(Branchy(), batches)
    moving = next(w for w in found if w.kind == "ranges_still_changing")
    assert "body.0" in moving.layers
    assert moving.suggested_samples is not None and moving.suggested_samples > 512


def test_never_activated_layer_is_named(gen: torch.Generator) -> None:
    found = check_calibration(Branchy(), uniform(gen, 8, 64))
    dead = next(w for w in found if w.kind == "never_activated")
    assert dead.layers == ("rare",)


def test_real_inputs_outside_the_calibrated_range(gen: torch.Generator) -> None:
    found = check_calibration(Branchy(), uniform(gen, 8, 64), data=uniform(gen, 2, 64, high=4.0))
    assert "outside_range" in kinds(found)
    same = check_calibration(Branchy(), uniform(gen, 8, 64), data=uniform(gen, 2, 64))
    assert "outside_range" not in kinds(same)


def test_snapshot_and_diagnose_drive_an_existing_calibration(gen: torch.Generator) -> None:
    # The two halves that lowbit.calibrate can call around its own loop.
    qmodel = prepare(Branchy(), "int8-static", warn=False)
    batches = uniform(gen, 2, 64) + uniform(gen, 2, 64, high=5.0)
    run_batches(qmodel, batches[:2], progress=False)
    half = snapshot_ranges(qmodel)
    assert set(half) == {"body.0", "body.2"}  # "rare" saw nothing yet, so it has no range
    run_batches(qmodel, batches[2:], progress=False)
    found = diagnose(qmodel, half, samples=256)
    assert kinds(found) == ["never_activated", "ranges_still_changing"]
