"""Sensitivity analysis: a planted fragile layer must rank first, and the report must be usable."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lowbit.analysis import sensitivity


def fragile_mlp(gen: torch.Generator, scale: float = 1000.0) -> nn.Sequential:
    """An MLP whose middle layer sees one input channel ``scale`` times larger than the rest.

    The float function is unchanged (ReLU is positively homogeneous: fc1's row is scaled up and
    fc2's matching column scaled down), but any per-tensor input range or weight group that spans
    the planted channel loses everything else: fc2 is the fragile layer.
    """
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    with torch.no_grad():
        for layer in (model[0], model[2], model[4]):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) / layer.in_features**0.5)
            layer.bias.zero_()
        model[0].weight[5] *= scale
        model[2].weight[:, 5] /= scale
    return model.eval()


def batches(gen: torch.Generator, n: int = 3, size: int = 64) -> list[torch.Tensor]:
    return [torch.randn(size, 16, generator=gen) for _ in range(n)]


@pytest.mark.parametrize("recipe", ["int8-static", "int4-weight-only"])
def test_planted_fragile_layer_ranks_first(gen: torch.Generator, recipe: str) -> None:
    model = fragile_mlp(gen)
    data = batches(gen)
    report = sensitivity(model, data, "cosine", recipe, calibration=batches(gen, 2))
    assert report.ranked_names()[0] == "2"
    fragile = report.layers[0]
    others = report.layers[1:]
    assert fragile.drop > 2 * max(r.drop for r in others)
    # The cheap proxy must agree: the planted layer has the worst layer-output SQNR.
    assert fragile.layer_sqnr_db < min(r.layer_sqnr_db for r in others)


def test_without_the_plant_no_layer_is_fragile(gen: torch.Generator) -> None:
    model = fragile_mlp(gen, scale=1.0)
    report = sensitivity(model, batches(gen), "cosine", "int8-static", calibration=batches(gen, 2))
    assert max(r.drop for r in report.layers) < 0.5  # cosine stays above 0.995 for every layer


def test_accuracy_metric_fisher_and_report(gen: torch.Generator) -> None:
    model = fragile_mlp(gen)
    inputs = batches(gen)
    with torch.no_grad():
        data = [(x, model(x).argmax(-1)) for x in inputs]  # labels = float predictions: accuracy 1.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = sensitivity(model, data, "accuracy", "int4-weight-only")
    assert report.float_value == 1.0
    assert report.ranked_names()[0] == "2"
    # The Fisher estimate (expected loss increase) also singles out the planted layer.
    fisher = {r.name: r.fisher for r in report.layers}
    assert fisher["2"] > max(fisher["0"], fisher["4"])
    assert all(r.metric_seconds > 0 and r.sqnr_seconds > 0 and r.fisher_seconds > 0 for r in report.layers)
    # The float model is left untouched.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    table = report.to_markdown()
    assert table.index("| 1 | 2 |") < table.index("| 2 |", table.index("| 1 | 2 |") + 1)
    json.dumps(report.to_dict())  # JSON-ready (no inf)
    assert report.plot_png().startswith(b"\x89PNG")


def test_errors_are_actionable(gen: torch.Generator) -> None:
    model = fragile_mlp(gen)
    with pytest.raises(ValueError, match="calibration"):
        sensitivity(model, batches(gen), "cosine", "int8-static")
    with pytest.raises(ValueError, match="selects no layer"):
        sensitivity(model, batches(gen), "cosine", {"include": ["nothing*"]})
