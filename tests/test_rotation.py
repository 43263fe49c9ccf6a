"""Hadamard rotations of linear-layer inputs (Recipe.rotation): same function in float, smaller
W4A4 error on activations with outlier channels, composes with GPTQ, kernels, ONNX, artifacts."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit.algorithms.rotation import HadamardRotation, walsh_hadamard
from lowbit.errors import ArtifactError
from lowbit.ptq.rotate import rotated_copy
from lowbit.recipes import Recipe, WeightSpec
from lowbit.recipes.spec import ActivationSpec

W4A4 = dict(
    weight=WeightSpec(format="int4", granularity="channel", symmetric=True),
    activation=ActivationSpec(mode="dynamic", format="uint4", granularity="token", symmetric=False),
)


class Residual(nn.Module):
    """A held-out block: two linears with a residual add, then a head (widths 96 = 32 x 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down, self.head = nn.Linear(96, 192), nn.Linear(192, 96), nn.Linear(96, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.down(torch.relu(self.up(x))))


def _data(seed: int, n: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, 96, generator=g)
    x[..., 5] *= 40.0  # outlier channels, as transformers' residual streams have
    x[..., 60] *= 25.0
    return x


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.mark.parametrize("n", [1, 2, 3, 12, 64, 96, 688])
def test_rotation_is_orthogonal_and_matches_its_matrix(n: int) -> None:
    rot = HadamardRotation.random(n, seed=n)
    r = rot.matrix().double()
    assert torch.allclose(r @ r.T, torch.eye(n, dtype=torch.float64), atol=1e-5)
    x = torch.randn(4, 3, n)
    assert torch.allclose(rot(x), x @ rot.matrix(), atol=1e-5)
    assert torch.equal(HadamardRotation.random(n, seed=n).matrix(), rot.matrix())  # reproducible


def test_walsh_hadamard_is_sylvester_hadamard() -> None:
    h = torch.ones(1, 1)
    while h.shape[0] < 16:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    assert torch.allclose(walsh_hadamard(torch.eye(16)), h / 4)
    with pytest.raises(ValueError, match="power-of-two"):
        walsh_hadamard(torch.ones(12))


def test_rotated_float_model_computes_the_same_function() -> None:
    torch.manual_seed(0)
    model = Residual().eval()
    x = _data(1)
    rotated = rotated_copy(model, ["up", "down", "head"])
    assert torch.allclose(rotated(x), model(x), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(rotated.up.weight, model.up.weight)


@pytest.mark.parametrize("algorithm", ["rtn", "gptq"])
def test_rotation_lowers_w4a4_error_and_round_trips(tmp_path, algorithm: str) -> None:
    torch.manual_seed(0)
    model = Residual().eval()
    calibration = [_data(s) for s in range(4)]
    x = _data(10)
    cosines = {}
    for rotation in ("none", "hadamard"):
        recipe = Recipe(name="w4a4", rotation=rotation, **W4A4)
        if algorithm == "gptq":
            recipe = lowbit.recipes.with_overrides(recipe, weight={"algorithm": "gptq"})
        data = calibration if algorithm == "gptq" else None
        q = lowbit.quantize(model, recipe, calibration=data, progress=False)
        cosines[rotation] = _cosine(q(x), model(x))
        lowbit.save(q, tmp_path / rotation)
        back = lowbit.load(tmp_path / rotation, model=Residual())
        assert torch.equal(back(x), q(x))
    assert cosines["hadamard"] > cosines["none"] + 0.002, cosines
    manifest = json.loads((tmp_path / "hadamard" / "lowbit.json").read_text())
    assert manifest["layers"]["up"]["input_rotation"] == [96, 3]
    assert "input_rotation" not in json.loads((tmp_path / "none" / "lowbit.json").read_text())["layers"]["up"]


def test_rotation_with_integer_kernels_and_onnx(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = Residual().eval()
    x = _data(3, n=2)
    recipe = lowbit.recipes.with_overrides("int8-dynamic", rotation="hadamard")
    reference = lowbit.quantize(model, recipe, progress=False, kernels="reference")
    fast = lowbit.quantize(model, recipe, progress=False, kernels="auto")
    rel = float((fast(x) - reference(x)).norm() / reference(x).norm())
    assert rel < 1e-3  # whatever kernel this machine chose (or the reference path itself)
    path = tmp_path / "m.onnx"
    lowbit.export_onnx(reference, path, x[0])
    session = ort.InferenceSession(str(path))
    y = session.run(None, {session.get_inputs()[0].name: x[0].numpy()})[0]
    assert np.abs(y - reference(x[0]).detach().numpy()).max() < 1e-4


def test_tampered_rotation_is_refused(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    from sealing import reseal

    torch.manual_seed(0)
    q = lowbit.quantize(Residual().eval(), Recipe(name="w4a4", rotation="hadamard", **W4A4), progress=False)
    lowbit.save(q, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["up.input_rotation.odd"] = tensors["up.input_rotation.odd"] * 2  # not orthogonal any more
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    manifest = json.loads((tmp_path / "lowbit.json").read_text())
    data = (tmp_path / "model.safetensors").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    manifest["file"].update(sha256=digest, bytes=len(data), uncompressed_bytes=len(data))
    (tmp_path / "lowbit.json").write_text(json.dumps(manifest))
    reseal(tmp_path)
    with pytest.raises(ArtifactError, match="orthogonal"):
        lowbit.load(tmp_path, model=Residual())


def test_exporters_without_rotation_refuse(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    recipe = lowbit.recipes.with_overrides("int4-weight-only", rotation="hadamard")
    q = lowbit.quantize(model, recipe, progress=False)
    with pytest.raises(ArtifactError, match="rotates its input"):
        lowbit.export_gguf(q, tmp_path / "m.gguf", "Q4_0")


def test_layers_that_are_not_linear_are_named() -> None:
    model = nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2))
    recipe = lowbit.recipes.with_overrides("int8-weight-only", rotation="hadamard")
    with pytest.warns(UserWarning, match=r"inputs only; 1 other layer\(s\) keep theirs \(0\)"):
        q = lowbit.quantize(model, recipe, progress=False)
    assert getattr(q[0], "input_rotation", None) is None and q[3].input_rotation is not None
    x = torch.randn(2, 4, 8)
    assert _cosine(q(x), model(x)) > 0.99
