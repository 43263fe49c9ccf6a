"""tiny-gpt: trains from nothing on a fresh machine, caches, reloads, and is measured by perplexity.

The full recipe trains for about a minute, so these tests use a tiny configuration of the same
code path (same data pipeline, training loop, cache and ZooModel) in a temporary cache dir.
"""

from __future__ import annotations

import dataclasses
import sysconfig
from pathlib import Path

import pytest
import torch

import lowbit.zoo as zoo
from lowbit.eval.perplexity import perplexity
from lowbit.zoo.tinygpt import (
    STDLIB_FILES,
    VOCAB,
    TinyGPT,
    TinyGPTConfig,
    get_tiny_gpt,
    split_text,
    stdlib_text,
)

SMALL = TinyGPTConfig(
    n_layer=2, n_head=2, d_model=48, context=64, steps=80, batch_size=16, lr=4e-3, warmup=10
)


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 100 KB of the standard library, so training on it (``text_path``) is quick."""
    path = tmp_path_factory.mktemp("text") / "corpus.py"
    path.write_bytes(stdlib_text()[:100_000])
    return path


def test_every_stdlib_file_exists_in_this_python() -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    assert all((root / name).is_file() for name in STDLIB_FILES)
    assert len(stdlib_text()) > 300_000


def test_trains_on_a_fresh_machine_then_loads_from_cache(fresh_cache: Path, text_file: Path) -> None:
    zm = get_tiny_gpt(text_path=text_file, config=SMALL, calibration_batches=2, batch_size=8)
    assert zm.metric == "perplexity" and zm.name == "tiny-gpt"
    assert len(zm.calibration) == 2 and zm.calibration[0]["input_ids"].shape == (8, 64)
    assert zm.eval_data and all(b["input_ids"].shape[1] == 64 for b in zm.eval_data)
    cached = sorted(p.name for p in fresh_cache.iterdir())
    assert len(cached) == 2 and cached[0].endswith(".json") and cached[1].endswith(".safetensors")

    ppl = perplexity(zm.model, zm.eval_data)
    # Untrained, the model is at ~VOCAB (uniform over bytes); 80 steps reach ~8 (60: 9.1, 120: 6.9).
    assert ppl < 0.1 * VOCAB
    untrained = perplexity(TinyGPT(SMALL), zm.eval_data)
    assert untrained > 0.5 * VOCAB and ppl < 0.1 * untrained

    again = get_tiny_gpt(text_path=text_file, config=SMALL, calibration_batches=2, batch_size=8)
    before, after = zm.model.state_dict(), again.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert perplexity(again.model, again.eval_data) == ppl
    for x, y in zip(zm.calibration, again.calibration, strict=True):
        assert torch.equal(x["input_ids"], y["input_ids"])


def test_a_different_text_or_config_gets_its_own_cache_entry(fresh_cache: Path, text_file: Path) -> None:
    tiny = TinyGPTConfig(n_layer=1, n_head=2, d_model=16, context=32, steps=2, batch_size=2)
    get_tiny_gpt(text_path=text_file, config=tiny, calibration_batches=1)
    other = text_file.parent / "other.py"
    other.write_bytes(text_file.read_bytes()[::-1])
    get_tiny_gpt(text_path=other, config=tiny, calibration_batches=1)
    reseeded = dataclasses.replace(tiny, seed=1)
    get_tiny_gpt(text_path=text_file, config=reseeded, calibration_batches=1)
    assert len(list(fresh_cache.glob("*.safetensors"))) == 3


def test_training_is_deterministic(text_file: Path) -> None:
    from lowbit.zoo.tinygpt import train_tiny_gpt

    train, _held = split_text(text_file.read_bytes())
    cfg = TinyGPTConfig(n_layer=1, n_head=2, d_model=16, context=32, steps=3, batch_size=4)
    state_a, state_b = train_tiny_gpt(train, cfg).state_dict(), train_tiny_gpt(train, cfg).state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_split_holds_out_every_tenth_chunk() -> None:
    text = bytes(range(256)) * 1000  # 256000 bytes = 62.5 chunks of 4096
    train, held = split_text(text)
    assert len(train) + len(held) == len(text)
    assert len(held) == 6 * 4096
    assert torch.equal(held[:4096], torch.tensor(list(text[9 * 4096 : 10 * 4096])))


def test_registered_in_the_zoo_and_rejects_bad_text(fresh_cache: Path, tmp_path: Path) -> None:
    assert "tiny-gpt" in zoo.names()
    short = tmp_path / "short.txt"
    short.write_text("print('hi')\n")
    with pytest.raises(ValueError, match="needs at least"):
        zoo.get("tiny-gpt", text_path=short)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        zoo.get("tiny-gpt", text_path=tmp_path / "missing.txt")


def test_context_is_enforced() -> None:
    model = TinyGPT(TinyGPTConfig(n_layer=1, n_head=2, d_model=16, context=8))
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_perplexity_of_hugging_face_style_outputs_and_padding() -> None:
    """``.logits`` outputs, ``attention_mask`` padding and explicit ``labels`` are all honoured."""

    class Output:
        def __init__(self, logits: torch.Tensor) -> None:
            self.logits = logits

    class Model(torch.nn.Module):
        """Predicts token 1 with probability ~1 everywhere."""

        def __init__(self) -> None:
            super().__init__()
            self.seen: list[set[str]] = []

        def forward(self, input_ids, attention_mask=None):
            self.seen.append({"input_ids"} | ({"attention_mask"} if attention_mask is not None else set()))
            return Output(torch.nn.functional.one_hot(torch.ones_like(input_ids), 4).float() * 50)

    model = Model()
    ids = torch.tensor([[1, 1, 1, 3, 3]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    # Only the two real next tokens (1, 1) count: near-certain, so perplexity ~1.
    assert perplexity(model, [{"input_ids": ids, "attention_mask": mask}]) < 1.001
    # Without the mask the padded 3s are wrong predictions.
    assert perplexity(model, [{"input_ids": ids}]) > 100
    labels = torch.tensor([[-100, 1, -100, -100, 3]])
    assert perplexity(model, [{"input_ids": ids, "labels": labels}]) > 100  # one right, one wrong
    assert model.seen[0] == {"input_ids", "attention_mask"}
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, [{"input_ids": torch.tensor([[1]])}])
