"""Models lowbit's authors did not write, built locally (no downloads), for the model suite.

Each builder takes ``size="small"`` (tests: seconds on two cores) or ``"full"`` (the bench: wider,
deeper configs) and returns a :class:`Built`: the float model in eval mode, calibration batches and
evaluation batches *as a user has them* (dicts for Hugging Face models, tensors for the rest), and
whether the output is a classifier's logits (then top-1 agreement is measured too).

Hugging Face models are random-init from their config classes (``transformers`` is optional: a
builder raises ``ImportError`` without it). Init: transformers' default ``initializer_range`` (0.02)
except MobileNetV2, whose default gives logits of ~1e-25 (denormals that ONNX Runtime flushes to
zero) and which is built with ``initializer_range=0.2`` (activations of the size a trained model
has). The three models of our own use PyTorch's default init.

>>> b = build("tagger")
>>> b.model(b.calibration[0]).shape
torch.Size([4, 12, 9])
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the network


@dataclass
class Built:
    """A model ready for the suite, with batches as a user has them."""

    model: nn.Module
    calibration: list[Any]  # input batches for quantize / QAT
    evaluation: list[Any]  # held-out input batches (fidelity, ONNX, evaluate)
    classifier: bool = False  # the main output's last axis are class logits (top-1 agreement)
    init: str = "PyTorch default"
    notes: list[str] = field(default_factory=list)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _no_zero_tables(model: nn.Module, std: float = 0.02) -> nn.Module:
    """Draw every all-zero table (a parameter of 2 or more dims: Yolos' detection tokens, class
    token and position embeddings) from N(0, std): a trained model never has them all zero, and
    with identical zero detection tokens every box has the same near-zero logits, so any change
    (one QAT step) turns the tiny outputs around. Biases and norms (1-D) keep their init."""
    g = _gen(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _token_batches(vocab: int, count: int, batch: int, length: int, seed: int, mask: bool = True) -> list:
    from transformers import BatchEncoding

    g = _gen(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (batch, length), generator=g)
        data = {"input_ids": ids}
        if mask:
            data["attention_mask"] = torch.ones_like(ids)
        out.append(BatchEncoding(data))
    return out


def _pixel_batches(count: int, batch: int, size: int, seed: int, channels: int = 3) -> list:
    g = _gen(seed)
    return [{"pixel_values": torch.randn(batch, channels, size, size, generator=g)} for _ in range(count)]


# --- transformers ------------------------------------------------------------------------------------


def bert(size: str = "small") -> Built:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    if size == "small":
        cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)  # fmt: skip
        shape = (4, 12)
    else:
        cfg = BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=1024, max_position_embeddings=128)  # fmt: skip
        shape = (8, 32)
    model = BertModel(cfg).eval()
    calib = _token_batches(cfg.vocab_size, 4, *shape, seed=1)
    evals = _token_batches(cfg.vocab_size, 2, *shape, seed=2)
    return Built(model, calib, evals, init="HF default (0.02)")


def distilbert(size: str = "small") -> Built:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    if size == "small":
        cfg = DistilBertConfig(vocab_size=128, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                               max_position_embeddings=64, num_labels=3)  # fmt: skip
        shape = (4, 12)
    else:
        cfg = DistilBertConfig(vocab_size=1000, dim=256, n_layers=4, n_heads=4, hidden_dim=1024,
                               max_position_embeddings=128, num_labels=3)  # fmt: skip
        shape = (8, 32)
    model = DistilBertForSequenceClassification(cfg).eval()
    calib = _token_batches(cfg.vocab_size, 4, *shape, seed=1)
    evals = _token_batches(cfg.vocab_size, 2, *shape, seed=2)
    return Built(model, calib, evals, classifier=True, init="HF default (0.02)")


def _causal_lm(model_cls: type, small: Any, full: Any, size: str) -> Built:
    """A random-init causal LM and token batches (4 x 12 small, 8 x 32 full)."""
    cfg, shape = (small, (4, 12)) if size == "small" else (full, (8, 32))
    model = model_cls(cfg).eval()
    calib = _token_batches(cfg.vocab_size, 4, *shape, seed=1)
    evals = _token_batches(cfg.vocab_size, 2, *shape, seed=2)
    return Built(model, calib, evals, classifier=True, init="HF default (0.02)")


def gpt2(size: str = "small") -> Built:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return _causal_lm(
        GPT2LMHeadModel,
        GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=2, n_positions=64),
        GPT2Config(vocab_size=1000, n_embd=256, n_layer=4, n_head=4, n_positions=128),
        size,
    )


def llama(size: str = "small") -> Built:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return _causal_lm(
        LlamaForCausalLM,
        LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64),
        LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
        size,
    )  # fmt: skip


def vit(size: str = "small") -> Built:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    if size == "small":
        cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        image_size=32, patch_size=8, num_labels=5)  # fmt: skip
        shape = (4, 32)
    else:
        cfg = ViTConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768,
                        image_size=64, patch_size=8, num_labels=10)  # fmt: skip
        shape = (8, 64)
    model = ViTForImageClassification(cfg).eval()
    return Built(model, _pixel_batches(4, *shape, seed=1), _pixel_batches(2, *shape, seed=2), True,
                 init="HF default (0.02)")  # fmt: skip


def resnet(size: str = "small") -> Built:
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    if size == "small":
        cfg = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck",
                           num_labels=5)  # fmt: skip
        shape = (4, 32)
    else:
        cfg = ResNetConfig(embedding_size=32, hidden_sizes=[64, 128, 256], depths=[2, 2, 2],
                           layer_type="bottleneck", num_labels=10)  # fmt: skip
        shape = (8, 64)
    model = ResNetForImageClassification(cfg).eval()
    return Built(model, _pixel_batches(4, *shape, seed=1), _pixel_batches(2, *shape, seed=2), True,
                 init="HF default (kaiming normal convs)")  # fmt: skip


def mobilenetv2(size: str = "small") -> Built:
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    torch.manual_seed(0)
    # The default initializer_range (0.02) gives logits ~1e-25: denormals ORT flushes to zero.
    if size == "small":
        cfg = MobileNetV2Config(image_size=32, depth_multiplier=0.35, num_labels=5, initializer_range=0.2)
        shape = (2, 32)  # 52 convs: the slowest small model, so smaller batches
    else:
        cfg = MobileNetV2Config(image_size=64, depth_multiplier=0.75, num_labels=10, initializer_range=0.2)
        shape = (8, 64)
    model = MobileNetV2ForImageClassification(cfg).eval()
    return Built(model, _pixel_batches(4, *shape, seed=1), _pixel_batches(2, *shape, seed=2), True,
                 init="initializer_range=0.2 (default 0.02 gives ~1e-25 logits)")  # fmt: skip


def yolos(size: str = "small") -> Built:
    from transformers import YolosConfig, YolosForObjectDetection

    torch.manual_seed(0)
    if size == "small":
        cfg = YolosConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=[32, 32], patch_size=8, num_detection_tokens=5, num_labels=3)
        shape = (2, 32)
    else:
        cfg = YolosConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768,
                          image_size=[64, 64], patch_size=8, num_detection_tokens=20, num_labels=10)
        shape = (4, 64)
    model = _no_zero_tables(YolosForObjectDetection(cfg).eval(), cfg.initializer_range)
    # Output: class logits per detection token (the main output; top-1 = the class of each box).
    return Built(model, _pixel_batches(4, *shape, seed=1), _pixel_batches(2, *shape, seed=2), True,
                 init="HF default (0.02); zero token tables drawn from N(0, 0.02)")  # fmt: skip


def whisper(size: str = "small") -> Built:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    if size == "small":
        cfg = WhisperConfig(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2,
                            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                            decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=32,
                            max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                            decoder_start_token_id=1)  # fmt: skip
        batch, tokens = 2, 6
    else:
        cfg = WhisperConfig(vocab_size=1000, d_model=192, encoder_layers=4, decoder_layers=4,
                            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=768,
                            decoder_ffn_dim=768, num_mel_bins=80, max_source_positions=100,
                            max_target_positions=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                            decoder_start_token_id=1)  # fmt: skip
        batch, tokens = 4, 16
    model = WhisperForConditionalGeneration(cfg).eval()
    frames = 2 * cfg.max_source_positions  # the encoder's two convs halve the frames once

    def batches(count: int, seed: int) -> list:
        g = _gen(seed)
        return [
            {
                "input_features": torch.randn(batch, cfg.num_mel_bins, frames, generator=g),
                "decoder_input_ids": torch.randint(3, cfg.vocab_size, (batch, tokens), generator=g),
            }
            for _ in range(count)
        ]

    return Built(model, batches(4, 1), batches(2, 2), True, init="HF default (0.02)")


# --- models of our own -------------------------------------------------------------------------------


class Tagger(nn.Module):
    """Token tagger: embedding -> bidirectional LSTM (or GRU) -> linear per token."""

    def __init__(self, vocab: int, dim: int, hidden: int, tags: int, cell: str = "lstm") -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn(dim, hidden, num_layers=2, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * hidden, tags)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.embed(ids))
        return self.out(h)


class CRNN(nn.Module):
    """CRNN-style text-line recogniser: conv stack -> pool the height away -> BiLSTM -> per-column
    logits. ``AdaptiveAvgPool2d((None, 1))`` keeps the width (time) and needs static ONNX shapes."""

    def __init__(self, channels: int, hidden: int, classes: int) -> None:
        super().__init__()
        c = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(), nn.MaxPool2d((2, 1)),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.pool = nn.AdaptiveAvgPool2d((None, 1))
        self.rnn = nn.LSTM(2 * c, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        f = self.features(image)  # (B, C, H', W')
        f = self.pool(f.transpose(2, 3)).squeeze(-1)  # pool over height: (B, C, W')
        h, _ = self.rnn(f.transpose(1, 2))  # (B, W', 2 * hidden)
        return self.head(h)


class AudioNet(nn.Module):
    """Raw waveform -> strided Conv1d stack -> global average pool -> class logits."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        c = channels
        self.features = nn.Sequential(
            nn.Conv1d(1, c, 16, stride=4, padding=6), nn.BatchNorm1d(c), nn.ReLU(),
            nn.Conv1d(c, c, 9, stride=2, padding=4), nn.BatchNorm1d(c), nn.ReLU(),
            nn.Conv1d(c, 2 * c, 9, stride=2, padding=4), nn.ReLU(),
            nn.Conv1d(2 * c, 2 * c, 3, padding=1, groups=2), nn.ReLU(),
        )  # fmt: skip
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(2 * c, classes)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(wave)).flatten(1))


def _randomise_batchnorm(model: nn.Module, seed: int) -> None:
    """Give BatchNorm running statistics that are not the identity (as a trained model has)."""
    g = _gen(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def tagger(size: str = "small") -> Built:
    torch.manual_seed(0)
    vocab, dim, hidden, tags, shape = (
        (64, 16, 24, 9, (4, 12)) if size == "small" else (2000, 128, 256, 17, (16, 40))
    )
    model = Tagger(vocab, dim, hidden, tags).eval()
    g = _gen(1)
    calib = [torch.randint(0, vocab, shape, generator=g) for _ in range(4)]
    evals = [torch.randint(0, vocab, shape, generator=g) for _ in range(2)]
    return Built(model, calib, evals, classifier=True)


def crnn(size: str = "small") -> Built:
    torch.manual_seed(0)
    channels, hidden, classes, shape = (
        (8, 16, 11, (2, 1, 16, 48)) if size == "small" else (32, 128, 37, (8, 1, 32, 128))
    )
    model = CRNN(channels, hidden, classes).eval()
    _randomise_batchnorm(model, 3)
    g = _gen(1)
    calib = [torch.randn(shape, generator=g) for _ in range(4)]
    evals = [torch.randn(shape, generator=g) for _ in range(2)]
    return Built(model, calib, evals, classifier=True)


def audio(size: str = "small") -> Built:
    torch.manual_seed(0)
    channels, classes, shape = (8, 6, (4, 1, 1024)) if size == "small" else (64, 12, (8, 1, 16000))
    model = AudioNet(channels, classes).eval()
    _randomise_batchnorm(model, 3)
    g = _gen(1)
    calib = [torch.randn(shape, generator=g) * 0.3 for _ in range(4)]
    evals = [torch.randn(shape, generator=g) * 0.3 for _ in range(2)]
    return Built(model, calib, evals, classifier=True)


BUILDERS: dict[str, Callable[[str], Built]] = {
    "bert": bert,
    "distilbert": distilbert,
    "gpt2": gpt2,
    "llama": llama,
    "vit": vit,
    "resnet": resnet,
    "mobilenetv2": mobilenetv2,
    "yolos": yolos,
    "whisper": whisper,
    "tagger": tagger,
    "crnn": crnn,
    "audio": audio,
}
HF_MODELS = ("bert", "distilbert", "gpt2", "llama", "vit", "resnet", "mobilenetv2", "yolos", "whisper")
CLASSES = {
    "bert": "BertModel",
    "distilbert": "DistilBertForSequenceClassification",
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "vit": "ViTForImageClassification",
    "resnet": "ResNetForImageClassification",
    "mobilenetv2": "MobileNetV2ForImageClassification",
    "yolos": "YolosForObjectDetection",
    "whisper": "WhisperForConditionalGeneration",
    "tagger": "embedding + 2-layer BiLSTM + linear (ours)",
    "crnn": "conv + AdaptiveAvgPool2d((None, 1)) + BiLSTM (ours)",
    "audio": "raw-waveform Conv1d stack (ours)",
}


def build(name: str, size: str = "small") -> Built:
    """The model ``name`` (a key of ``BUILDERS``) at ``size`` ("small" or "full")."""
    if size not in ("small", "full"):
        raise ValueError(f"size must be 'small' or 'full', got {size!r}")
    return BUILDERS[name](size)


INITS = {
    **{name: "transformers default (`initializer_range=0.02`)" for name in HF_MODELS},
    "resnet": "transformers default (Kaiming-normal convs)",
    "yolos": "transformers default (0.02), but its all-zero detection / class tokens and position"
    " embeddings drawn from N(0, 0.02) (all-zero tokens give every box the same near-zero logits)",
    "mobilenetv2": "`initializer_range=0.2` (the default 0.02 gives logits of ~1e-25)",
    "crnn": "PyTorch default; BatchNorm running statistics randomised",
    "audio": "PyTorch default; BatchNorm running statistics randomised",
    "tagger": "PyTorch default",
}
