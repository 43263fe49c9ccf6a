"""Batches as users have them: lists of images for detectors, BatchEncodings, DataLoaders of pairs."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lowbit
from lowbit.batches import call_args, takes_a_list


class _ListDetector(nn.Module):
    """Takes a list of images of different sizes, as torchvision-style detectors do."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        feats = [self.backbone(im.unsqueeze(0)).mean((2, 3)) for im in images]
        return self.head(torch.cat(feats))


def _images(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 8 + 2 * i, 10 + i, generator=g) for i in range(n)]


def test_a_list_is_one_argument_when_forward_takes_a_list():
    det, lin = _ListDetector(), nn.Bilinear(2, 2, 1)
    assert takes_a_list(det) and not takes_a_list(lin)
    images = _images(3, 0)
    assert call_args(det, images) == ((images,), {})
    pair = [torch.ones(1, 2), torch.ones(1, 2)]
    assert len(call_args(lin, pair)[0]) == 2  # a DataLoader's [x, y] stays positional


def test_a_detector_calibrates_on_lists_of_images():
    torch.manual_seed(0)
    det = _ListDetector().eval()
    calibration = [_images(4, s) for s in range(8)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few calibration examples
        q = lowbit.quantize(det, "int8-static", calibration=calibration, progress=False)
    held_out = _images(4, 99)
    with torch.no_grad():
        out, ref = q(held_out), det(held_out)
    assert out.shape == ref.shape
    assert nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99


def test_a_batch_encoding_calibrates_like_a_dict():
    transformers = pytest.importorskip("transformers")
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32)  # fmt: skip
    model = BertModel(cfg).eval()
    batches = []
    for _ in range(4):
        ids = torch.randint(0, 64, (4, 12))
        batches.append(transformers.BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = lowbit.quantize(model, "int8-static", calibration=batches, progress=False)
    with torch.no_grad():
        out, ref = q(**batches[0]).last_hidden_state, model(**batches[0]).last_hidden_state
    assert nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99


def test_a_dataloader_of_pairs_evaluates_accuracy():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)  # yields [x, y] lists
    q = lowbit.quantize(model, "int8-weight-only", progress=False)
    result = lowbit.evaluate(model, q, loader, metric="accuracy")
    assert result.before > 0.9 and abs(result.after - result.before) < 0.05
