"""Issue 20, item 3: QAT on Conv1d (plain, depthwise, grouped), LSTM / GRU, attention projections
(tiny BERT and GPT-2 from small configs) and models with residual adds and concatenations:
``convert`` computes exactly what the trained fake-quant model computes (``rtol=0, atol=0`` on the
reference kernels), so the activation quantizers sit where the converted layers quantize."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lowbit import qat
from lowbit.nn import QuantizedConv, QuantizedLinear, QuantizedModule, QuantizedRNN

pytestmark = pytest.mark.usefixtures("one_thread", "reference_kernels")


class Conv1dNet(nn.Module):
    """Plain, depthwise and grouped Conv1d, a residual add and a channel concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Conv1d(3, 8, 3, padding=1)
        self.dw = nn.Conv1d(8, 8, 5, padding=2, groups=8)
        self.grouped = nn.Conv1d(8, 8, 3, padding=1, groups=2, bias=False)
        self.branch = nn.Conv1d(8, 4, 1)
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.inp(x))
        x = x + F.relu(self.grouped(F.relu(self.dw(x))))  # residual add
        x = torch.cat([x, self.branch(x)], dim=1)  # concatenation feeding the head
        return self.head(x.mean(-1))


class RNNNet(nn.Module):
    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = cell(6, 8, num_layers=2, batch_first=True)
        self.skip = nn.Linear(6, 8)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(torch.cat([out[:, -1], self.skip(x[:, -1])], dim=-1))


def _train(model: nn.Module, inputs: list, steps: int = 4) -> None:
    """A user's loop: Adam on a loss of the outputs, every step in train mode."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for i in range(steps):
        model.train()
        out = (
            model(**inputs[i % len(inputs)])
            if isinstance(inputs[0], dict)
            else model(inputs[i % len(inputs)])
        )
        value = out if isinstance(out, torch.Tensor) else out[0]
        loss = value.float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _same(model: nn.Module, converted: nn.Module, batch) -> None:  # noqa: ANN001
    with torch.no_grad():
        if isinstance(batch, dict):
            want, got = model.eval()(**batch), converted(**batch)
            want, got = want[0], got[0]
        else:
            want, got = model.eval()(batch), converted(batch)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("lsq", [False, True])
@pytest.mark.parametrize("bits", [4, "ternary"])
def test_conv1d_depthwise_grouped_add_and_concat_convert_exactly(gen, lsq: bool, bits) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    xs = [torch.randn(16, 3, 20, generator=gen) for _ in range(2)]
    model = qat.prepare(Conv1dNet(), qat.recipe(bits), lsq=lsq, keep_edges=False, progress=False)
    qat.calibrate(model, xs)
    _train(model, xs)
    q = qat.convert(model, progress=False)
    assert all(isinstance(getattr(q, n), QuantizedConv) for n in ("inp", "dw", "grouped", "branch"))
    assert q.dw.groups == 8 and q.grouped.groups == 2
    _same(model, q, torch.randn(4, 3, 20, generator=gen))


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("lsq", [False, True])
def test_two_layer_lstm_and_gru_convert_exactly(gen, cell: type[nn.Module], lsq: bool) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    xs = [torch.randn(8, 5, 6, generator=gen) for _ in range(2)]
    model = qat.prepare(RNNNet(cell), qat.recipe(4), lsq=lsq, progress=False)
    qat.calibrate(model, xs)
    _train(model, xs)
    q = qat.convert(model, progress=False)
    assert isinstance(q.rnn, QuantizedRNN) and isinstance(q.skip, QuantizedLinear)
    _same(model, q, torch.randn(3, 5, 6, generator=gen))


def _bert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def _gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("build", [_bert, _gpt2], ids=["bert", "gpt2"])
@pytest.mark.parametrize(("bits", "lsq"), [(4, False), (4, True), ("binary", False)])
def test_attention_projections_convert_exactly(gen, build, bits, lsq: bool) -> None:  # noqa: ANN001
    # Binary: the straight-through value once missed the code value by an ulp on BERT.
    ids = [{"input_ids": torch.randint(0, 64, (4, 12), generator=gen)} for _ in range(2)]
    model = qat.prepare(build(), qat.recipe(bits, activation_bits=8), lsq=lsq, progress=False)
    names = set(qat.qat_layers(model))
    assert any(n.endswith(("attention.self.query", "attn.c_attn")) for n in names), sorted(names)
    qat.calibrate(model, ids)
    _train(model, ids)
    q = qat.convert(model, progress=False)
    kinds = {n: type(m) for n, m in q.named_modules() if isinstance(m, QuantizedModule)}
    assert set(kinds) == names  # every projection, the head and the embeddings are packed
    assert all(kinds[n] is QuantizedLinear for n in names if n.endswith(("query", "c_attn", "c_proj")))
    _same(model, q, {"input_ids": torch.randint(0, 64, (2, 10), generator=gen)})


class EncoderNet(nn.Module):
    """PyTorch's own transformer encoder (its attention stays float: nn.MultiheadAttention reads
    its weights in a fused kernel), feed-forward layers and head quantized."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.encoder(x, src_key_padding_mask=mask)[:, 0])


def test_torch_transformer_encoder_runs_its_quantized_feed_forward_layers(gen, tmp_path) -> None:  # noqa: ANN001
    import lowbit

    xs = [torch.randn(8, 6, 16, generator=gen) for _ in range(2)]
    torch.manual_seed(0)
    float_model = EncoderNet().eval()
    with pytest.warns(UserWarning, match="MultiheadAttention"):
        model = qat.prepare(float_model, qat.recipe(4), progress=False)
    assert set(qat.qat_layers(model)) == {f"encoder.layers.{i}.linear{j}" for i in (0, 1) for j in (1, 2)} | {
        "head"
    }
    qat.calibrate(model, xs)
    _train(model, xs)
    q = qat.convert(model, progress=False)
    x = torch.randn(4, 6, 16, generator=gen)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, 4:] = True  # padded batch: the encoder would pack it into a nested tensor
    # In eval mode without gradients the encoder layer's fused kernel used to read linear1.weight
    # itself, bypassing the fake-quant (QAT) and quantized (converted) layers.
    _same(model, q, x)
    with torch.no_grad():
        torch.testing.assert_close(q(x, mask), model.eval()(x, mask), rtol=0, atol=0)
        lowbit.save(q, tmp_path / "art")
        loaded = lowbit.load(tmp_path / "art", EncoderNet())
        torch.testing.assert_close(loaded(x, mask), q(x, mask), rtol=0, atol=0)
