"""GGUF export / import: lowbit's grids written bit-exactly as llama.cpp's blocks (checked with the
``gguf`` package's own dequantizer), K-quants, round trips, and refusals of bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from lowbit import formats  # noqa: E402
from lowbit.backends import use_kernels  # noqa: E402
from lowbit.errors import ArtifactError, DataError, ModelError  # noqa: E402
from lowbit.interop import gguf_blocks as blocks  # noqa: E402
from lowbit.interop.gguf_export import export_gguf, quantize_for_gguf  # noqa: E402
from lowbit.interop.gguf_import import is_gguf_file, load_gguf  # noqa: E402
from lowbit.nn.qweight import QuantizedWeight  # noqa: E402
from lowbit.primitives import quantize  # noqa: E402


def tiny_lm(arch: str, width: int = 64, seed: int = 0) -> torch.nn.Module:
    """A held-out shape: not the zoo's, with a vocabulary past 256 ids and untied head. Biases and
    norms are randomised (a fresh model's are zeros and ones, which would hide a lost tensor)."""
    torch.manual_seed(seed)
    model = _fresh_lm(arch, width)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _fresh_lm(arch: str, width: int) -> torch.nn.Module:
    common = {"vocab_size": 300, "tie_word_embeddings": False, "use_cache": False}
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=width, n_positions=48, **common)
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.LlamaConfig(
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention: k's rows permute per kv head
        hidden_size=width,
        intermediate_size=2 * width + 64,
        max_position_embeddings=48,
        **common,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def token_batches(n: int = 4, vocab: int = 300) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (2, 40), generator=gen) for _ in range(n)]


def quantized_layers(model: torch.nn.Module) -> dict[str, QuantizedWeight]:
    return {n: m.qweight for n, m in model.named_modules() if hasattr(m, "qweight")}


# --- formats with 16-bit scales ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["int4@fp16", "int8@bf16", "uint4@fp16", "nf4@fp16"])
def test_scales_are_rounded_to_the_16_bit_type(name: str) -> None:
    fmt = formats.get(name)
    w = torch.randn(16, 64) * torch.logspace(-6, 2, 16).unsqueeze(1)  # tiny to large rows
    qw = QuantizedWeight.from_float(w, fmt, "group:32", symmetric=fmt.signed or fmt.family == "grid")
    assert torch.equal(qw.scale.to(fmt.scale_dtype).float(), qw.scale)
    assert bool((qw.scale > 0).all())
    # The codes are those of the rounded scale (not of the float32 one, rounded afterwards).
    assert torch.equal(quantize(w, fmt, qw.qparams()), qw.codes())
    plain = formats.get(name.split("@")[0])
    if fmt.family == "int":
        float32 = QuantizedWeight.from_float(w, plain, "group:32", symmetric=qw.symmetric)
        assert not torch.equal(float32.scale, qw.scale)


def test_scale_dtype_names_are_checked() -> None:
    assert formats.get("INT4@FP16").name == "int4@fp16"
    for bad in ("fp16@fp16", "int4@fp8", "int4@fp16@fp16", "kmeans_4@fp16"):
        with pytest.raises(ValueError):
            formats.get(bad)


# --- blocks -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0", "Q4_0"])
@pytest.mark.parametrize("granularity", ["group:32", "group:128", "channel"])
def test_lowbit_grid_reads_back_bit_identical_through_gguf(qtype: str, granularity: str) -> None:
    fmt = f"int{qtype[1]}@fp16"
    w = torch.randn(12, 256) * 0.05
    qw = QuantizedWeight.from_float(w, fmt, granularity, symmetric=True)
    packed = blocks.exact_blocks(qw, qtype)
    assert packed.shape[1] == 256 // 32 * gguf.GGML_QUANT_SIZES[blocks.qtype_enum(qtype)][1]
    assert np.array_equal(blocks.dequantize(packed, qtype), qw.dequantize().numpy())


@pytest.mark.parametrize(("qtype", "fmt"), [("Q4_0", "gguf_q4_0"), ("Q5_0", "gguf_q5_0")])
def test_gguf_grids_round_as_llama_cpp_does(qtype: str, fmt: str) -> None:
    w = torch.randn(64, 256) * 0.1
    qw = QuantizedWeight.from_float(w, fmt, "group:32", symmetric=True)
    mine = blocks.exact_blocks(qw, qtype)
    theirs = gguf.quants.quantize(w.numpy(), blocks.qtype_enum(qtype))
    # Codes differ only where llama.cpp rounds against its float32 scale and lowbit against the
    # fp16 scale both store (a few ties and near-ties).
    assert (mine != theirs).mean() < 0.005
    plain = QuantizedWeight.from_float(w, f"int{qtype[1]}@fp16", "group:32", symmetric=True)

    def err(q: QuantizedWeight) -> float:
        return float(((q.dequantize() - w) ** 2).mean())

    assert err(qw) < 0.9 * err(plain)  # every level used: steps of amax/8, not amax/7


@pytest.mark.parametrize(
    ("fmt", "granularity", "symmetric", "why"),
    [
        ("int4", "group:32", True, "float32"),
        ("int4@fp16", "group:32", False, "asymmetric"),
        ("int4@fp16", "group:16", True, "groups of 16"),
        ("nf4@fp16", "group:32", True, "not Q4_0's grid"),
    ],
)
def test_grids_that_are_not_the_gguf_type_are_named(
    fmt: str, granularity: str, symmetric: bool, why: str
) -> None:
    qw = QuantizedWeight.from_float(torch.randn(4, 64), fmt, granularity, symmetric=symmetric)
    assert why in (blocks.exact_reason(qw, "Q4_0") or "")
    with pytest.raises(ArtifactError, match="Q4_0"):
        blocks.exact_blocks(qw, "Q4_0")


@pytest.mark.parametrize(("qtype", "bound"), [("Q4_K", 0.012), ("Q6_K", 0.0008)])
def test_k_quants_decode_with_gguf_and_follow_the_importance(qtype: str, bound: float) -> None:
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((8, 512)) * rng.uniform(0.01, 3.0, (8, 1))).astype(np.float32)
    back = blocks.dequantize(blocks.quantize(rows, qtype), qtype)
    assert ((back - rows) ** 2).mean() / (rows**2).mean() < bound
    importance = rng.random(512).astype(np.float32) ** 6  # a few columns matter most
    weighted = blocks.dequantize(blocks.quantize(rows, qtype, importance), qtype)

    def err(values: np.ndarray) -> float:
        return float((importance * (values - rows) ** 2).sum())

    assert err(weighted) < err(back)


def test_k_quants_refuse_rows_that_do_not_fill_a_super_block() -> None:
    with pytest.raises(ValueError, match="multiple of 256"):
        blocks.quantize_k(np.zeros((2, 128), np.float32), "Q4_K")


# --- export and import -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize(("qtype", "algorithm"), [("Q4_0", "rtn"), ("Q8_0", "gptq"), ("Q5_0", "gptq")])
def test_lowbit_to_gguf_to_lowbit_keeps_every_code(tmp_path, arch: str, qtype: str, algorithm: str) -> None:
    model = tiny_lm(arch)
    cal = token_batches()
    path = tmp_path / f"{arch}.gguf"
    report = export_gguf(model, path, qtype, calibration=cal, algorithm=algorithm, progress=False)
    assert is_gguf_file(path) and (tmp_path / f"{arch}.gguf.parity.json").is_file()
    exact = [t for t in report.tensors if t.source == "lowbit codes"]
    linears = 2 * (4 if arch == "gpt2" else 7)
    assert len(exact) >= linears + 1  # every block linear and the token embedding
    assert all(t.max_abs_diff == 0.0 for t in exact)
    assert report.logits_cosine > 0.99999 and report.top1_agreement == 1.0

    back = load_gguf(path, kernels="reference")
    qmodel = quantize_for_gguf(model, qtype, cal, algorithm, progress=False)  # what the file was made from
    use_kernels(qmodel, "reference")  # exact numerics on both sides
    mine, theirs = quantized_layers(qmodel), quantized_layers(back)
    for name, qw in mine.items():
        assert torch.equal(theirs[name].codes(), qw.codes()), name
        assert torch.equal(theirs[name].scale, qw.scale), name
    with torch.no_grad():
        for batch in cal:
            torch.testing.assert_close(back(batch).logits, qmodel(batch).logits, rtol=0, atol=1e-5)


def test_q6_k_imports_as_int6_with_the_files_values(tmp_path) -> None:
    model = tiny_lm("llama", width=256)
    path = tmp_path / "k.gguf"
    report = export_gguf(model, path, "Q6_K", progress=False)
    assert report.reference == "float model" and report.logits_cosine > 0.995
    back = load_gguf(path, kernels="reference")
    reader = gguf.GGUFReader(str(path))
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight")
    assert tensor.tensor_type == gguf.GGMLQuantizationType.Q6_K
    qw = back.model.layers[0].self_attn.v_proj.qweight
    assert qw.fmt.name == "int6"
    expected = blocks.dequantize(np.asarray(tensor.data), "Q6_K").reshape(qw.shape)
    assert np.array_equal(qw.dequantize().numpy(), expected)


def test_q4_k_and_imatrix_export(tmp_path) -> None:
    model = tiny_lm("gpt2", width=256)
    cal = token_batches()
    plain = export_gguf(model, tmp_path / "a.gguf", "Q4_K", progress=False)
    weighted = export_gguf(model, tmp_path / "b.gguf", "Q4_K", calibration=cal, imatrix=True, progress=False)
    kinds = {t.qtype for t in weighted.tensors}
    assert "Q4_K" in kinds and "Q6_K" in kinds  # the head follows llama.cpp's mix
    assert plain.logits_cosine > 0.98 and weighted.logits_cosine > 0.98
    assert any("no lowbit grid yet" in n for n in weighted.notes)  # Q4_K imports as float values


def test_a_lowbit_model_on_another_grid_needs_consent(tmp_path) -> None:
    import lowbit

    model = tiny_lm("gpt2")
    qmodel = lowbit.quantize(model, "int4-weight-only", progress=False, kernels="reference")
    path = tmp_path / "q.gguf"
    with pytest.raises(ArtifactError, match="requantize=True"):
        export_gguf(qmodel, path, "Q4_0", progress=False)
    assert not path.exists() and not list(tmp_path.iterdir())
    report = export_gguf(qmodel, path, "Q4_0", requantize=True, progress=False)
    redone = [t for t in report.tensors if t.source == "re-quantized"]
    assert redone and all(t.max_abs_diff > 0 for t in redone)
    assert any("re-quantized from" in n for n in report.notes)


def test_bad_input_is_refused_clearly(tmp_path) -> None:
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    bert = transformers.BertModel(config)
    with pytest.raises(ModelError, match="supported: gpt2"):
        export_gguf(bert, tmp_path / "x.gguf", progress=False)
    with pytest.raises(ValueError, match="Q3_K"):
        export_gguf(tiny_lm("gpt2"), tmp_path / "x.gguf", "Q3_K", progress=False)
    with pytest.raises(DataError, match="gptq needs calibration"):
        export_gguf(tiny_lm("gpt2"), tmp_path / "x.gguf", "Q4_0", algorithm="gptq", progress=False)
    assert not list(tmp_path.iterdir())

    good = tmp_path / "good.gguf"
    export_gguf(tiny_lm("gpt2"), good, "Q8_0", progress=False)
    data = good.read_bytes()
    for name, damaged in {
        "truncated": data[: len(data) // 2],
        "header": data[:4] + b"\xff" * 64 + data[68:],
        "not gguf": b"PK\x03\x04" + data[4:],
    }.items():
        bad = tmp_path / f"{name.replace(' ', '-')}.gguf"
        bad.write_bytes(damaged)
        with pytest.raises(ArtifactError, match=str(bad)):
            load_gguf(bad)


# --- llama.cpp itself (optional: pip install llama-cpp-python) ---------------------------------------------


@pytest.mark.llama_cpp
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_llama_cpp_runs_the_file_as_lowbit_does(tmp_path, arch: str) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    model = tiny_lm(arch)
    path = tmp_path / "m.gguf"
    export_gguf(model, path, "Q4_0", progress=False)
    lowbit_model = load_gguf(path, kernels="reference")
    tokens = token_batches(1)[0][0].tolist()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=48, logits_all=True, verbose=False, n_threads=2)
    llm.eval(tokens)
    theirs = torch.tensor(np.array(llm.scores[: len(tokens)]))
    with torch.no_grad():
        mine = lowbit_model(torch.tensor([tokens])).logits[0]
    # llama.cpp rounds activations to 8 bits for its Q4_0 dot products: close, not equal.
    assert float(torch.nn.functional.cosine_similarity(mine.flatten(), theirs.flatten(), dim=0)) > 0.999


def test_cli_exports_a_hugging_face_directory(tmp_path, capsys) -> None:
    from lowbit.cli import main

    model_dir = tmp_path / "hf"
    tiny_lm("llama").save_pretrained(model_dir)
    out = tmp_path / "m.gguf"
    assert main(["export", str(model_dir), "--qtype", "Q8_0", "-o", str(out)]) == 0
    assert "Q8_0" in capsys.readouterr().out
    back = load_gguf(out, kernels="reference")
    assert back.model.layers[0].mlp.up_proj.qweight.fmt.name == "int8@fp16"
    assert main(["export", str(model_dir), "--qtype", "Q8_0", "-o", str(out)]) == 2  # exists: --force


# --- vocabularies ----------------------------------------------------------------------------------------

SAMPLE = (
    "It was the best of times, it was the worst of times; it's the age of wisdom, isn't it?\n"
    "Thou art fair, and Edward's children play — café, naïve, 日本, 123 456.\n"
) * 40
HELD_OUT = ["Hastings' and Rivers's children", "a naïve café\nover  two spaces", "x = 42; y's 日本語"]


def trained_tokenizer(kind: str):  # type: ignore[no-untyped-def]
    """A fast tokenizer trained here: GPT-2 byte-level BPE, or Llama-2-style SentencePiece BPE."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    lines = [SAMPLE[i : i + 200] for i in range(0, len(SAMPLE), 200)]
    if kind == "gpt2":
        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        trainer = trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet
        )
        tok.train_from_iterator(lines, trainer)
        return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    tok = tokenizers.Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=500, special_tokens=specials))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def model_for(tokenizer, arch: str) -> torch.nn.Module:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(
            n_layer=1, n_head=2, n_embd=64, n_positions=64, vocab_size=len(tokenizer)
        )
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.LlamaConfig(
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, hidden_size=64,
        intermediate_size=128, max_position_embeddings=64, vocab_size=len(tokenizer),
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize(("kind", "model_name", "pre"), [("gpt2", "gpt2", "gpt-2"), ("spm", "llama", None)])
def test_tokenizers_are_written_as_llama_cpp_reads_them(tmp_path, kind: str, model_name: str, pre) -> None:
    from lowbit.interop.gguf_import import open_reader, read_fields

    tokenizer = trained_tokenizer(kind)
    path = tmp_path / "t.gguf"
    model = model_for(tokenizer, "gpt2" if kind == "gpt2" else "llama")
    export_gguf(model, path, "Q8_0", tokenizer=tokenizer, progress=False)
    fields = read_fields(open_reader(path))
    assert fields["tokenizer.ggml.model"] == model_name
    assert fields.get("tokenizer.ggml.pre") == (pre or "default")
    vocab = tokenizer.get_vocab()
    assert [vocab[t] for t in fields["tokenizer.ggml.tokens"][: len(vocab)]] == list(range(len(vocab)))
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for line in HELD_OUT:
        assert llm.tokenize(line.encode(), add_bos=False, special=False) == tokenizer(line).input_ids, line


def test_a_pre_tokenizer_llama_cpp_would_split_differently_is_refused(tmp_path) -> None:
    from tokenizers import Regex, pre_tokenizers

    tokenizer = trained_tokenizer("gpt2")
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\d{1,3}"), "isolated"), pre_tokenizers.ByteLevel(use_regex=False)]
    )
    with pytest.raises(ModelError, match="tokenize differently"):
        export_gguf(
            model_for(tokenizer, "gpt2"), tmp_path / "x.gguf", "Q8_0", tokenizer=tokenizer, progress=False
        )
    assert not list(tmp_path.iterdir())


def test_cli_inspects_a_gguf_file(tmp_path, capsys) -> None:
    from lowbit.cli import main

    path = tmp_path / "m.gguf"
    export_gguf(tiny_lm("gpt2", width=256), path, "Q4_K", progress=False)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Q4_K" in out and "blk.0.attn_qkv.weight" in out and "as float values" in out
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(path.read_bytes()[:1000])
    assert main(["inspect", str(bad)]) == 1
    assert str(bad) in capsys.readouterr().err


def test_a_tied_head_is_written_once_and_tied_again(tmp_path) -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=64, n_positions=32, vocab_size=256)
    model = transformers.GPT2LMHeadModel(config).eval()  # ties lm_head to the token embedding
    assert model.lm_head.weight is model.transformer.wte.weight
    path = tmp_path / "tied.gguf"
    report = export_gguf(model, path, "Q8_0", progress=False)
    assert "output.weight" not in {t.name for t in report.tensors}
    back = load_gguf(path, kernels="reference")
    assert back.lm_head.qweight is back.transformer.wte.qweight
    assert report.logits_cosine > 0.99999
