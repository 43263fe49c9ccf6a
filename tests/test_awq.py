"""AWQ math: activation-aware scales and clipping beat round-to-nearest when a few channels are salient."""

from __future__ import annotations

import pytest
import torch

import lowbit.formats as F
from lowbit.algorithms.awq import (
    awq_search_clip,
    awq_search_scales,
    gram,
    output_mse,
    scales_for_alpha,
)
from lowbit.granularity import PerChannel, PerGroup, PerTensor
from lowbit.primitives import choose_qparams, dequantize, quantize

SALIENT = 4


def salient_inputs(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, d, generator=gen)
    x[:, :SALIENT] *= 25  # a few channels with much larger activations, as in LLMs
    return x


def held_out_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    return float(((x @ (w - q).T) ** 2).mean())


def rtn(w: torch.Tensor, fmt, gran, symmetric: bool) -> torch.Tensor:
    qp = choose_qparams(w, fmt, gran, symmetric)
    return dequantize(quantize(w, fmt, qp), fmt, qp)


@pytest.fixture(scope="module")
def layer():
    gen = torch.Generator().manual_seed(11)
    d = 256
    return torch.randn(96, d, generator=gen), salient_inputs(512, d, gen), salient_inputs(4096, d, gen)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("gran", [PerChannel(0), PerGroup(128), PerGroup(48)], ids=["channel", "g128", "g48"])
def test_awq_int4_beats_rtn_on_held_out_inputs(layer, symmetric: bool, gran) -> None:
    w, x_cal, x_test = layer
    fmt = F.get("int4")
    s = awq_search_scales(w, x_cal, fmt, gran, symmetric)
    assert s.dtype == torch.float32 and s.shape == (256,)
    # The salient channels are scaled up relative to the others.
    assert float(s[:SALIENT].min()) > float(s[SALIENT:].max())
    err_rtn = held_out_error(x_test, w, rtn(w, fmt, gran, symmetric))
    err_awq = held_out_error(x_test, w, rtn(w * s, fmt, gran, symmetric) / s)
    assert err_awq < 0.6 * err_rtn  # measured ~0.35-0.41
    qp = awq_search_clip(w * s, x_cal / s, fmt, gran, symmetric)
    err_clip = held_out_error(x_test, w, dequantize(quantize(w * s, fmt, qp), fmt, qp) / s)
    assert err_clip < err_awq  # measured a further 10-30% lower


def test_alpha_zero_is_rtn_and_the_search_never_loses_on_its_data(gen) -> None:
    """Without salient channels the best scale may be 1 (alpha = 0); never worse than RTN."""
    w, x = torch.randn(32, 64, generator=gen), torch.randn(300, 64, generator=gen)
    fmt = F.get("int3")
    assert torch.equal(scales_for_alpha(x.abs().mean(0), 0.0), torch.ones(64))
    s = awq_search_scales(w, x, fmt, PerGroup(32), n_grid=10)
    g = gram(x)
    searched = output_mse(w, rtn(w * s, fmt, PerGroup(32), True) / s, g)
    assert searched <= output_mse(w, rtn(w, fmt, PerGroup(32), True), g)


def test_shared_input_weights_get_one_scale(layer) -> None:
    w, x_cal, x_test = layer
    fmt = F.get("int4")
    k = w.flip(0) * 0.5
    s = awq_search_scales([w, k], x_cal, fmt, PerGroup(128))
    total = sum(held_out_error(x_test, m, rtn(m * s, fmt, PerGroup(128), True) / s) for m in (w, k))
    total_rtn = sum(held_out_error(x_test, m, rtn(m, fmt, PerGroup(128), True)) for m in (w, k))
    assert total < 0.6 * total_rtn


def test_given_act_mean_overrides_the_sample(layer) -> None:
    w, x_cal, _x_test = layer
    fmt = F.get("int4")
    uniform = torch.ones(256)  # every candidate scale is then 1 whatever alpha is
    s = awq_search_scales(w, x_cal, fmt, PerGroup(128), act_mean=uniform)
    assert torch.equal(s, torch.ones(256))


def test_scales_for_alpha_normalises_and_floors_dead_channels() -> None:
    mean = torch.tensor([0.0, 1.0, 100.0])
    s = scales_for_alpha(mean, 1.0)
    assert torch.isfinite(s).all() and float(s.min()) > 0
    assert float(s.max() * s.min()) == pytest.approx(1.0)


def test_clip_search_is_per_block_and_never_worse_than_full_range(gen) -> None:
    w, x = torch.randn(16, 100, generator=gen), torch.randn(400, 100, generator=gen)
    w[0, 5] = 12.0  # an outlier makes clipping its block attractive
    fmt = F.get("int3")
    for gran in (PerGroup(32), PerChannel(0), PerTensor()):
        qp = awq_search_clip(w, x, fmt, gran, symmetric=False)
        full = choose_qparams(w, fmt, gran, symmetric=False)
        assert qp.scale.shape == full.scale.shape and qp.block == full.block
        assert (qp.scale <= full.scale * (1 + 1e-6)).all()
        g = gram(x)
        clipped = output_mse(w, dequantize(quantize(w, fmt, qp), fmt, qp), g)
        assert clipped <= output_mse(w, dequantize(quantize(w, fmt, full), fmt, full), g) * (1 + 1e-9)


def test_invalid_inputs_raise() -> None:
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="in_features=8"):
        awq_search_scales(w, torch.randn(10, 7), F.get("int4"), PerChannel(0))
    with pytest.raises(ValueError, match="sharing in_features"):
        awq_search_scales([w, torch.randn(4, 9)], torch.randn(10, 8), F.get("int4"), PerChannel(0))
    with pytest.raises(ValueError, match="act_mean"):
        awq_search_scales(w, torch.randn(10, 8), F.get("int4"), PerChannel(0), act_mean=torch.ones(3))
    with pytest.raises(ValueError, match="affine integer"):
        awq_search_clip(w, torch.randn(10, 8), F.get("nf4"), PerChannel(0))
