"""compressed-tensors checkpoints: lowbit -> transformers (parity certificate), lowbit -> ct -> lowbit
(bit-identical codes), compressed-tensors' own checkpoints -> lowbit, and refusals of bad input."""

from __future__ import annotations

import dataclasses
import doctest
import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

import lowbit  # noqa: E402
from lowbit.errors import ArtifactError  # noqa: E402
from lowbit.interop import compressed_tensors as ct  # noqa: E402
from lowbit.interop import ct_load, ct_parity, ct_schemes  # noqa: E402
from lowbit.nn.layers import QuantizedLinear  # noqa: E402
from lowbit.recipes import ActivationSpec, Recipe, WeightSpec, resolve  # noqa: E402
from lowbit.zoo.tinylms import TinyLMConfig, build_tiny_lm  # noqa: E402

DYNAMIC = ActivationSpec(mode="dynamic", format="uint8", granularity="token", symmetric=False)


def _tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_tiny_lm(TinyLMConfig(arch, n_layer=2, n_head=4, d_model=64, context=64)).eval()


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return _tiny("llama")


@pytest.fixture(scope="module")
def tokens() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (2, 32), generator=gen) for _ in range(3)]


@pytest.fixture(scope="module")
def held_out() -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(99))


def _quantize(model: torch.nn.Module, recipe: Recipe, calibration: list | None = None) -> torch.nn.Module:
    return lowbit.quantize(model, recipe, calibration=calibration, progress=False, kernels="reference")


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), ct_parity.reference_path(model):
        return model(input_ids=ids).logits


def _assert_same_layers(a: torch.nn.Module, b: torch.nn.Module) -> int:
    """Every quantized linear of ``a`` is in ``b`` with bit-identical codes, scales and zero points."""
    count = 0
    for name, layer in a.named_modules():
        if not isinstance(layer, QuantizedLinear):
            continue
        other = b.get_submodule(name)
        assert isinstance(other, QuantizedLinear), name
        qa, qb = layer.qweight, other.qweight
        assert (qa.fmt.name, qa.block, qa.shape) == (qb.fmt.name, qb.block, qb.shape), name
        assert torch.equal(qa.codes(), qb.codes()), name
        assert torch.equal(qa.scale, qb.scale), name
        assert hasattr(qa, "zero_point") == hasattr(qb, "zero_point"), name
        if hasattr(qa, "zero_point"):
            assert torch.equal(qa.zero_point, qb.zero_point), name
        ia, ib = layer.input_quant, other.input_quant
        assert (ia is None) == (ib is None), name
        if ia is not None:
            assert (ia.spec.mode, ia.fmt.name, str(ia.granularity)) == (
                ib.spec.mode,
                ib.fmt.name,
                str(ib.granularity),
            )
            for buf in ("scale", "zero_point"):
                assert torch.equal(getattr(ia, buf, torch.zeros(0)), getattr(ib, buf, torch.zeros(0))), name
        count += 1
    assert count > 0
    return count


def _quant_config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())["quantization_config"]


# --- lowbit -> compressed-tensors -> transformers and back ----------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "granularity", "symmetric"),
    [
        ("int4", "group:32", True),
        ("int4", "group:64", True),
        ("uint4", "group:32", False),
        ("int4", "group:128", True),
    ],
)
def test_int4_export_parity_and_round_trip(llama, tokens, held_out, tmp_path, fmt, granularity, symmetric):
    recipe = Recipe(
        weight=WeightSpec(fmt, granularity, symmetric=symmetric), modules=("linear",), exclude=("lm_head",)
    )
    qmodel = _quantize(llama, recipe)
    report = ct.save_pretrained(qmodel, tmp_path / "ckpt", calibration=tokens)
    qc = _quant_config(tmp_path / "ckpt")
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    size = int(granularity.split(":")[1])
    groups = list(qc["config_groups"].values())
    assert all(g["weights"]["num_bits"] == 4 and g["weights"]["symmetric"] is symmetric for g in groups)
    if size <= 64:  # every input width (64, 256) holds whole groups: one scheme for every Linear
        assert [g["targets"] for g in groups] == [["Linear"]] and qc["ignore"] == ["lm_head"]
        assert groups[0]["weights"]["group_size"] == size
    else:  # a group wider than a 64-wide input is that whole row: two schemes, layers named
        by_size = {g["weights"]["group_size"]: g["targets"] for g in groups}
        assert sorted(by_size) == [64, 128] and qc["ignore"] == []
        assert by_size[128] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    # transformers' own loader: decompressed weights bit-identical, logits the same.
    assert report.loaded and report.inputs == "calibration" and report.tokens == 3 * 2 * 32
    assert report.max_weight_diff == 0.0 and len(report.weight_max_abs_diff) == 14
    assert report.logits_cosine_min >= 0.9999 and report.top1_agreement == 1.0 and report.ok
    if report.loader != "default":  # compressed-tensors 0.20 + transformers 5: packed zero points
        assert not symmetric and "weight_zero_point" in report.error
    on_disk = json.loads((tmp_path / "ckpt" / "parity.json").read_text())
    assert on_disk["ok"] and on_disk["max_weight_diff"] == 0.0
    # ... and back into lowbit: same codes, same outputs on held-out tokens.
    assert ct.is_compressed_tensors_dir(tmp_path / "ckpt")
    again = ct.load_compressed_tensors(tmp_path / "ckpt", kernels="reference")
    assert _assert_same_layers(qmodel, again) == 14
    assert torch.equal(_logits(again, held_out), _logits(qmodel, held_out))


def test_certificate_reports_what_transformers_cannot_load(llama, tmp_path):
    # Asymmetric (packed zero points) in two schemes: transformers 5.24 + compressed-tensors 0.20
    # fail both ways (unpacked zero points; dequantize=True decompresses with the first scheme only).
    recipe = Recipe(weight=WeightSpec("uint4", "group:128", symmetric=False), modules=("linear",))
    qmodel = _quantize(llama, recipe)
    report = ct.save_pretrained(qmodel, tmp_path / "ckpt")
    assert len(_quant_config(tmp_path / "ckpt")["config_groups"]) == 2
    if not report.loaded:
        assert "default loader failed" in report.error and "dequantize=True loader failed" in report.error
        assert not report.ok and json.loads((tmp_path / "ckpt" / "parity.json").read_text())["ok"] is False
    again = ct.load_compressed_tensors(tmp_path / "ckpt", kernels="reference")  # lowbit reads it all the same
    _assert_same_layers(qmodel, again)


def test_held_out_logits_match_transformers(llama, held_out, tmp_path):
    from transformers import AutoModelForCausalLM

    class Tokenizer:  # what save_pretrained asks of a tokenizer
        def save_pretrained(self, directory: str) -> None:
            (Path(directory) / "tokenizer.json").write_text('{"byte": true}')

    qmodel = _quantize(llama, Recipe(weight=WeightSpec("int4", "group:32"), modules=("linear",)))
    report = ct.save_pretrained(qmodel, tmp_path / "ckpt", Tokenizer())
    assert (tmp_path / "ckpt" / "tokenizer.json").read_text() == '{"byte": true}'
    assert report.inputs == "random tokens" and report.loader == "default" and report.ok
    assert "lm_head" in report.weight_max_abs_diff and _quant_config(tmp_path / "ckpt")["ignore"] == []
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        theirs = hf(input_ids=held_out).logits
    ours = _logits(qmodel, held_out)
    cos = torch.nn.functional.cosine_similarity(theirs.flatten(0, 1), ours.flatten(0, 1), dim=-1)
    assert float(cos.min()) >= 0.9999
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))


def test_w8a8_dynamic(llama, tokens, held_out, tmp_path):
    recipe = Recipe(weight=WeightSpec("int8"), activation=DYNAMIC, modules=("linear",))
    qmodel = _quantize(llama, recipe)
    report = ct.save_pretrained(qmodel, tmp_path / "ckpt", calibration=tokens)
    qc = _quant_config(tmp_path / "ckpt")
    group = qc["config_groups"]["group_0"]
    assert qc["format"] == "int-quantized" and group["weights"]["strategy"] == "channel"
    acts = group["input_activations"]
    assert (acts["strategy"], acts["dynamic"], acts["symmetric"], acts["num_bits"]) == (
        "token",
        True,
        False,
        8,
    )
    # compressed-tensors divides by the scale where lowbit multiplies by its inverse: ties round
    # apart now and then, so logits agree closely, not bit for bit (measured: cosine >= 0.99999).
    assert report.loader == "default" and report.max_weight_diff == 0.0
    assert report.logits_cosine_min >= 0.9999 and report.top1_agreement >= 0.99
    again = ct.load_compressed_tensors(tmp_path / "ckpt", kernels="reference")
    _assert_same_layers(qmodel, again)
    assert torch.equal(_logits(again, held_out), _logits(qmodel, held_out))


def test_w8a8_static_and_fp8(llama, tokens, held_out, tmp_path):
    static = dataclasses.replace(resolve("int8-static"), modules=("linear",), exclude=("lm_head",))
    fp8 = Recipe(weight=WeightSpec("fp8_e4m3"), modules=("linear",), exclude=("lm_head",))
    for name, recipe, fmt in (("static", static, "int-quantized"), ("fp8", fp8, "naive-quantized")):
        qmodel = _quantize(llama, recipe, tokens)
        report = ct.save_pretrained(qmodel, tmp_path / name, calibration=tokens)
        assert _quant_config(tmp_path / name)["format"] == fmt
        assert report.loader == "default" and report.max_weight_diff == 0.0, name
        assert report.logits_cosine_min >= 0.9999, (name, report.logits_cosine_min)
        again = ct.load_compressed_tensors(tmp_path / name, kernels="reference")
        _assert_same_layers(qmodel, again)
        assert torch.equal(_logits(again, held_out), _logits(qmodel, held_out))


def test_gpt2_conv1d_is_refused_and_its_linear_head_exports(tmp_path, held_out):
    gpt2 = _tiny("gpt2")
    everything = _quantize(gpt2, Recipe(weight=WeightSpec("int4", "group:32"), modules=("linear",)))
    with pytest.raises(ArtifactError, match=r"transformer\.h\.0\.attn\.c_attn is Hugging Face's Conv1D"):
        ct.save_pretrained(everything, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    head = _quantize(
        gpt2, Recipe(weight=WeightSpec("uint4", "group:64", symmetric=False), include=("lm_head",))
    )
    report = ct.save_pretrained(head, tmp_path / "ckpt")
    assert report.ok and list(report.weight_max_abs_diff) == ["lm_head"]
    again = ct.load_compressed_tensors(tmp_path / "ckpt", kernels="reference")
    _assert_same_layers(head, again)
    assert torch.equal(_logits(again, held_out), _logits(head, held_out))


@pytest.mark.parametrize(
    ("recipe", "match"),
    [
        (Recipe(weight=WeightSpec("nf4", "group:32"), modules=("linear",)), "nf4 has no compressed-tensors"),
        (Recipe(weight=WeightSpec("int4", "group:48"), modules=("linear",)), "groups of 48 do not divide"),
        (Recipe(weight=WeightSpec("int4", "group:32")), "quantized embedding layer"),
        (
            Recipe(
                weight=WeightSpec("int8"),
                activation=ActivationSpec(mode="dynamic", format="int8", granularity="token", symmetric=True),
                modules=("linear",),
            ),
            "symmetric dynamic inputs",
        ),
    ],
)
def test_export_refuses_what_it_cannot_store(llama, tmp_path, recipe, match):
    qmodel = _quantize(llama, recipe)
    with pytest.raises(ArtifactError, match=match):
        ct.save_pretrained(qmodel, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []  # no directory, no staging leftovers


def test_export_failure_after_staging_leaves_nothing(llama, tmp_path, monkeypatch):
    qmodel = _quantize(llama, Recipe(weight=WeightSpec("int4", "group:32"), modules=("linear",)))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ct_parity, "certify", broken)
    monkeypatch.setattr(ct, "certify", broken)
    with pytest.raises(OSError, match="disk full"):
        ct.save_pretrained(qmodel, tmp_path / "ckpt")
    assert [p.name for p in tmp_path.iterdir()] == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ArtifactError, match="not a lowbit compressed-tensors export"):
        ct.save_pretrained(qmodel, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


# --- compressed-tensors' own checkpoints -> lowbit ------------------------------------------------------


def _ct_checkpoint(directory: Path, weights: dict, inputs: dict | None = None) -> None:
    """A checkpoint written by compressed-tensors itself: apply the config, compute each weight's
    qparams with its ``calculate_qparams``, compress with ``ModelCompressor``, save as llm-compressor does."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    model = _tiny("llama", seed=3)
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(**weights),
        input_activations=None if inputs is None else QuantizationArgs(**inputs),
    )
    apply_quantization_config(
        model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"])
    )
    for module in model.modules():
        args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
        if args is None:
            continue
        w = module.weight.detach()
        if args.strategy == "group":
            w = w.unflatten(-1, (w.shape[-1] // args.group_size, args.group_size))
            lo, hi = w.amin(-1), w.amax(-1)
        else:
            lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale, zero_point = calculate_qparams(lo, hi, args)
        module.weight_scale.data.copy_(scale)
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zero_point)
        module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(directory)
    compressor.update_config(directory)


def _transformers(directory: Path, dequantize: bool = False) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return AutoModelForCausalLM.from_pretrained(directory, **kwargs).eval()


@pytest.mark.parametrize(
    ("weights", "inputs", "exact"),
    [
        ({"num_bits": 4, "strategy": "group", "group_size": 32}, None, True),
        ({"num_bits": 4, "strategy": "group", "group_size": 32, "symmetric": False}, None, True),
        (
            {"num_bits": 8, "strategy": "channel"},
            {"num_bits": 8, "strategy": "token", "dynamic": True, "symmetric": False},
            False,
        ),
    ],
)
def test_checkpoint_written_by_compressed_tensors_imports(tmp_path, held_out, weights, inputs, exact):
    _ct_checkpoint(tmp_path, weights, inputs)
    ours = ct.load_compressed_tensors(tmp_path, kernels="reference")
    # transformers 5 + compressed-tensors 0.20 cannot load asymmetric pack-quantized checkpoints
    # (it allocates unpacked zero points): compare with its dequantize-on-load path there.
    hf = _transformers(tmp_path, dequantize=not weights.get("symmetric", True))
    with torch.no_grad():
        theirs = hf(input_ids=held_out).logits
    for name, layer in ours.named_modules():
        if isinstance(layer, QuantizedLinear):
            assert torch.equal(layer.qweight.dequantize(), hf.get_submodule(name).weight.detach()), name
    mine = _logits(ours, held_out)
    if exact:
        assert torch.equal(mine, theirs)
    cos = torch.nn.functional.cosine_similarity(mine.flatten(0, 1), theirs.flatten(0, 1), dim=-1)
    assert float(cos.min()) >= 0.9999
    assert isinstance(ours.lm_head, torch.nn.Linear) and not isinstance(ours.lm_head, QuantizedLinear)


# --- bad input ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory, llama) -> Path:
    qmodel = _quantize(llama, Recipe(weight=WeightSpec("int4", "group:32"), modules=("linear",)))
    path = tmp_path_factory.mktemp("good") / "ckpt"
    ct.save_pretrained(qmodel, path)
    return path


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bad"
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, edit) -> None:  # noqa: ANN001
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def _edit_tensors(path: Path, edit) -> None:  # noqa: ANN001
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _group(config: dict) -> dict:
    return config["quantization_config"]["config_groups"]["group_0"]


Q_PROJ = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    ("edit_config", "edit_tensors", "match"),
    [
        (lambda c: c["quantization_config"].update(format="marlin-24"), None, "format is 'marlin-24'"),
        (lambda c: _group(c).update(format="int4-awesome"), None, "format.*int4-awesome"),
        (
            lambda c: _group(c)["weights"].update(strategy="diagonal"),
            None,
            "not a valid compressed-tensors config",
        ),
        (lambda c: _group(c)["weights"].update(shuffle=True), None, "not a valid compressed-tensors config"),
        (
            lambda c: c["quantization_config"].update(quant_method="gptq"),
            None,
            "quant_method 'compressed-tensors'",
        ),
        (lambda c: _group(c)["weights"].update(num_bits=3), None, "weight_packed has shape"),
        (lambda c: c.update(intermediate_size=512), None, "mlp.gate_proj.weight_scale has shape"),
        (None, lambda t: t.pop(f"{Q_PROJ}.weight_scale"), f"tensor {Q_PROJ}.weight_scale is missing"),
        (None, lambda t: t.pop("model.norm.weight"), "tensor model.norm.weight is missing"),
        (
            None,
            lambda t: t.update({f"{Q_PROJ}.weight_scale": torch.ones(64, 3)}),
            r"has shape \[64, 3\], expected \[64, 2\]",
        ),
        (None, lambda t: t.update({f"{Q_PROJ}.weight_shape": torch.tensor([64, 65])}), "weight_shape is"),
        (
            None,
            lambda t: t.update({f"{Q_PROJ}.weight_scale": torch.full((64, 2), float("nan"))}),
            "NaN or Inf",
        ),
        (
            None,
            lambda t: t.update({f"{Q_PROJ}.weight_g_idx": torch.zeros(64, dtype=torch.int32)}),
            "does not use",
        ),
    ],
)
def test_import_refuses_bad_checkpoints(good_ckpt, tmp_path, edit_config, edit_tensors, match):
    bad = _copy(good_ckpt, tmp_path)
    if edit_config is not None:
        _edit_config(bad, edit_config)
    if edit_tensors is not None:
        _edit_tensors(bad, edit_tensors)
    with pytest.raises(ArtifactError, match=match):
        ct.load_compressed_tensors(bad, kernels="reference")


def test_import_refuses_truncated_and_missing_files(good_ckpt, tmp_path):
    bad = _copy(good_ckpt, tmp_path)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="model.safetensors"):
        ct.load_compressed_tensors(bad, kernels="reference")
    (bad / "model.safetensors").unlink()
    assert not ct.is_compressed_tensors_dir(bad)
    with pytest.raises(ArtifactError, match="model.safetensors is missing"):
        ct.load_compressed_tensors(bad, kernels="reference")
    with pytest.raises(ArtifactError, match="not a directory"):
        ct.load_compressed_tensors(tmp_path / "nowhere")


def test_docstrings_run():
    for module in (ct, ct_load, ct_parity, ct_schemes):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__


def test_lowbit_load_and_the_cli_take_compressed_tensors(good_ckpt, llama, tmp_path, held_out, capsys):
    import lowbit
    from lowbit.cli import main

    mine = lowbit.load(good_ckpt, kernels="reference")
    direct = ct.load_compressed_tensors(good_ckpt, kernels="reference")
    assert torch.equal(_logits(mine, held_out), _logits(direct, held_out))
    with pytest.raises(TypeError, match="kernels"):
        lowbit.load(good_ckpt, allow_unsealed=True)

    source = tmp_path / "float"
    llama.save_pretrained(source)
    out = tmp_path / "ct"
    recipe = tmp_path / "w8.yaml"
    recipe.write_text("name: w8\nweight: {format: int8, granularity: channel}\nmodules: [linear]\n")
    code = main(["export", str(source), "--recipe", str(recipe), "--format", "hf", "-o", str(out)])
    assert code in (0, 1) and (out / "config.json").is_file() and (out / "parity.json").is_file()
    assert "transformers" in capsys.readouterr().out
