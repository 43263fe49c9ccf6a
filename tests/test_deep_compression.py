"""Deep Compression: pruning + zero-preserving k-means codebooks + lzma storage, measured on disk."""

from __future__ import annotations

import lzma

import pytest
import torch
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

import lowbit
from lowbit import formats
from lowbit import pruning as P
from lowbit.eval.metrics import accuracy
from lowbit.primitives import dequantize, quantize
from lowbit.pruning.deep_compression import merge_lstm_biases, zero_codebook
from lowbit.train import batches

# The digits models are tiny: one thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def _task(gen: torch.Generator) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A teacher-labelled task wide enough that storage, not headers, dominates the file."""
    teacher = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 8))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    x = torch.randn(1024, 32, generator=gen)
    return teacher, x, teacher(x).argmax(dim=1).detach()


def test_zero_codebook_keeps_pruned_weights_exactly_zero(gen: torch.Generator) -> None:
    w = torch.randn(16, 64, generator=gen)
    w[torch.rand(w.shape, generator=gen) < 0.8] = 0
    qp = zero_codebook(w, 3)
    assert qp.codebook.numel() == 8 and 0.0 in qp.codebook.flatten().tolist()
    fmt = formats.get("kmeans_3")
    back = dequantize(quantize(w, fmt, qp), fmt, qp)
    assert torch.equal(back[w == 0], torch.zeros(int((w == 0).sum())))
    kept = w != 0
    mse = float(((back - w)[kept] ** 2).mean())
    assert mse < 0.06 * float(w[kept].var()), mse  # 7 Lloyd levels on Gaussian data: ~0.04 of the variance


def test_deep_compression_is_small_on_disk_and_keeps_accuracy(gen: torch.Generator, tmp_path) -> None:  # noqa: ANN001
    teacher, x, y = _task(gen)
    data = batches(x, y, 64)
    result = P.deep_compress(
        teacher, data, sparsity=0.9, bits=4, steps=2, epochs_per_step=2, lr=3e-3, progress=False
    )
    assert result.sparsity == pytest.approx(0.9, abs=0.01)
    assert result.model[2].qweight.fmt.name == "kmeans_4"
    size = P.disk_size(result.model, teacher)
    assert size["artifact_bytes"] == size["tensor_bytes"] + size["manifest_bytes"]  # every file counts
    assert size["ratio"] > 25, size  # 4-bit codes alone give 8x; pruning + run lengths + lzma the rest
    assert size["manifest_bytes"] < 800, size  # the compact manifest (it was 1.2 KB, 9 KB indented)
    assert accuracy(result.model, [(x, y)]) >= 0.6  # chance is 1/8; digits figures: docs/notes/issue-7.md
    lowbit.save(result.model, tmp_path / "dc", compression="lzma")
    skeleton = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 8))
    loaded = lowbit.load(tmp_path / "dc", model=skeleton)
    torch.testing.assert_close(loaded(x), result.model(x), rtol=0, atol=0)


def test_deep_compression_beats_plain_codebooks_on_disk(gen: torch.Generator) -> None:
    teacher, x, y = _task(gen)
    dense = lowbit.quantize(teacher, P.deep_compression_recipe(4), progress=False)
    result = P.deep_compress(teacher, batches(x, y, 64), sparsity=0.9, steps=1, epochs_per_step=1,
                             centroid_epochs=0, progress=False)  # fmt: skip
    assert (
        P.disk_size(result.model, teacher)["tensor_bytes"] < 0.6 * P.disk_size(dense, teacher)["tensor_bytes"]
    )


def test_merging_lstm_biases_keeps_the_output(gen: torch.Generator) -> None:
    lstm = nn.LSTM(4, 6, batch_first=True)
    with torch.no_grad():
        lstm.bias_hh_l0.copy_(torch.randn(24, generator=gen))
    x = torch.randn(3, 5, 4, generator=gen)
    reference = lstm(x)[0]
    merge_lstm_biases(lstm)
    assert torch.equal(lstm.bias_hh_l0, torch.zeros(24))
    torch.testing.assert_close(lstm(x)[0], reference, rtol=1e-6, atol=1e-6)


class _Sequences(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 32, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


def test_deep_compressed_lstm_artifact_is_coded_and_reloads_identically(
    gen: torch.Generator, tmp_path
) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = _Sequences()
    x = torch.randn(256, 5, 6, generator=gen)
    y = model(x).argmax(dim=1).detach()
    result = P.deep_compress(model, batches(x, y, 64), sparsity=0.9, bits=3, scope="global", steps=1,
                             epochs_per_step=1, centroid_epochs=1, progress=False)  # fmt: skip
    qlstm = result.model.lstm
    for qw in qlstm.weights.values():  # centroids rounded to bfloat16, zero kept
        book = qw.codebook.flatten()
        assert torch.equal(book, book.to(torch.bfloat16).float()) and 0.0 in book.tolist()
    assert torch.equal(qlstm.bias_hh_l0, torch.zeros(128))  # merged into bias_ih
    manifest = lowbit.save(result.model, tmp_path / "dc")
    tensors = manifest["tensors"]
    assert tensors["lstm.weights.weight_hh_l0.packed"]["coding"][0] == "runs"
    assert tensors["lstm.bias_ih_l0"]["coding"] == ["planes", 2]  # bfloat16-exact: two bytes each
    assert tensors["lstm.bias_hh_l0"]["coding"] == ["planes", 0]  # all zero: nothing stored
    reloaded = lowbit.load(tmp_path / "dc", model=_Sequences())
    assert torch.equal(reloaded(x), result.model(x))
    # Against the previous lzma layout (the whole safetensors file xz-coded):
    state = {k: v.contiguous() for k, v in result.model.state_dict().items()}
    old = len(lzma.compress(save_safetensors_bytes(state), preset=9 | lzma.PRESET_EXTREME))
    size = P.disk_size(result.model, model)
    assert size["tensor_bytes"] < 0.8 * old, (size, old)
