"""Artifacts from strangers: the seal covers every byte, the schema is strict, reads are bounded,
and the same model saved twice (in two processes) gives the same bytes."""

from __future__ import annotations

import doctest
import json
import lzma
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit.eval.artifact_info import inspect_artifact
from lowbit.export import compact as compact_module
from lowbit.export import manifest_schema, safe_read, seal
from lowbit.export.artifact import MANIFEST_FILE, SEAL_FILE, WEIGHTS_FILE, ArtifactError
from sealing import reseal


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


@pytest.fixture
def art(tmp_path: Path) -> tuple[nn.Module, Path]:
    q = lowbit.quantize(mlp(), "int8-weight-only", progress=False)
    lowbit.save(q, tmp_path / "a")
    return q, tmp_path / "a"


def edit_manifest(directory: Path, change) -> None:  # noqa: ANN001
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    change(manifest)
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize("module", [safe_read, seal, manifest_schema])
def test_documented_examples_run(module) -> None:  # noqa: ANN001
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_seal_is_sha256sum_format_and_covers_every_file(art) -> None:  # noqa: ANN001
    _, out = art
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_FILE, SEAL_FILE, WEIGHTS_FILE]
    if shutil.which("sha256sum"):
        done = subprocess.run(["sha256sum", "-c", SEAL_FILE], cwd=out, capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout.count(": OK") == 2, done.stdout


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m["aliases"].update({"2.bias": "0.bias"}), "aliases.2.bias"),
        (lambda m: m["layers"]["0"]["weights"]["qweight"].update(format="int9"), "unknown format 'int9'"),
        (lambda m: m["layers"]["0"]["weights"]["qweight"].update(symmetric="no"), "symmetric"),
        (lambda m: m["layers"]["0"]["weights"]["qweight"].update(shape=[60000, 60000]), "its format needs"),
        (lambda m: m["tensors"]["0.bias"].update(shape=[8.0]), "tensors.0.bias.shape"),
        (lambda m: m["tensors"]["0.bias"].update(dtype="float128"), "tensors.0.bias.dtype"),
        (lambda m: m.update(created="2026-01-01"), "created"),
        (lambda m: m.update(surprise=1), "surprise"),
        (lambda m: m["file"].update(uncompressed_bytes=1 << 40), "do not fit"),
        (lambda m: m["recipe"]["weight"].update(bits=3), "recipe"),
        (lambda m: m["recipe"]["weight"].update(symmetric="no"), "recipe.weight.symmetric"),
        (lambda m: m["tensors"].update({"0.extra": m["tensors"]["0.bias"]}), "0.extra"),
    ],
)
def test_manifest_edits_are_caught_by_the_seal_and_then_by_the_schema(art, change, message) -> None:  # noqa: ANN001
    _, out = art
    edit_manifest(out, change)
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        lowbit.load(out, model=mlp())
    reseal(out)  # digests right again: the schema and consistency checks must say no
    with pytest.raises(ArtifactError, match=message):
        lowbit.load(out, model=mlp())
    with pytest.raises(ArtifactError):
        inspect_artifact(out)


def test_an_alias_only_joins_tensors_the_model_ties(art) -> None:  # noqa: ANN001
    _, out = art

    def tie(m: dict) -> None:
        m["tensors"]["0.qweight.scale"].update(shape=[4, 1], bytes=16)  # as large as 2's
        m["aliases"]["2.qweight.scale"] = m["tensors"].pop("2.qweight.scale") and "0.qweight.scale"

    edit_manifest(out, tie)
    reseal(out)
    with pytest.raises(ArtifactError):
        lowbit.load(out, model=mlp())


def test_deeply_nested_and_non_finite_json_is_refused(art) -> None:  # noqa: ANN001
    _, out = art
    (out / MANIFEST_FILE).write_text("[" * 100_000 + "]" * 100_000)
    reseal(out)
    with pytest.raises(ArtifactError, match="nests deeper"):
        lowbit.load(out, model=mlp())
    text = (out / MANIFEST_FILE).write_text('{"lowbit_artifact": NaN}')
    reseal(out)
    with pytest.raises(ArtifactError, match="not valid JSON"):
        lowbit.load(out, model=mlp())
    assert text


@pytest.mark.parametrize("target", ["/proc/self/mem", "/dev/zero", "missing-file"])
@pytest.mark.parametrize("name", [WEIGHTS_FILE, MANIFEST_FILE, SEAL_FILE])
def test_links_and_special_files_are_refused(art, name, target) -> None:  # noqa: ANN001
    _, out = art
    (out / name).unlink()
    os.symlink(target, out / name)
    with pytest.raises(ArtifactError, match="symbolic link|missing"):
        lowbit.load(out, model=mlp())


def test_a_directory_in_place_of_a_file_is_refused(art) -> None:  # noqa: ANN001
    _, out = art
    (out / WEIGHTS_FILE).unlink()
    (out / WEIGHTS_FILE).mkdir()
    with pytest.raises(ArtifactError, match="not a regular file"):
        lowbit.load(out, model=mlp())


def test_a_removed_seal_is_refused_unless_unsealed_is_allowed(art) -> None:  # noqa: ANN001
    _, out = art
    (out / SEAL_FILE).unlink()
    with pytest.raises(ArtifactError, match="allow_unsealed=True"):
        lowbit.load(out, model=mlp())
    # A sealed version never loads unsealed, even when allowed: downgrades are refused.
    with pytest.raises(ArtifactError, match="always sealed"):
        lowbit.load(out, model=mlp(), allow_unsealed=True)


def test_verify_seal_hook_runs_first_and_can_refuse(art) -> None:  # noqa: ANN001
    q, out = art
    seen = []
    lowbit.load(out, model=mlp(), verify_seal=seen.append)
    assert seen == [out / SEAL_FILE]

    def refuse(path: Path) -> None:
        raise PermissionError("bad signature")

    with pytest.raises(ArtifactError, match="bad signature"):
        lowbit.load(out, model=mlp(), verify_seal=refuse)


def test_lzma_bomb_is_capped_before_it_inflates(tmp_path) -> None:  # noqa: ANN001
    q = lowbit.quantize(mlp(), "int8-weight-only", progress=False)
    out = tmp_path / "z"
    lowbit.save(q, out, compression="lzma")
    bomb = lzma.compress(b"\0" * (64 << 20), format=lzma.FORMAT_ALONE)  # 64 MiB from ~10 KB
    (out / (MANIFEST_FILE + ".xz")).write_bytes(bomb)
    reseal(out)
    with pytest.raises(ArtifactError, match="decompresses to more than|not valid JSON|not UTF-8|nests"):
        lowbit.load(out, model=mlp())
    assert len(safe_read.lzma_bounded(bomb, 1 << 27, out)) == 64 << 20
    with pytest.raises(ArtifactError, match="more than the 1,000"):
        safe_read.lzma_bounded(bomb, 1000, out)


def test_inspect_says_what_it_checked_and_what_it_did_not(art) -> None:  # noqa: ANN001
    _, out = art
    (out / "README.txt").write_text("notes")
    info = inspect_artifact(out)
    assert info.verified and any(SEAL_FILE in c for c in info.checks)
    assert any("authenticity" in c for c in info.not_checked)
    assert any("README.txt" in c for c in info.not_checked)
    assert "created" not in info.provenance


SAVE_SCRIPT = textwrap.dedent(
    """
    import sys, torch, lowbit
    torch.set_num_threads(int(sys.argv[3]))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    calib = [torch.randn(8, 32) for _ in range(4)]
    q = lowbit.quantize(model, "int8-static", calibration=calib, progress=False)
    lowbit.save(q, sys.argv[1], compression=sys.argv[2], metrics={"note": "same"})
    """
)


@pytest.mark.parametrize("compression", ["none", "lzma"])
def test_two_processes_save_identical_bytes(tmp_path, compression) -> None:  # noqa: ANN001
    for i, threads in ((0, 1), (1, 2)):
        env = {**os.environ, "PYTHONHASHSEED": str(i)}  # different hash order in each process
        subprocess.run(
            [sys.executable, "-c", SAVE_SCRIPT, str(tmp_path / f"a{i}"), compression, str(threads)],
            check=True,
            env=env,
            capture_output=True,
        )
    names = sorted(p.name for p in (tmp_path / "a0").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "a1").iterdir()) and len(names) == 3
    for name in names:
        assert (tmp_path / "a0" / name).read_bytes() == (tmp_path / "a1" / name).read_bytes(), name


def test_an_unknown_observer_is_an_artifact_error(tmp_path) -> None:  # noqa: ANN001
    calib = [torch.randn(8, 16) for _ in range(4)]
    q = lowbit.quantize(mlp(), "int8-static", calibration=calib, progress=False)
    out = tmp_path / "s"
    lowbit.save(q, out)
    edit_manifest(out, lambda m: m["layers"]["0"]["activation"].update(observer="bogus"))
    reseal(out)
    with pytest.raises(ArtifactError, match="unknown observer 'bogus'"):
        lowbit.load(out, model=mlp())


def test_a_recoded_float_row_at_an_odd_stream_offset_is_no_crash(tmp_path) -> None:  # noqa: ANN001
    """Found by the fuzzer: ``planes`` rewritten as ``raw`` left a float tensor at an offset its width
    does not divide. Such a row is refused now, and decoding copies rather than views anyway."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(15, 3))
    with torch.no_grad():
        model[0].weight[:, 2:] = 0  # mostly zero codes: run-length coded, 5 runs: odd stream sizes
        model[0].weight[0, 1] = 0
    q = lowbit.quantize(model, "int8-weight-only", progress=False)
    out = tmp_path / "c"
    lowbit.save(q, out, compression="lzma")
    path = out / (MANIFEST_FILE + ".xz")
    compact = json.loads(lzma.decompress(path.read_bytes()))
    compact["tensors"]["0.bias"][2:] = ["raw"]
    path.write_bytes(lzma.compress(json.dumps(compact).encode()))
    reseal(out)
    with pytest.raises(ArtifactError, match="malformed manifest row"):  # the saver never writes that
        lowbit.load(out, model=nn.Sequential(nn.Linear(15, 3)))
    stream = torch.zeros(11, dtype=torch.uint8)
    entry = {"coding": ["raw"], "shape": [2], "dtype": "float32"}
    decoded = compact_module._decode(entry, "x", lambda s, n: stream[3 : 3 + n])  # an odd offset
    assert torch.equal(decoded, torch.zeros(2))
