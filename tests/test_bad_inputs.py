"""The bad-input matrix (issue 16, item 7): every odd recipe, data file, calibration set and model
gets one clear error type naming the key, file (and line) or layer; nothing leaks a TypeError,
an IndexError or a silently wrong result."""

from __future__ import annotations

import dataclasses
import doctest
import io
import tracemalloc
import typing
import warnings
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
import lowbit.errors
import lowbit.ptq.checks
import lowbit.recipes.schema
from lowbit.cli import main
from lowbit.errors import DataError, ModelError, RecipeError
from lowbit.eval import datafile
from lowbit.eval.datafile import load_data
from lowbit.recipes import ActivationSpec, LayerRule, Recipe, WeightSpec, resolve


def test_the_error_types_are_value_errors_exported_at_the_top():
    for cls in (RecipeError, DataError, ModelError):
        assert issubclass(cls, ValueError) and getattr(lowbit, cls.__name__) is cls and cls.__doc__


@pytest.mark.parametrize("module", [lowbit.errors, lowbit.recipes.schema, lowbit.ptq.checks, datafile])
def test_documented_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# --- recipes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("weight:\n  symmetric: 'no'\n", "recipe.weight.symmetric: expected true or false, got 'no'"),
        ("exclude: 'features.0'\n", "recipe.exclude: expected a list, got 'features.0'"),
        ("smoothquant_alpha: '0.5'\n", "recipe.smoothquant_alpha: expected a number, got '0.5'"),
        ("smoothquant_alpha: .nan\n", "recipe.smoothquant_alpha: expected a finite number"),
        ("version: true\n", "recipe.version: expected an integer, got True"),
        ("bias_correction: 1\n", "recipe.bias_correction: expected true or false, got 1"),
        ("name: 7\n", "recipe.name: expected a string, got 7"),
        ("modules: [linear, 3]\n", r"recipe.modules\[1\]: expected a string"),
        ("overrides: [{pattern: fc, weight: {symmetric: 'yes'}}]\n", r"recipe.overrides\[0\].weight.symm"),
        ("overrides: [{weight: {format: int4}}]\n", r"recipe.overrides\[0\].pattern: missing"),
        ("overrides: {pattern: fc}\n", "recipe.overrides: expected a list"),
        ("activation:\n  mode: static\n  granularity: token\n", "recipe.activation: static activations"),
        ("weight: {format: int9}\n", "recipe.weight: unknown format 'int9'"),
        ("weight: int8\n", "recipe.weight: expected a mapping"),
        ("weight:\n  format: int8\n  granularty: channel\n", "unknown key 'granularty' in recipe.weight"),
        ("weight: {format: int8}\nweight: {format: int4}\n", "key 'weight' is given twice"),
        ("- int8\n", "a recipe must be a mapping"),
        ("weight: !!python/object/apply:os.system ['true']\n", "does not parse as YAML"),
    ],
)
def test_recipe_values_are_type_checked_with_the_key_path(yaml_text, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_yaml(yaml_text)


def _wrong_value(tp: typing.Any) -> typing.Any:
    """A value of the wrong type for an annotation (the kind YAML produces by accident)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        return _wrong_value(next(a for a in typing.get_args(tp) if a is not type(None)))
    if origin is tuple:
        return "not-a-list"
    if dataclasses.is_dataclass(tp):
        return "not-a-mapping"
    return {bool: "no", str: 5, int: True, float: "0.5"}[tp]


@pytest.mark.parametrize(
    ("cls", "prefix", "wrap"),
    [
        (Recipe, "recipe", lambda d: d),
        (WeightSpec, "recipe.weight", lambda d: {"weight": d}),
        (ActivationSpec, "recipe.activation", lambda d: {"activation": d}),
        (LayerRule, "recipe.overrides[0]", lambda d: {"overrides": [{"pattern": "x", **d}]}),
    ],
)
def test_every_field_refuses_a_wrong_type_from_a_dict_and_from_python(cls, prefix, wrap):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        bad = _wrong_value(hints[f.name])
        with pytest.raises(RecipeError, match=f"^{prefix}.{f.name}: expected ".replace("[", r"\[")):
            Recipe.from_dict(wrap({f.name: bad}))
        kwargs = {"pattern": "x"} if cls is LayerRule else {}
        with pytest.raises(RecipeError, match=f"^{cls.__name__}.{f.name}: expected "):
            cls(**{**kwargs, f.name: bad})


def test_recipes_built_in_python_are_checked_too():
    with pytest.raises(RecipeError, match="WeightSpec.symmetric: expected true or false, got 'no'"):
        WeightSpec(symmetric="no")
    with pytest.raises(RecipeError, match="Recipe.exclude: expected a tuple, got 'features.0'"):
        Recipe(exclude="features.0")
    with pytest.raises(RecipeError, match="Recipe.weight: expected an instance of WeightSpec"):
        Recipe(weight={"format": "int4"})
    with pytest.raises(RecipeError, match="unknown format 'int9'"):
        WeightSpec(format="int9")  # the value checks of __post_init__ are RecipeErrors as well
    good = Recipe(exclude=("lm_head",), overrides=(LayerRule("fc*", weight=WeightSpec(format="int4")),))
    assert Recipe.from_yaml(good.to_yaml()) == good and hash(good) == hash(Recipe.from_dict(good.to_dict()))


def test_lists_ints_and_null_activation_still_read():
    r = Recipe.from_dict({"exclude": ("a",), "smoothquant_alpha": 1, "activation": None, "weight": None})
    assert r.exclude == ("a",) and r.smoothquant_alpha == 1.0 and r.activation == ActivationSpec()
    assert r.weight is None
    assert Recipe.from_yaml("allow_saturation: true\n").allow_saturation is True


def test_recipe_files_name_the_file_and_line(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"name: ok\ndescription: caf\xe9\n")
    with pytest.raises(RecipeError, match=r"latin1.yaml is not UTF-8 text \(byte 0xe9 on line 2\)"):
        resolve(str(latin1))
    broken = tmp_path / "broken.yaml"
    broken.write_text("weight:\n  format: [int8\n")
    with pytest.raises(RecipeError, match=r"broken.yaml does not parse as YAML \(line \d+, column \d+\)"):
        resolve(str(broken))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("weight:\n  symmetric: 'no'\n")
    with pytest.raises(RecipeError, match=r"recipe file .*wrong.yaml: recipe.weight.symmetric: expected"):
        resolve(str(wrong))
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    with pytest.raises(RecipeError, match="empty.yaml is empty"):
        resolve(str(tmp_path / "empty.yaml"))
    with pytest.raises(RecipeError, match="does not exist"):
        resolve(str(tmp_path / "missing.yaml"))
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (lowbit.recipes.schema.MAX_RECIPE_BYTES + 1))
    with pytest.raises(RecipeError, match="a recipe is at most"):
        resolve(str(big))
    ok = tmp_path / "ok.yaml"
    Recipe(name="mine", allow_saturation=True).save(ok)
    assert resolve(str(ok)) == Recipe(name="mine", allow_saturation=True)


# --- data files -------------------------------------------------------------------------------------


class _Tokenizer:  # decoding is checked before any tokenizing
    def __call__(self, texts, **kw):
        return {"input_ids": torch.arange(len(texts) * 3).reshape(len(texts), 3)}


def test_non_utf8_text_names_the_file_and_line(tmp_path):
    path = tmp_path / "sentences.txt"
    path.write_bytes(b"first line\nsecond line\nthird \xff line\n")
    with pytest.raises(DataError, match=r"sentences.txt, line 3: not UTF-8 text \(byte 0xff at column 7\)"):
        load_data(path, tokenizer=_Tokenizer())
    path.write_bytes("first line\nsecond, caf\u00e9\n".encode())
    assert load_data(path, tokenizer=_Tokenizer()).samples == 2


def test_a_pt_that_is_not_a_tensor_file_is_one_clean_sentence(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"this is not a tensor file")
    with pytest.raises(DataError) as info:
        load_data(path)
    text = str(info.value)
    assert "bad.pt" in text and "is not a tensor file written by torch.save" in text
    assert "IndexError" not in text and "pop from empty list" not in text and "\n" not in text


@pytest.mark.parametrize("suffix", datafile.SUFFIXES)
def test_empty_files_are_refused(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.* is empty \(0 bytes\)"):
        load_data(path, tokenizer=_Tokenizer())


def _npz_with_lying_header(path, shape) -> None:
    """An .npz whose one array header declares ``shape`` float32 but stores 1 KB."""
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False, "shape": shape})
    member.write(b"\0" * 1024)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", member.getvalue())


def test_npz_bombs_are_refused_before_allocating(tmp_path):
    bomb = tmp_path / "bomb.npz"
    _npz_with_lying_header(bomb, (3_000_000_000,))  # 12 GB declared in a ~1 KB file
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"float32 array of shape \[3000000000\] \(12,000,000,000 bytes"):
            load_data(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert bomb.stat().st_size < 4096 and peak < 16 << 20
    # Under the bound but not what the member holds: still refused before numpy allocates it.
    _npz_with_lying_header(bomb, (1_000_000,))
    with pytest.raises(DataError, match=r"declares 4,000,000 bytes .* but holds 1,024"):
        load_data(bomb)
    # An honest archive of zeros compresses ~1000x: its declared size is what the bound checks.
    zeros = tmp_path / "zeros.npz"
    np.savez_compressed(zeros, x=np.zeros(4_000_000, np.float32))
    assert zeros.stat().st_size < 100_000
    with pytest.raises(DataError, match="expand to 16,000,128 bytes, more than the 8,000,000-byte bound"):
        load_data(zeros, max_bytes=8_000_000)
    assert load_data(zeros, batch_size=1 << 20).samples == 4_000_000


def test_sizes_are_checked_before_reading(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.ones((64, 4), np.float32))
    with pytest.raises(DataError, match=r"x.npy is \d[\d,]* bytes, more than the 100-byte bound"):
        load_data(path, max_bytes=100)
    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(DataError, match="declares 1,024 bytes of array data .* holds 1,008; .* truncated"):
        load_data(path)
    np.savez(tmp_path / "objects.npz", x=np.array([1, None], dtype=object))
    with pytest.raises(DataError, match="holds Python objects"):
        load_data(tmp_path / "objects.npz")
    (tmp_path / "junk.npz").write_bytes(b"PK but not really a zip")
    with pytest.raises(DataError, match="not an .npz"):
        load_data(tmp_path / "junk.npz")
    with zipfile.ZipFile(tmp_path / "t.pt", "w", zipfile.ZIP_DEFLATED) as archive:  # .pt files are zips
        archive.writestr("t/data/0", b"\0" * 1_000_000)
    assert (tmp_path / "t.pt").stat().st_size < 10_000
    with pytest.raises(DataError, match="its 1 zip members expand to 1,000,000 bytes"):
        load_data(tmp_path / "t.pt", max_bytes=100_000)
    torch.save(torch.zeros(8, 4), tmp_path / "t.pt")
    assert load_data(tmp_path / "t.pt").samples == 8


# --- calibration data -----------------------------------------------------------------------------------


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize("recipe", ["int8-static", "int4-gptq"])
@pytest.mark.parametrize("fill", [0.0, 3.5])
def test_constant_calibration_data_is_refused(recipe, fill):
    batches = [torch.full((16, 8), fill) for _ in range(4)]
    with pytest.raises(DataError, match=f"carries no range information.*input = {fill:g}"):
        lowbit.quantize(_mlp(), recipe, calibration=batches, progress=False)


def test_calibrate_refuses_constant_data_directly():
    prepared = lowbit.prepare(_mlp(), "int8-static")
    with pytest.raises(DataError, match="no range information"):
        lowbit.calibrate(prepared, [torch.zeros(4, 8), (torch.zeros(4, 8),)], progress=False)
    lowbit.calibrate(prepared, [torch.zeros(4, 8), torch.ones(4, 8)], progress=False)  # varies: fine


class _TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids) * attention_mask.unsqueeze(-1))


def test_token_ids_must_vary_a_constant_mask_is_fine():
    mask = torch.ones(4, 6, dtype=torch.long)
    constant = [{"input_ids": torch.full((4, 6), 7), "attention_mask": mask} for _ in range(3)]
    with pytest.raises(DataError, match="input_ids = 7, attention_mask = 1"):
        lowbit.quantize(_TokenModel(), "int8-static", calibration=constant, progress=False)
    varying = [{"input_ids": torch.randint(0, 50, (4, 6)), "attention_mask": mask} for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "few examples": not what this test is about
        q = lowbit.quantize(_TokenModel(), "int8-static", calibration=varying, progress=False)
    assert q.head.input_quant.state == "frozen"


# --- models ---------------------------------------------------------------------------------------------


def test_nan_or_inf_in_a_bias_or_weight_is_refused_naming_each_layer():
    model = _mlp()
    with torch.no_grad():
        model[2].bias[1] = float("nan")
        model[0].weight[:3, 0] = float("inf")
    for recipe in ("int8-weight-only", "fp16", "int8-dynamic"):
        with pytest.raises(ModelError) as info:
            lowbit.quantize(model, recipe, progress=False)
        text = str(info.value)
        assert "layer 0 weight (0 NaN, 3 Inf)" in text and "layer 2 bias (1 NaN, 0 Inf)" in text, text
    with pytest.raises(ModelError, match="layer 2 bias"):
        lowbit.prepare(model, "int8-weight-only")


def test_nan_in_a_float_layer_matters_when_calibration_runs_the_model():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4))
    with torch.no_grad():
        model[1].weight[0] = float("nan")
    lowbit.quantize(model, "int8-weight-only", progress=False)  # the LayerNorm is not read: fine
    with pytest.raises(ModelError, match=r"layer 1 weight \(1 NaN, 0 Inf\)"):
        lowbit.quantize(model, "int8-static", calibration=[torch.randn(32, 8)], progress=False)


def test_meta_device_models_get_a_clear_error():
    with torch.device("meta"):
        model = _mlp()
    for call in (
        lambda: lowbit.quantize(model, "int8-weight-only", progress=False),
        lambda: lowbit.prepare(model, "int8-dynamic"),
    ):
        with pytest.raises(ModelError, match="has parameters on the meta device .*load real weights first"):
            call()
    partly = _mlp()
    partly[2].to("meta")
    with pytest.raises(ModelError, match=r"meta device \(2 tensors, e.g. layer 2 weight\)"):
        lowbit.quantize(partly, "int8-weight-only", progress=False)


def _big_weights() -> nn.Module:
    model = _mlp()
    with torch.no_grad():
        model[0].weight[0, :5] = 1e6  # fp16 tops out at 65504
        model[2].weight[1, 0] = -7e4
        model[2].bias[0] = 1e6  # biases stay float32: not counted
    return model


def test_fp16_overflow_is_refused_per_layer_with_counts():
    with pytest.raises(ModelError) as info:
        lowbit.quantize(_big_weights(), "fp16", progress=False)
    text = str(info.value)
    assert "2 weight(s) overflow their float storage" in text and "allow_saturation" in text
    assert "layer 0 weight: 5 of 128 values exceed the fp16 range (|x| > 65504)" in text
    assert "layer 2 weight: 1 of 64 values" in text and "bias" not in text.split("; choose")[0]
    lowbit.quantize(_big_weights(), "int8-weight-only", progress=False)  # scaled formats: no overflow


def test_allowed_saturation_warns_with_the_counts_and_clips():
    recipe = Recipe.from_dict({**resolve("fp16").to_dict(), "allow_saturation": True})
    with pytest.warns(UserWarning, match="layer 0 weight: 5 of 128 values exceed the fp16 range") as caught:
        q = lowbit.quantize(_big_weights(), recipe, progress=False)
    assert sum("exceed the fp16 range" in str(w.message) for w in caught) == 2  # one per layer, once
    assert q[0].qweight.dequantize()[0, :5].tolist() == [65504.0] * 5


def test_bf16_overflow_is_counted_too():
    model = _mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = 3.4e38  # finite in float32, past bfloat16's 3.39e38
    with pytest.raises(ModelError, match="layer 2 weight: 1 of 64 values exceed the bf16 range"):
        lowbit.quantize(model, "bf16", progress=False)


# --- the command line --------------------------------------------------------------------------------


def nan_model() -> nn.Module:
    """A factory for ``lowbit quantize test_bad_inputs:nan_model``."""
    model = _mlp()
    with torch.no_grad():
        model[2].bias[0] = float("nan")
    return model


def overflow_model() -> nn.Module:
    return _big_weights()


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return code, lines[0]


@pytest.mark.usefixtures("digits_cnn_cached")
def test_cli_reports_each_bad_input_in_one_line_with_exit_code_2(capsys, tmp_path):
    (tmp_path / "no.yaml").write_text("weight:\n  symmetric: 'no'\n")
    out = str(tmp_path / "o")
    code, line = _cli(capsys, "quantize", "digits-cnn", "--recipe", str(tmp_path / "no.yaml"), "-o", out)
    assert code == 2 and "recipe.weight.symmetric: expected true or false" in line
    np.save(tmp_path / "zeros.npy", np.zeros((64, 1, 8, 8), np.float32))
    argv = ["quantize", "digits-cnn", "--recipe", "int8-static", "--calib", str(tmp_path / "zeros.npy")]
    code, line = _cli(capsys, *argv, "-o", str(tmp_path / "o"))
    assert code == 2 and "no range information" in line
    (tmp_path / "s.txt").write_bytes(b"ok\n\xff\n")
    code, line = _cli(capsys, *argv[:-1], str(tmp_path / "s.txt"), "-o", str(tmp_path / "o"))
    assert code == 2 and "--calib" in line and "s.txt" in line
    for factory, message in [("nan_model", "layer 2 bias (1 NaN, 0 Inf)"), ("overflow_model", "fp16 range")]:
        code, line = _cli(
            capsys, "quantize", f"test_bad_inputs:{factory}", "--recipe", "fp16", "-o", str(tmp_path / "o")
        )
        assert code == 2 and message in line and line.startswith("lowbit quantize: error: "), line
    assert not (tmp_path / "o").exists()


def test_cli_maps_the_error_types_from_any_verb(capsys, monkeypatch, tmp_path):
    import lowbit.cli.artifacts

    def fail(_spec: str) -> None:
        raise ModelError("layer fc has parameters on the meta device")

    monkeypatch.setattr(lowbit.cli.artifacts, "_model", fail)  # raised outside the usual wrappers
    code, line = _cli(capsys, "quantize", "m", "--recipe", "int8-dynamic", "-o", str(tmp_path / "o"))
    assert code == 2 and line == "lowbit quantize: error: layer fc has parameters on the meta device"


# --- unsigned weight formats ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["uint4", "uint8", "uint1"])
def test_unsigned_symmetric_weights_are_refused_with_the_fix(fmt):
    from lowbit.recipes import WeightSpec

    with pytest.raises(lowbit.RecipeError, match=rf"{fmt} with symmetric: true .*symmetric: false"):
        WeightSpec(format=fmt, symmetric=True)
    with pytest.raises(lowbit.RecipeError, match="symmetric: false"):
        lowbit.recipes.resolve({"weight": {"format": fmt, "symmetric": True}})


def test_unsigned_weights_default_to_a_fitted_zero_point():
    """Before, ``{"format": "uint4"}`` meant symmetric uint4 and zeroed every negative weight."""
    from lowbit.recipes import WeightSpec

    assert WeightSpec(format="uint4").symmetric is False and WeightSpec(format="int4").symmetric is True
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 8))
    q = lowbit.quantize(model, {"weight": {"format": "uint4", "granularity": "group:32"}})
    x = torch.randn(4, 32)
    cos = nn.functional.cosine_similarity(q(x).flatten(), model(x).flatten(), dim=0)
    assert cos > 0.98
