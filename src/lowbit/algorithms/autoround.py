"""AutoRound (Cheng et al., 2023): rounding and clipping learned per block by signed gradient descent.

Round to nearest decides each weight's rounding on its own; GPTQ decides it greedily, one input
column at a time, from a second-order model of one layer. AutoRound decides all of a block's
roundings together, through the block's nonlinearities: every weight gets an offset ``v`` in
``[-0.5, 0.5]`` added before rounding, and every quantization block two clip factors (on its low
and high end, in ``[CLIP_MIN, 1]``) that shrink its range. The block is run on calibration inputs
with the fake-quantized weights (rounding passes gradients straight through); the mean squared
difference to the float block's output is reduced by signed SGD (each step moves every parameter
by ``lr * sign(gradient)``, ``lr`` falling linearly to 0), and the parameters of the step with the
lowest loss are kept. With ``v = 0`` and factors of 1 it is round to nearest, where it starts;
or, given another algorithm's result (``RoundingWeight(..., start=qparams)`` on GPTQ's updated
weight), that result, which it then refines.

Everything here is tensor math on ``[out, in]`` matrices; the caller (``lowbit.ptq.pipeline``)
runs the block and says which inputs to use.

>>> import torch, lowbit.formats as F
>>> from lowbit.granularity import PerGroup
>>> g = torch.Generator().manual_seed(0)
>>> x, w = torch.randn(256, 64, generator=g), torch.randn(16, 64, generator=g)
>>> r = RoundingWeight(w, F.get("int3"), PerGroup(32), symmetric=True)
>>> def loss(fake, _index):
...     return ((x @ fake["w"].T - x @ w.T) ** 2).mean()
>>> info = tune({"w": r}, loss, batches=1, steps=100)
>>> info["best_loss"] < info["start_loss"]
True
>>> codes, qp = r.result()
>>> codes.dtype, tuple(qp.scale.shape)
(torch.int8, (16, 2))
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from lowbit.codecs import EPS, QParams, codec_for
from lowbit.formats import Format
from lowbit.granularity import Granularity, block_dims, block_shape, expand_params, from_blocks, to_blocks
from lowbit.primitives import quantize

# The smallest clip factor: a block keeps at least this share of its range (2-bit MSE clipping
# chooses ~0.6; below 0.3 nothing useful is left of a block's outliers).
CLIP_MIN = 0.3
DEFAULT_STEPS = 200  # the paper's default iterations per block


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """Rounding whose gradient is the identity (straight-through)."""
    return x + (torch.round(x) - x).detach()


class RoundingWeight:
    """One weight matrix ``[out, in]`` under tuning: its rounding offsets and clip factors.

    ``fake()`` is the differentiable dequantized weight; ``result()`` the codes and parameters
    the format stores (chosen by the format's own codec from the learned clipped range, so the
    stored scales are exactly what every other lowbit path would store for that range).
    """

    def __init__(
        self,
        w: torch.Tensor,
        fmt: Format,
        granularity: Granularity,
        symmetric: bool,
        start: QParams | None = None,
    ) -> None:
        if fmt.family != "int":
            raise ValueError(f"AutoRound needs an integer format (int2..int8, uint2..uint8), got {fmt.name}")
        self.w, self.fmt, self.symmetric = w.detach().float(), fmt, symmetric
        self.block = block_shape(granularity, tuple(self.w.shape))
        wb = to_blocks(self.w, self.block)
        if start is None:
            dims = block_dims(self.w.dim())
            self.low = wb.amin(dim=dims).clamp(max=0)  # ranges include zero, as the codec's do
            self.high = wb.amax(dim=dims).clamp(min=0)
        else:
            self.low, self.high = _range_of(start, fmt, symmetric)
        self.v = torch.zeros_like(wb)
        self.low_factor = torch.ones_like(self.low)
        self.high_factor = torch.ones_like(self.high)

    def tensors(self) -> list[torch.Tensor]:
        """What the tuning changes (offsets, then the clip factors)."""
        return (
            [self.v, self.low_factor, self.high_factor] if not self.symmetric else [self.v, self.high_factor]
        )

    def clamp_(self) -> None:
        self.v.clamp_(-0.5, 0.5)
        self.low_factor.clamp_(CLIP_MIN, 1.0)
        self.high_factor.clamp_(CLIP_MIN, 1.0)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.symmetric:  # one factor: a symmetric grid's range is its largest magnitude
            return self.low * self.high_factor, self.high * self.high_factor
        return self.low * self.low_factor, self.high * self.high_factor

    def fake(self) -> torch.Tensor:
        """The dequantized weight for the current offsets and factors (gradients reach them)."""
        fmt, nd = self.fmt, self.w.dim()
        low, high = self._range()
        wb = to_blocks(self.w, self.block)
        if self.symmetric:
            if fmt.scale_rule == "signed_absmax":
                extreme = torch.where(high >= -low, high, low)
                scale = extreme / fmt.qmin
                scale = torch.where(scale.abs() < EPS, torch.full_like(scale, EPS), scale)
            else:
                top = fmt.qmax if fmt.qmax > 0 else -fmt.qmin
                scale = torch.clamp(torch.maximum(-low, high) / top, min=EPS)
            s = expand_params(scale, nd)
            q = torch.clamp(_round_ste(wb / s + self.v), fmt.qmin, fmt.qmax)
            return from_blocks(q * s, tuple(self.w.shape))
        scale = torch.clamp((high - low) / float(fmt.qmax - fmt.qmin), min=EPS)
        zero = torch.clamp(fmt.qmin - _round_ste(low / scale), fmt.qmin, fmt.qmax)
        s, z = expand_params(scale, nd), expand_params(zero, nd)
        q = torch.clamp(_round_ste(wb / s + self.v) + z, fmt.qmin, fmt.qmax)
        return from_blocks((q - z) * s, tuple(self.w.shape))

    def result(self) -> tuple[torch.Tensor, QParams]:
        """Codes and parameters as the format stores them."""
        with torch.no_grad():
            low, high = self._range()
            qp = codec_for(self.fmt).from_range(low, high, self.fmt, self.block, self.symmetric)
            shift = from_blocks(self.v * expand_params(qp.scale, self.w.dim()), tuple(self.w.shape))
            return quantize(self.w + shift, self.fmt, qp), qp


def _range_of(qp: QParams, fmt: Format, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A block range whose parameters (``codec.from_range``) are ``qp``'s, up to float rounding:
    how AutoRound starts from another algorithm's scales (GPTQ's, chosen on updated weights)."""
    scale = qp.scale.float()
    if symmetric:
        if fmt.scale_rule == "signed_absmax":  # the extreme lands on qmin: keep its sign
            extreme = scale * fmt.qmin
            return extreme.clamp(max=0), extreme.clamp(min=0)
        top = fmt.qmax if fmt.qmax > 0 else -fmt.qmin
        amax = scale.abs() * top
        return -amax, amax
    assert qp.zero_point is not None
    zero = qp.zero_point.float()
    return (fmt.qmin - zero) * scale, (fmt.qmax - zero) * scale


def tune(
    weights: dict[str, RoundingWeight],
    loss: Callable[[dict[str, torch.Tensor], int], torch.Tensor],
    batches: int,
    steps: int = DEFAULT_STEPS,
    lr: float | None = None,
    seed: int = 0,
    deadline: float | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """Tune every weight's offsets and clip factors together; keep the best step's (in place).

    ``loss(fake_weights, batch_index)`` runs the block with ``fake_weights`` (by the same keys as
    ``weights``) on calibration batch ``batch_index`` and returns the scalar error against the
    float block. Each step takes one batch, in a seeded order that visits every batch once before
    any twice. ``lr`` defaults to ``1 / steps`` (the paper's). ``deadline`` (a
    ``time.perf_counter()`` value) stops early, keeping the best so far. Returns the loss at the
    start (round to nearest, on the first batch), the best loss and the steps run.
    """
    if batches < 1:
        raise ValueError("AutoRound needs at least one calibration batch")
    lr = 1.0 / steps if lr is None else lr
    params = [t for r in weights.values() for t in r.tensors()]
    best = [t.clone() for t in params]
    best_loss, start_loss, ran = float("inf"), float("nan"), 0
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    with torch.enable_grad():
        for step in range(steps):
            if deadline is not None and step > 0 and time.perf_counter() > deadline:
                break
            if not order:
                order = torch.randperm(batches, generator=generator).tolist()
            for t in params:
                t.requires_grad_(True)
            value = loss({k: r.fake() for k, r in weights.items()}, order.pop())
            current = float(value.detach())
            if step == 0:
                start_loss = current
            if current < best_loss:
                best_loss = current
                for kept, t in zip(best, params, strict=True):
                    kept.copy_(t.detach())
            grads = torch.autograd.grad(value, params, allow_unused=True)
            with torch.no_grad():
                rate = lr * (1.0 - step / steps)
                for t, g in zip(params, grads, strict=True):
                    t.requires_grad_(False)
                    if g is not None:
                        t.sub_(rate * torch.sign(g))
                for r in weights.values():
                    r.clamp_()
            ran += 1
            if on_step is not None:
                on_step(step, current)
    with torch.no_grad():
        for kept, t in zip(best, params, strict=True):
            t.copy_(kept)
    return {"start_loss": start_loss, "best_loss": best_loss, "steps": float(ran)}
