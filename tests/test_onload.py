"""Onloading (``lowbit.quantize_checkpoint``, ``lowbit quantize DIR --max-memory``): artifacts
byte-identical to the in-memory path, peak memory below the float model's size, preflight
refusals and bad checkpoints named."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.errors import BudgetError, CheckpointError
from lowbit.ptq.checkpoint import Checkpoint
from lowbit.recipes import AutoRoundOptions, Recipe, WeightSpec

transformers = pytest.importorskip("transformers")

CHILD = Path(__file__).with_name("onload_child.py")
SRC = Path(__file__).parents[1] / "src"
ARTIFACT = ("model.safetensors", "lowbit.json", "lowbit.sha256")
# Peak RSS of an onloaded run may exceed the float model's size by at most this much (the
# process's own allocator slack, first-use buffers of torch's kernels).
SLACK = 16 << 20


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: the bytes do not depend on it (tests/test_determinism.py), and on a shared
    2-core machine two threads per process made these runs 5-10x slower."""
    from lowbit.threads import single_thread

    with single_thread():
        yield


def _llama(directory: Path, hidden: int, layers: int, ffn: int, vocab: int, shard: str, tie: bool) -> int:
    """A random Llama saved as safetensors shards of ``shard``; returns its float bytes."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
    )
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(directory, max_shard_size=shard)
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """32 blocks of width 256 (84 MiB float) in 12 shards: per-stage needs well below the model."""
    directory = tmp_path_factory.mktemp("onload") / "llama32"
    return directory, _llama(directory, 256, 32, 512, 2048, "8MB", tie=False)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 blocks, tied embeddings and head, in 6 shards."""
    directory = tmp_path_factory.mktemp("onload") / "llama3"
    _llama(directory, 64, 3, 128, 512, "60KB", tie=True)
    assert len(list(directory.glob("*.safetensors"))) >= 4
    return directory


def _batches(vocab: int, count: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (2, 32), generator=g) for _ in range(count)]


def _child_batches(vocab: int) -> list[torch.Tensor]:
    """The calibration ``onload_child.py`` builds (8 batches of 2 x 64 tokens)."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (2, 64), generator=g) for _ in range(8)]


def _same_files(a: Path, b: Path) -> None:
    for name in ARTIFACT:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs"


def _child(*args: str) -> dict:
    figures = Path(args[3]).with_suffix(".json")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(
        [sys.executable, str(CHILD), *args[:4], str(figures), *args[4:], "--threads", "1"],
        check=True,
        env=env,
        capture_output=True,
    )
    return json.loads(figures.read_text())


@pytest.mark.slow  # ~25 s: GPTQ on 32 blocks, in a child process whose peak RSS is its own
def test_onloaded_int4_gptq_matches_the_in_memory_artifact_below_the_float_models_size(big, tmp_path):
    directory, float_bytes = big
    budget = float_bytes * 3 // 4  # smaller than the float model
    out = tmp_path / "onload"
    onloaded = _child("onload", str(directory), "int4-gptq", str(out), "--max-memory", str(budget))
    assert onloaded["predicted_peak_bytes"] <= budget
    assert onloaded["hwm_reset"], "the peak could not be measured for this run alone (/proc/self/clear_refs)"
    peak = onloaded["peak_above_baseline_bytes"]
    # Measured 54 MiB (predicted 54) for this 84 MiB model; the in-memory path (from_pretrained,
    # quantize with inplace=True, save) peaked at 177 MiB in the same kind of child.
    assert peak < float_bytes + SLACK, (peak, float_bytes)

    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    batches = _child_batches(2048)
    q = lowbit.quantize(model, "int4-gptq", batches, inplace=True, progress=False, kernels="reference")
    lowbit.save(q, tmp_path / "reference")
    _same_files(out, tmp_path / "reference")


AUTOROUND = Recipe(
    name="uint3-autoround",
    weight=WeightSpec(format="uint3", granularity="group:32", symmetric=False, algorithm="autoround"),
    modules=("linear",),
    autoround=AutoRoundOptions(steps=8),
)


@pytest.mark.parametrize("recipe", ["int4-gptq", "int8-weight-only", "int4-weight-only", AUTOROUND])
def test_tied_checkpoint_onloaded_matches_the_in_memory_artifact(small, tmp_path, recipe):
    batches = _batches(512)
    out = tmp_path / "onload"
    done = lowbit.quantize_checkpoint(small, recipe, batches, out, progress=False, report=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(small).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # kernels="reference": the kernel choice changes no stored byte, and measuring it takes seconds.
    q = lowbit.quantize(model, recipe, batches, inplace=True, progress=False, kernels="reference")
    lowbit.save(q, tmp_path / "reference")
    _same_files(tmp_path / "onload", tmp_path / "reference")
    x = batches[0]
    assert torch.equal(done.model(x).logits, q(x).logits)  # the returned model is the quantized one


def test_every_weight_is_freed_or_quantized_as_its_stage_ends(small, monkeypatch):
    """No stage starts while another stage's float weights are still loaded."""
    from lowbit.ptq import onload, pipeline

    seen: list[tuple[str, list[str]]] = []
    original = pipeline._Pipeline._load_stage

    def spy(self, name):
        original(self, name)
        loaded = sorted(
            n
            for n, p in self.model.named_parameters()
            if not p.is_meta and p.stride() != (0,) * p.dim() and "layers." in n and "norm" not in n
        )
        seen.append((name, loaded))

    monkeypatch.setattr(pipeline._Pipeline, "_load_stage", spy)
    onload.quantize_checkpoint(small, "int4-gptq", _batches(512), None, progress=False, report=False)
    assert [name for name, _ in seen] == [f"model.layers.{i}" for i in range(3)]
    for name, loaded in seen:
        assert loaded and all(n.startswith(f"{name}.") for n in loaded), (name, loaded)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _shard(directory: Path) -> Path:
    return sorted(directory.glob("model-*.safetensors"))[1]


def test_missing_shard_is_named_before_any_work(small, tmp_path):
    directory = _copy(small, tmp_path / "ckpt")
    shard = _shard(directory)
    shard.unlink()
    with pytest.raises(CheckpointError, match=re.escape(shard.name)) as err:
        lowbit.quantize_checkpoint(directory, "int4-gptq", _batches(512), tmp_path / "out", report=False)
    assert "missing" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_truncated_shard_is_named_before_any_work(small, tmp_path):
    directory = _copy(small, tmp_path / "ckpt")
    shard = _shard(directory)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=re.escape(shard.name)) as err:
        lowbit.quantize_checkpoint(directory, "int4-gptq", _batches(512), tmp_path / "out", report=False)
    assert "truncated" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_budget_below_one_stage_is_refused_before_any_weight_is_read(small, tmp_path, monkeypatch):
    reads = []
    original = Checkpoint.tensor
    monkeypatch.setattr(Checkpoint, "tensor", lambda self, name: reads.append(name) or original(self, name))
    with pytest.raises(BudgetError) as err:
        lowbit.quantize_checkpoint(small, "int4-gptq", _batches(512), tmp_path / "out", max_memory="1MB")
    needed = int(re.search(r"at least ([\d,]+) bytes", str(err.value)).group(1).replace(",", ""))
    assert needed > 10**6 and "max_memory 976.6 KiB" in str(err.value)
    assert reads == [] and not (tmp_path / "out").exists()
    # That figure is the preflight's: a budget of exactly it is accepted.
    done = lowbit.quantize_checkpoint(
        small, "int4-gptq", _batches(512), None, max_memory=needed, progress=False, report=False
    )
    assert done.preflight.peak_bytes == needed


def test_preflight_is_printed_before_the_work(small, capsys):
    lowbit.quantize_checkpoint(small, "int4-gptq", _batches(512), None, progress=False)
    err = capsys.readouterr().err
    assert err.startswith("lowbit preflight: predicted peak")
    parts = ("3 stages (blocks)", "256 tokens in 4 batches", "X^T X", "output buffer", "cached activations")
    for part in parts:
        assert part in err, part


def test_cli_quantize_dir_with_max_memory_onloads(small, tmp_path, capsys):
    calib = tmp_path / "calib.safetensors"
    from safetensors.torch import save_file

    save_file({"input_ids": torch.cat(_batches(512))}, str(calib))
    code = main(
        [
            "quantize",
            str(small),
            "--recipe",
            "int4-gptq",
            "--max-memory",
            "64MB",
            "--calib",
            str(calib),
            "--batch-size",
            "2",
            "-o",
            str(tmp_path / "cli"),
        ]  # fmt: skip
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "lowbit preflight" in captured.err and "saved" in captured.out
    batches = list(torch.cat(_batches(512)).split(2))
    lowbit.quantize_checkpoint(small, "int4-gptq", batches, tmp_path / "api", progress=False, report=False)
    _same_files(tmp_path / "cli", tmp_path / "api")

    refused = ["quantize", str(small), "--recipe", "int4-gptq", "--max-memory", "1MB", "--calib", str(calib)]
    code = main([*refused, "-o", str(tmp_path / "refused")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("lowbit quantize: error: max_memory") and "at least" in last
    assert not (tmp_path / "refused").exists()


class _Expert(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class _MoE(torch.nn.Module):
    """Top-1 routing over 4 experts; the router never picks expert 3."""

    def __init__(self) -> None:
        super().__init__()
        self.router = torch.nn.Linear(16, 4)
        self.experts = torch.nn.ModuleList(_Expert() for _ in range(4))
        with torch.no_grad():
            self.router.bias[3] = -1e4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        choice = self.router(x).argmax(-1)
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            mask = choice == i
            if bool(mask.any()):
                out[mask] = expert(x[mask])
        return x + out


class _Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(_MoE() for _ in range(2))
        self.head = torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_experts_that_see_no_token_fall_back_to_rtn_and_are_named(tmp_path):
    torch.manual_seed(0)
    model = _Toy().eval()
    batches = [torch.randn(64, 16) for _ in range(4)]
    with pytest.warns(UserWarning, match=r"expert layer\(s\) saw no calibration token") as caught:
        q = lowbit.quantize(model, "int4-gptq", batches, progress=False, kernels="reference")
    message = next(str(w.message) for w in caught if "expert" in str(w.message))
    assert "blocks.0.experts.3.fc1" in message and "blocks.1.experts.3.fc2" in message
    assert q.blocks[0].experts[3].fc1.qweight.algorithm == "rtn"
    assert q.blocks[0].experts[0].fc1.qweight.algorithm == "gptq"

    # The preflight names them before any work (the model on the meta device, from a checkpoint).
    from safetensors.torch import save_file

    from lowbit.ptq.onload import Onloader, empty_parameters
    from lowbit.ptq.plan import plan_model
    from lowbit.ptq.preflight import predict
    from lowbit.recipes import resolve

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    with empty_parameters():
        skeleton = _Toy().eval()
    recipe = resolve("int4-gptq")
    source = Onloader(skeleton, Checkpoint(tmp_path), torch.device("cpu"))
    preflight = predict(skeleton, source, plan_model(skeleton, recipe), recipe, batches, None, None)
    assert (
        preflight.experts[0].startswith("blocks.0.experts: 4 experts")
        and "64 per expert" in preflight.experts[0]
    )
    assert "blocks.0.experts: 4 experts" in preflight.report()


def test_streamed_save_writes_the_same_artifact(small, tmp_path):
    """lowbit.save(stream=True) (what onloading writes with) gives lowbit.save's bytes, and loads."""
    model = transformers.AutoModelForCausalLM.from_pretrained(small).eval()
    q = lowbit.quantize(model, "int4-weight-only", progress=False, kernels="reference")
    plain = lowbit.save(q, tmp_path / "plain")
    streamed = lowbit.save(q, tmp_path / "streamed", stream=True)
    _same_files(tmp_path / "plain", tmp_path / "streamed")
    assert streamed == plain
    skeleton = transformers.AutoModelForCausalLM.from_pretrained(small).eval()
    again = lowbit.load(tmp_path / "streamed", model=skeleton, kernels="reference")
    x = _batches(512)[0]
    assert torch.equal(again(x).logits, q(x).logits)


def test_a_data_aware_output_head_is_refused_with_the_reason(small, tmp_path):
    import dataclasses

    from lowbit.recipes import resolve

    recipe = dataclasses.replace(resolve("int4-gptq"), embeddings_and_head="recipe")
    with pytest.raises(lowbit.ModelError, match="lm_head is calibrated after the last stage"):
        lowbit.quantize_checkpoint(small, recipe, _batches(512), tmp_path / "out", report=False)
    assert not (tmp_path / "out").exists()
