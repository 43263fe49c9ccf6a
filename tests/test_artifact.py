"""The artifact: bit-identical reload, honest sizes, and clear errors for every kind of damage."""

from __future__ import annotations

import hashlib
import json
import lzma
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
import lowbit.eval.artifact_info
from lowbit import packing
from lowbit.export import compact
from lowbit.export.artifact import CODED_VERSION, MANIFEST_FILE, WEIGHTS_FILE, ArtifactError, read_manifest
from lowbit.export.seal import SEAL_FILE
from sealing import reseal


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
    with pytest.raises(ArtifactError, match="does not match its sha256 in lowbit.sha256"):
        lowbit.load(out, model=small_model())
    reseal(out)
    with pytest.raises(ArtifactError, match="not valid JSON"):
        lowbit.load(out, model=small_model())


def test_manifest_shape_tampering_names_the_tensor(saved):
    _, out = saved
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["tensors"]["3.qweight.scale"]["shape"] = [99, 1]
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    reseal(out)
    with pytest.raises(ArtifactError, match="3.qweight.scale"):
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
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_FILE, SEAL_FILE, WEIGHTS_FILE]
    assert sorted(p.name for p in out.parent.iterdir()) == [".art.lock", "art"]  # the lock file stays


def test_failed_save_keeps_the_previous_artifact(saved, monkeypatch):
    q, out = saved
    before = (out / WEIGHTS_FILE).read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        lowbit.save(q, out)
    assert (out / WEIGHTS_FILE).read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == [".art.lock", "art"]


def test_lzma_compressed_artifact_round_trips(tmp_path):
    q = lowbit.quantize(small_model(), "kmeans-4bit")
    manifest = lowbit.save(q, tmp_path / "z", compression="lzma")
    names = sorted(p.name for p in (tmp_path / "z").iterdir())
    assert names == ["lowbit.json.xz", SEAL_FILE, "model.safetensors.xz"]
    assert manifest["file"]["bytes"] == os.path.getsize(tmp_path / "z" / "model.safetensors.xz")
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(lowbit.load(tmp_path / "z", model=small_model())(x), q(x))


@pytest.mark.parametrize(
    "recipe", ["int8-static", "int4-weight-only", "nf4", "kmeans-4bit", "pq", "fp16", "fp8", "ternary"]
)
def test_coded_artifact_manifest_is_compact_and_reads_back_in_full(recipe, tmp_path):
    model = small_model()
    calib = [torch.randn(4, 1, 8, 8) for _ in range(2)]
    q = lowbit.quantize(model, recipe, calibration=calib, progress=False)
    plain = lowbit.save(q, tmp_path / "plain")
    coded = lowbit.save(q, tmp_path / "coded", compression="lzma")
    assert coded["lowbit_artifact"] == CODED_VERSION
    assert read_manifest(tmp_path / "coded") == coded  # the compact file expands to what save returned
    # Apart from the version, the file entry and the tensor codings, it is the plain manifest.
    drop = ("lowbit_artifact", "file")
    assert {k: v for k, v in coded.items() if k not in drop and k != "tensors"} == {
        k: v for k, v in plain.items() if k not in drop and k != "tensors"
    }
    assert {k: {f: v for f, v in e.items() if f != "coding"} for k, e in coded["tensors"].items()} == plain[
        "tensors"
    ]
    compact = json.loads(lzma.decompress((tmp_path / "coded" / "lowbit.json.xz").read_bytes()))
    assert "totals" not in compact and all(isinstance(row, list) for row in compact["tensors"].values())
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(lowbit.load(tmp_path / "coded", model=small_model())(x), q(x))
    info = lowbit.eval.artifact_info.inspect_artifact(tmp_path / "coded")
    assert not info.problems and info.stored_bytes == plain["totals"]["stored_bytes"]


def test_version_1_lzma_artifacts_still_load_when_allowed(tmp_path):
    """Artifacts written before format 2: one xz-coded safetensors file and the full manifest, no seal."""
    q = lowbit.quantize(small_model(), "kmeans-4bit")
    manifest = lowbit.save(q, tmp_path / "old")
    manifest.update(lowbit_artifact=1, created="2026-01-01T00:00:00+00:00")
    (tmp_path / "old" / SEAL_FILE).unlink()
    data = lzma.compress((tmp_path / "old" / WEIGHTS_FILE).read_bytes())
    manifest["file"].update(name=WEIGHTS_FILE + ".xz", compression="lzma", bytes=len(data))
    manifest["file"]["sha256"] = hashlib.sha256(data).hexdigest()
    (tmp_path / "old" / WEIGHTS_FILE).unlink()
    (tmp_path / "old" / MANIFEST_FILE).unlink()
    (tmp_path / "old" / (WEIGHTS_FILE + ".xz")).write_bytes(data)
    (tmp_path / "old" / (MANIFEST_FILE + ".xz")).write_bytes(lzma.compress(json.dumps(manifest).encode()))
    with pytest.raises(ArtifactError, match="allow_unsealed=True"):
        read_manifest(tmp_path / "old")
    assert read_manifest(tmp_path / "old", allow_unsealed=True)["lowbit_artifact"] == 1
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(lowbit.load(tmp_path / "old", model=small_model(), allow_unsealed=True)(x), q(x))


def test_coded_artifact_damage_is_reported(tmp_path):
    q = lowbit.quantize(small_model(), "kmeans-4bit")
    out = tmp_path / "z"
    lowbit.save(q, out, compression="lzma")
    path = out / (MANIFEST_FILE + ".xz")
    compact = json.loads(lzma.decompress(path.read_bytes()))
    rows = compact["tensors"]
    rows["3.qweight.scale"][1] = "oops"  # the shape
    path.write_bytes(lzma.compress(json.dumps(compact).encode()))
    with pytest.raises(ArtifactError, match="sha256"):
        lowbit.load(out, model=small_model())
    reseal(out)
    with pytest.raises(ArtifactError, match="'3.qweight.scale'"):
        lowbit.load(out, model=small_model())
    lowbit.save(q, out, compression="lzma")
    data = bytearray((out / (WEIGHTS_FILE + ".xz")).read_bytes())
    data[-1] ^= 0xFF
    (out / (WEIGHTS_FILE + ".xz")).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        lowbit.load(out, model=small_model())


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_run_length_coding_is_exact(bits, gen):
    fields = torch.randint(0, 1 << bits, (4000,), generator=gen)
    fields[torch.rand(4000, generator=gen) < 0.9] = (1 << bits) - 1  # the common code need not be 0
    fields[100:1500] = (1 << bits) - 1  # a gap longer than 255 needs escape bytes
    raw = packing.pack(fields, bits) if bits < 8 else fields.to(torch.uint8)
    coding, gaps, values = compact._encode_runs(raw, bits)
    assert coding[:3] == ["runs", bits, (1 << bits) - 1] and gaps.numel() > coding[3]  # escapes were used
    assert torch.equal(compact._decode_runs(coding, raw.numel(), gaps, values), raw)
    assert compact._encode_runs(torch.randint(0, 256, (64,), dtype=torch.uint8, generator=gen), 4) is None


def test_no_pickle_anywhere_in_the_source():
    src = Path(lowbit.__file__).parent
    for path in src.rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text, path
        for line in text.splitlines():
            if "torch.load(" in line and "weights_only=True" not in line:
                pytest.fail(f"{path}: torch.load without weights_only=True: {line.strip()}")


@pytest.mark.parametrize("compression", ["none", "lzma"])
def test_tied_weights_are_stored_once(compression, tmp_path):
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
    manifest = lowbit.save(q, tmp_path / "t", compression=compression)
    assert manifest["aliases"] == {"head.weight": "emb.weight"}
    reloaded = lowbit.load(tmp_path / "t", model=Tied())
    ids = torch.tensor([[1, 2]])
    assert torch.equal(reloaded(ids), model(ids))
