"""lowbit.zoo.tinylms: the three bench LMs build, train, cache, reload and are measured by perplexity.

Tiny configurations of the same code path (a few training steps on ~100 KB of stdlib source in a
temporary cache dir), so the tests need neither /work/shared nor minutes of training.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowbit.eval.perplexity import perplexity
from lowbit.zoo.tinygpt import stdlib_text
from lowbit.zoo.tinylms import ARCHS, TinyLMConfig, build_tiny_lm, default_config, get_tiny_lm


def _small(arch: str, steps: int = 30) -> TinyLMConfig:
    return TinyLMConfig(
        arch, n_layer=2, n_head=2, d_model=32, context=32, steps=steps, batch_size=8, warmup=5
    )


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_bytes(stdlib_text()[:100_000])
    return path


@pytest.mark.parametrize("arch", ARCHS)
def test_trains_caches_and_reloads_the_same_weights(arch: str, fresh_cache: Path, text_file: Path) -> None:
    pytest.importorskip("transformers")
    cfg = _small(arch)
    zm = get_tiny_lm(arch, text_file, cfg, calibration_batches=2, batch_size=4, max_eval_batches=3)
    assert zm.name == f"tiny-{arch}" and zm.metric == "perplexity"
    assert len(zm.calibration) == 2 and zm.calibration[0]["input_ids"].shape == (4, 32)
    assert len(zm.eval_data) == 3
    trained = perplexity(zm.model, zm.eval_data)
    # A few steps already beat the uniform guess over 256 bytes (perplexity 256).
    assert trained < 200
    assert len(list(fresh_cache.glob(f"tiny-{arch}-*.safetensors"))) == 1
    again = get_tiny_lm(arch, text_file, cfg, calibration_batches=2, batch_size=4, max_eval_batches=3)
    for (name, a), (_, b) in zip(
        zm.model.state_dict().items(), again.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert perplexity(again.model, again.eval_data) == trained


def test_heads_are_untied_so_embeddings_can_stay_float() -> None:
    pytest.importorskip("transformers")
    for arch in ("gpt2", "llama"):
        model = build_tiny_lm(_small(arch))
        embedding = model.get_input_embeddings().weight
        assert model.get_output_embeddings().weight is not embedding


def test_group_sizes_of_the_bench_divide_every_input_width() -> None:
    transformers = pytest.importorskip("transformers")
    for arch in ARCHS:
        widths = set()
        for module in build_tiny_lm(default_config(arch, n_layer=1)).modules():
            if isinstance(module, torch.nn.Linear):
                widths.add(module.in_features)
            elif isinstance(module, transformers.pytorch_utils.Conv1D):
                widths.add(module.weight.shape[0])  # Conv1D stores [in, out]
            elif isinstance(module, torch.nn.LSTM):
                widths |= {module.input_size, module.hidden_size}
        assert widths and all(w % 128 == 0 for w in widths), (arch, widths)


def test_bad_arguments_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tiny LM architecture 'rnn'"):
        TinyLMConfig("rnn")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_tiny_lm("lstm", tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="config is for 'gpt2'"):
        get_tiny_lm("lstm", tmp_path / "missing.txt", TinyLMConfig("gpt2"))
