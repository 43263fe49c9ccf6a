"""Small CTC acoustic models over log-mel features: ``model(features [B, T, n_mels])`` -> logits
``[B, T', vocab + 1]`` (index 0 the CTC blank), with ``T' = output_lengths(T)``.

Every weight sits in an ``nn.Conv1d``, ``nn.LSTM`` or ``nn.Linear`` (attention is written with
linear projections, not ``nn.MultiheadAttention``, whose fused kernel lowbit keeps float), so
every technique of the suite reaches every layer.

>>> import torch
>>> CTCLSTM()(torch.zeros(2, 100, 40)).shape
torch.Size([2, 25, 21])
>>> CTCConformerLite()(torch.zeros(2, 100, 40)).shape
torch.Size([2, 25, 21])
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.domains.speech_data import N_MELS, VOCAB


def output_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """Output frames for ``lengths`` input frames (the front-end's two stride-2 convolutions).

    >>> output_lengths(torch.tensor([100, 7, 1])).tolist()
    [25, 2, 1]
    """
    for _ in range(2):  # kernel 5, stride 2, padding 2: ceil(n / 2)
        lengths = torch.div(lengths - 1, 2, rounding_mode="floor") + 1
    return lengths


class ConvFrontEnd(nn.Module):
    """Two stride-2 Conv1d over time (10 ms frames -> 40 ms): four times fewer steps for the
    recurrence or attention that follows, which is most of the cost."""

    def __init__(self, n_mels: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, width, 5, stride=2, padding=2)
        self.conv2 = nn.Conv1d(width, width, 5, stride=2, padding=2)
        self.act = nn.ReLU()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv1(features.transpose(1, 2)))
        return self.act(self.conv2(x)).transpose(1, 2)  # [B, T', width]


class CTCLSTM(nn.Module):
    """Conv front-end, a bidirectional LSTM, a linear layer to the 20 words plus the blank."""

    def __init__(self, n_mels: int = N_MELS, width: int = 128, hidden: int = 128, layers: int = 1) -> None:
        super().__init__()
        self.frontend = ConvFrontEnd(n_mels, width)
        self.lstm = nn.LSTM(width, hidden, num_layers=layers, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, len(VOCAB) + 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x, _ = self.lstm(self.frontend(features))
        return self.head(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention from plain linear layers (so they can be quantized)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class ConformerBlock(nn.Module):
    """A lighter conformer block: half-step feed-forward, self-attention, depthwise convolution
    (which also gives the model its sense of position: there is no positional encoding), and a
    second half-step feed-forward, each pre-norm and residual."""

    def __init__(self, dim: int, heads: int, ff: int, kernel: int = 15) -> None:
        super().__init__()
        self.ff1 = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ff), nn.SiLU(), nn.Linear(ff, dim))
        self.norm_att = nn.LayerNorm(dim)
        self.att = SelfAttention(dim, heads)
        self.norm_conv = nn.LayerNorm(dim)
        self.pointwise_in = nn.Linear(dim, 2 * dim)
        self.depthwise = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.pointwise_out = nn.Linear(dim, dim)
        self.ff2 = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ff), nn.SiLU(), nn.Linear(ff, dim))
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.ff1(x)
        x = x + self.att(self.norm_att(x))
        y = nn.functional.glu(self.pointwise_in(self.norm_conv(x)), dim=-1)
        y = nn.functional.silu(self.depthwise(y.transpose(1, 2))).transpose(1, 2)
        x = x + self.pointwise_out(y)
        x = x + 0.5 * self.ff2(x)
        return self.norm_out(x)


class CTCConformerLite(nn.Module):
    """Conv front-end, ``blocks`` conformer-lite blocks, a linear layer to the words plus the blank."""

    def __init__(
        self, n_mels: int = N_MELS, dim: int = 128, blocks: int = 2, heads: int = 4, ff: int = 256
    ) -> None:
        super().__init__()
        self.frontend = ConvFrontEnd(n_mels, dim)
        self.blocks = nn.Sequential(*[ConformerBlock(dim, heads, ff) for _ in range(blocks)])
        self.head = nn.Linear(dim, len(VOCAB) + 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.frontend(features)))
