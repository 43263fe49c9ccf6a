"""The artifact: bit-identical reload, honest sizes, and clear errors for every kind of damage."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit.export.artifact import MANIFEST_FILE, WEIGHTS_FILE, ArtifactError


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10), nn.LayerNorm(10)
    )


@pytest.fixture
def saved(tmp_path):
    model = small_model()
    calib = [torch.randn(4, 1, 8, 8) for _ in range(2)]
    q = lowbit.quantize(model, "int8-static", calibration=calib, progress=False)
    out = tmp_path / "art"
    lowbit.save(q, out)
    return q, out


@pytest.mark.parametrize(
    "recipe", ["int8-static", "int4-weight-only", "nf4", "kmeans-4bit", "pq", "fp16", "fp8", "ternary"]
)
def test_reload_is_bit_identical(recipe, tmp_path):
    model = small_model()
    calib = [torch.randn(4, 1, 8, 8) for _ in range(2)]
    q = lowbit.quantize(model, recipe, calibration=calib, progress=False)
    lowbit.save(q, tmp_path / "a")
    reloaded = lowbit.load(tmp_path / "a", model=small_model())
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(reloaded(x), q(x))


def test_manifest_records_formats_sizes_and_provenance(saved):
    q, out = saved
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["lowbit_version"] == lowbit.__version__ and manifest["torch_version"] == torch.__version__
    assert manifest["recipe"]["name"] == "int8-static"
    layer = manifest["layers"]["3"]
    assert layer["weights"]["qweight"]["format"] == "int8" and layer["activation"]["mode"] == "static"
    assert manifest["file"]["bytes"] == os.path.getsize(out / WEIGHTS_FILE)
    stored = sum(e["bytes"] for e in manifest["tensors"].values())
    assert stored == lowbit.size_report(q).stored_bytes == manifest["totals"]["stored_bytes"]


def test_truncated_file_is_reported(saved):
    _, out = saved
    data = (out / WEIGHTS_FILE).read_bytes()
    (out / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated"):
        lowbit.load(out, model=small_model())


def test_tampered_bytes_are_reported(saved):
    _, out = saved
    data = bytearray((out / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (out / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        lowbit.load(out, model=small_model())


def test_corrupt_manifest_is_reported(saved):
    _, out = saved
    (out / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        lowbit.load(out, model=small_model())


def test_manifest_shape_tampering_names_the_tensor(saved):
    _, out = saved
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["tensors"]["3.qweight.scale"]["shape"] = [99, 1]
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="'3.qweight.scale'"):
        lowbit.load(out, model=small_model())


def test_wrong_skeleton_names_the_layer(saved):
    _, out = saved
    other = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 12))
    with pytest.raises(ArtifactError, match="layer '3'"):
        lowbit.load(out, model=other)
    with pytest.raises(ArtifactError, match="does not have"):
        lowbit.load(out, model=nn.Sequential(nn.Conv2d(1, 4, 3, padding=1)))


def test_missing_files_are_reported(tmp_path):
    with pytest.raises(ArtifactError, match="not a directory"):
        lowbit.load(tmp_path / "nope", model=small_model())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="lowbit.json"):
        lowbit.load(tmp_path / "empty", model=small_model())


def test_overwrite_is_atomic_and_leaves_no_temp_dirs(saved, tmp_path):
    q, out = saved
    lowbit.save(q, out)  # replace an existing artifact
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_FILE, WEIGHTS_FILE]
    assert [p.name for p in out.parent.iterdir()] == ["art"]


def test_failed_save_keeps_the_previous_artifact(saved, monkeypatch):
    q, out = saved
    before = (out / WEIGHTS_FILE).read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        lowbit.save(q, out)
    assert (out / WEIGHTS_FILE).read_bytes() == before
    assert [p.name for p in out.parent.iterdir()] == ["art"]


def test_lzma_compressed_artifact_round_trips(tmp_path):
    q = lowbit.quantize(small_model(), "kmeans-4bit")
    manifest = lowbit.save(q, tmp_path / "z", compression="lzma")
    assert sorted(p.name for p in (tmp_path / "z").iterdir()) == ["lowbit.json.xz", "model.safetensors.xz"]
    assert manifest["file"]["bytes"] == os.path.getsize(tmp_path / "z" / "model.safetensors.xz")
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(lowbit.load(tmp_path / "z", model=small_model())(x), q(x))


def test_no_pickle_anywhere_in_the_source():
    src = Path(lowbit.__file__).parent
    for path in src.rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text, path
        for line in text.splitlines():
            if "torch.load(" in line and "weights_only=True" not in line:
                pytest.fail(f"{path}: torch.load without weights_only=True: {line.strip()}")


def test_tied_weights_are_stored_once(tmp_path):
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.emb(ids))

    model = Tied()
    q = lowbit.quantize(model, lowbit.Recipe(modules=("conv",)), progress=False)  # nothing quantized
    manifest = lowbit.save(q, tmp_path / "t")
    assert manifest["aliases"] == {"head.weight": "emb.weight"}
    reloaded = lowbit.load(tmp_path / "t", model=Tied())
    ids = torch.tensor([[1, 2]])
    assert torch.equal(reloaded(ids), model(ids))
