"""Granularity: block shapes, parsing, the blocked view, and that blocking (padding included) gives
exactly what quantizing each block on its own gives."""

from __future__ import annotations

import pytest
import torch

import lowbit.formats as F
from lowbit.granularity import (
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    block_dims,
    block_shape,
    blocked_shape,
    expand_params,
    from_blocks,
    parse,
    to_blocks,
)
from lowbit.primitives import choose_qparams, fake_quantize, fake_quantize_tensor

# --- block shapes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gran", "shape", "expected"),
    [
        (PerTensor(), (64, 300), (64, 300)),
        (PerTensor(), (), ()),
        (PerChannel(0), (64, 300), (1, 300)),
        (PerChannel(1), (64, 300), (64, 1)),
        (PerChannel(-1), (64, 300), (64, 1)),
        (PerChannel(0), (8, 4, 3, 3), (1, 4, 3, 3)),  # conv weight: one scale per output channel
        (PerChannel(0), (7,), (1,)),
        (PerGroup(128), (64, 300), (1, 128)),
        (PerGroup(128), (64, 100), (1, 100)),  # a group larger than the row is the whole row
        (PerGroup(32), (2, 3, 64), (1, 1, 32)),
        (PerGroup(32), (5, 0), (1, 32)),  # empty last dim: the group size stays valid
        (PerToken(), (2, 3, 64), (1, 1, 64)),
        (PerToken(), (10, 16), (1, 16)),
        (PerToken(), (), ()),
    ],
)
def test_block_shape(gran, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    assert block_shape(gran, shape) == expected
    assert block_shape(gran, torch.Size(shape)) == expected


def test_block_shape_rejects_bad_axis_and_non_granularity() -> None:
    with pytest.raises(ValueError, match="axis 2 is out of range for a 2-d tensor"):
        block_shape(PerChannel(2), (3, 4))
    with pytest.raises(ValueError, match="out of range"):
        block_shape(PerChannel(-3), (3, 4))
    with pytest.raises(TypeError, match="not a granularity"):
        block_shape("channel", (3, 4))  # type: ignore[arg-type]


def test_group_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="group size must be >= 1"):
        PerGroup(0)


def test_blocked_shape_counts_partial_blocks() -> None:
    assert blocked_shape((64, 300), (1, 128)) == (64, 3)
    assert blocked_shape((64, 300), (64, 300)) == (1, 1)
    assert blocked_shape((5, 0), (1, 32)) == (5, 0)
    assert blocked_shape((), ()) == ()


# --- parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tensor", PerTensor()),
        ("per_tensor", PerTensor()),
        ("channel", PerChannel(0)),
        ("channel:1", PerChannel(1)),
        ("channel:-1", PerChannel(-1)),
        ("group", PerGroup(128)),
        ("group:64", PerGroup(64)),
        ("  Per_Group:32 ", PerGroup(32)),
        ("token", PerToken()),
        ("TOKEN", PerToken()),
    ],
)
def test_parse(text: str, expected) -> None:
    assert parse(text) == expected


def test_parse_passes_granularities_through() -> None:
    gran = PerGroup(16)
    assert parse(gran) is gran


@pytest.mark.parametrize(
    "text", ["", "row", "tensor:1", "token:4", "group:abc", "group:0", "channel:x", "group:-4"]
)
def test_parse_rejects_nonsense_with_a_helpful_message(text: str) -> None:
    with pytest.raises(ValueError, match="unknown granularity .* use 'tensor'"):
        parse(text)


def test_str_names_the_granularity() -> None:
    assert str(PerTensor()) == "per_tensor" and parse(str(PerTensor())) == PerTensor()
    assert str(PerToken()) == "per_token" and parse(str(PerToken())) == PerToken()
    assert str(PerChannel(1)) == "per_channel(axis=1)"
    assert str(PerGroup(64)) == "per_group(64)"


# --- the blocked view ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "block"),
    [((6, 10), (1, 4)), ((6, 10), (6, 10)), ((2, 3, 5), (1, 1, 2)), ((4,), (3,)), ((), ())],
)
def test_to_blocks_round_trips_and_pads_with_zeros(shape: tuple[int, ...], block: tuple[int, ...]) -> None:
    x = torch.arange(1, 1 + torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    xb = to_blocks(x, block)
    counts = blocked_shape(shape, block)
    assert tuple(xb.shape) == tuple(d for n, b in zip(counts, block, strict=True) for d in (n, b))
    assert torch.equal(from_blocks(xb, shape), x)
    # Padding adds zeros only: the sum is unchanged and the extra entries are exactly zero.
    assert float(xb.sum()) == float(x.sum())
    assert int((xb == 0).sum()) == xb.numel() - x.numel()


def test_block_dims_and_expand_params_broadcast_per_block() -> None:
    x = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    xb = to_blocks(x, (1, 4))
    amax = xb.abs().amax(dim=block_dims(2))
    assert amax.shape == (6, 3)
    assert torch.equal(amax[:, 2], x[:, 8:].abs().amax(dim=1))
    assert expand_params(amax, 2).shape == (6, 1, 3, 1)
    assert torch.equal(expand_params(torch.tensor(2.0), 0), torch.tensor(2.0))


# --- blocking equals quantizing each block on its own -------------------------------------------

BLOCKED_FORMATS = [("int4", True), ("int4", False), ("uint8", False), ("fp4_e2m1", True), ("nf4", True)]
BLOCKED_FORMATS += [("binary", True), ("ternary", True), ("log2_4", True)]


@pytest.mark.parametrize(("name", "symmetric"), BLOCKED_FORMATS)
def test_per_group_with_padding_matches_each_group_quantized_alone(
    name: str, symmetric: bool, gen: torch.Generator
) -> None:
    fmt = F.get(name)
    # 10 columns in groups of 4: the last group has 2 real values and 2 padding zeros. Shift the
    # rows so that zero is outside most groups' range: padding must not widen a range or count
    # towards a mean.
    x = torch.randn(6, 10, generator=gen) + torch.linspace(-3, 3, 6).unsqueeze(1)
    blocked = fake_quantize_tensor(x, fmt, PerGroup(4), symmetric)
    manual = torch.empty_like(x)
    for row in range(6):
        for start in range(0, 10, 4):
            group = x[row, start : start + 4]
            manual[row, start : start + 4] = fake_quantize_tensor(group, fmt, PerTensor(), symmetric)
    torch.testing.assert_close(blocked, manual, rtol=0, atol=0)
    assert choose_qparams(x, fmt, PerGroup(4), symmetric).scale.shape == (6, 3)


@pytest.mark.parametrize(("name", "symmetric"), BLOCKED_FORMATS)
def test_per_token_on_3d_activations_matches_each_token_alone(
    name: str, symmetric: bool, gen: torch.Generator
) -> None:
    fmt = F.get(name)
    x = torch.randn(2, 3, 8, generator=gen) * torch.tensor([0.1, 1.0, 30.0]).reshape(1, 3, 1)
    qp = choose_qparams(x, fmt, PerToken(), symmetric)
    assert qp.scale.shape == (2, 3, 1) and qp.block == (1, 1, 8)
    blocked = fake_quantize(x, fmt, qp)
    manual = torch.stack(
        [
            torch.stack([fake_quantize_tensor(tok, fmt, PerTensor(), symmetric) for tok in batch])
            for batch in x
        ]
    )
    torch.testing.assert_close(blocked, manual, rtol=0, atol=0)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize(("name", "symmetric"), [("int8", True), ("uint8", False), ("fp8_e4m3", True)])
def test_per_channel_matches_each_channel_alone(
    name: str, symmetric: bool, axis: int, gen: torch.Generator
) -> None:
    fmt = F.get(name)
    x = torch.randn(5, 7, generator=gen) * torch.rand(5, 1, generator=gen) * 10
    blocked = fake_quantize_tensor(x, fmt, PerChannel(axis), symmetric)
    channels = [fake_quantize_tensor(c, fmt, PerTensor(), symmetric) for c in x.unbind(axis)]
    torch.testing.assert_close(blocked, torch.stack(channels, dim=axis), rtol=0, atol=0)
