"""Fake-quantizers used during quantization-aware training: one for weights, one for activations.

Both compute their forward value with ``lowbit.primitives.quantize`` / ``dequantize`` and the same
``QParams`` that ``lowbit.qat.convert`` later packs, so a converted model reproduces the QAT model's
eval-mode output bit for bit. Only the gradient path differs between the two training modes:

- **STE** (default): weight scales follow the weights (recomputed every step with the recipe's
  ``rtn`` / ``mse`` rule); activation ranges are an exponential moving average of per-batch ranges,
  starting from the PTQ calibration range (``lowbit.qat.calibrate``).
  Integer formats use the clipped straight-through estimator (no gradient where a value saturated);
  grid formats (binary, ternary, ...) pass the gradient through unchanged, as BinaryConnect / TWN do.
- **LSQ** (Esser et al., "Learned Step Size Quantization", 2020): the scale is a parameter, one
  per block (per output channel for ``channel`` weights, one per tensor for activations), trained by
  backprop with LSQ's gradient scale ``1 / sqrt(block_numel * qmax)``. Integer formats only.
  Initialised as PTQ would choose them (weights: the recipe's rule; activations: ``calibrate``).

>>> import torch
>>> from lowbit.recipes import WeightSpec
>>> fq = WeightFakeQuant(WeightSpec(format="int4"), torch.randn(8, 16), lsq=True)
>>> w = torch.randn(8, 16, requires_grad=True)
>>> fq(w).sum().backward()
>>> fq.scale.grad.shape, w.grad.shape
(torch.Size([8, 1]), torch.Size([8, 16]))
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit import formats, observers
from lowbit import granularity as gran
from lowbit.algorithms.rtn import choose_weight_qparams
from lowbit.codecs import codec_for
from lowbit.codecs.scales import round_scale
from lowbit.granularity import expand_params, from_blocks, to_blocks
from lowbit.primitives import EPS, QParams, dequantize, fake_quantize, qparams_from_range, quantize
from lowbit.recipes.spec import ActivationSpec, WeightSpec

# EMA weight of the newest batch for activation ranges: fine-tunes here are a few hundred steps,
# so PyTorch's 0.01 would still be dominated by the first batches when training ends.
DEFAULT_MOMENTUM = 0.05
# Latent-weight clipping bound, in multiples of the row's mean |w| (about 2.4 standard deviations
# of a Gaussian row: only outliers are clipped). 3 measured best of the few tried on digits.
LATENT_CLIP = 3.0


def _lsq_value(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, fmt: formats.Format, block: tuple
) -> torch.Tensor:
    """LSQ's differentiable quantize-dequantize: gradients reach ``x`` (inside the range) and ``scale``."""
    nd = x.dim()
    xb = to_blocks(x, block)
    per_block = math.prod(block) if block else 1
    g = 1.0 / math.sqrt(max(per_block, 1) * max(fmt.qmax, 1))
    s = scale * g + (scale - scale * g).detach()  # value = scale, gradient scaled by g (LSQ eq. 4)
    s = expand_params(s.clamp(min=EPS), nd)
    q = xb / s
    if zero_point is not None:
        q = q + expand_params(zero_point.float(), nd)
    q = q.clamp(fmt.qmin, fmt.qmax)
    q = q + (torch.round(q) - q).detach()
    if zero_point is not None:
        q = q - expand_params(zero_point.float(), nd)
    return from_blocks(q * s, tuple(x.shape))


def _exact_forward(x: torch.Tensor, fmt: formats.Format, qp: QParams) -> torch.Tensor:
    """The value the packed model will compute: the primitives themselves, no autograd."""
    with torch.no_grad():
        return dequantize(quantize(x.detach(), fmt, qp), fmt, qp, dtype=x.dtype)


class WeightFakeQuant(nn.Module):
    """Fake-quantizes one weight matrix (``[out, in]``; conv kernels flattened per output channel).

    ``weight`` is the float weight at preparation time: it fixes the block layout and, with
    ``lsq=True``, initialises the learned scales from the recipe's rule (``mse`` searches the clip).
    """

    def __init__(self, spec: WeightSpec, weight: torch.Tensor, lsq: bool = False, name: str = "") -> None:
        super().__init__()
        if spec.algorithm not in ("rtn", "mse"):
            raise ValueError(
                f"layer {name or '?'}: weight algorithm {spec.algorithm!r} is post-training only; "
                "QAT recipes use 'rtn' or 'mse' (QAT itself then learns the weights)"
            )
        self.spec = spec
        self.name = name
        self.fmt = formats.get(spec.format)
        if not codec_for(self.fmt).takes_range:  # QAT learns / tracks a range per block
            raise ValueError(
                f"layer {name or '?'}: QAT supports integer and grid formats (int4, ternary, fp8...), "
                f"not {spec.format!r}; quantize codebook / float formats after training instead"
            )
        self.granularity = gran.parse(spec.granularity)
        self.lsq = bool(lsq) and self.fmt.family == "int"  # grid formats keep their own scale rule
        qp = self._choose(weight.detach())
        self.block = qp.block
        # Latent-weight clipping (BinaryConnect / BNN), set by ``prepare(clip_latent=...)``.
        self.clip_latent = False
        if self.lsq:
            self.scale = nn.Parameter(qp.scale.clone())
            if qp.zero_point is not None:
                self.register_buffer("zero_point", qp.zero_point.clone())

    def _choose(self, w: torch.Tensor) -> QParams:
        return choose_weight_qparams(w, self.fmt, self.granularity, self.spec.symmetric, self.spec.algorithm)

    def qparams(self, weight: torch.Tensor) -> QParams:
        """The parameters the current forward uses (and ``convert`` packs) for ``weight``."""
        if not self.lsq:
            return self._choose(weight.detach())
        zp = getattr(self, "zero_point", None)
        # Rounded as the format stores scales (int4@fp16: fp16), so convert packs what is stored.
        return QParams(round_scale(self.scale.detach().clamp(min=EPS), self.fmt), zp, self.block)

    @torch.no_grad()
    def _clip(self, weight: torch.Tensor) -> None:
        # In place on the float weight (the parameter or a view of it), before it is used. A latent
        # weight far out needs as many steps back before its code can flip, and inflates its row's
        # mean |w| scale. A bound relative to the row (not BinaryConnect's absolute [-1, 1]) suits
        # pretrained and freshly initialised weights alike; a bound fixed at prepare time cost
        # 2-5 points from scratch on digits.
        if weight.dim() == 0 or weight.numel() == 0:
            return
        rows = weight.reshape(weight.shape[0], -1)
        bound = (LATENT_CLIP * rows.abs().mean(dim=1)).reshape(-1, *([1] * (weight.dim() - 1)))
        weight.copy_(torch.maximum(torch.minimum(weight, bound), -bound))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.clip_latent and self.training:
            self._clip(weight)
        qp = self.qparams(weight)
        if self.lsq:
            value = _exact_forward(weight, self.fmt, qp)
            soft = _lsq_value(weight, self.scale, getattr(self, "zero_point", None), self.fmt, self.block)
            return value + (soft - soft.detach())
        if self.fmt.family == "int":
            return fake_quantize(weight, self.fmt, qp)
        # Straight-through, written so the value is the exact code value: ``w + (q - w).detach()``
        # rounds twice and missed it by an ulp (seen on BERT's binary projections), while
        # ``w - w.detach()`` is exactly zero.
        return _exact_forward(weight, self.fmt, qp) + (weight - weight.detach())

    def extra_repr(self) -> str:
        mode = "lsq" if self.lsq else "ste"
        return f"{self.fmt.name}, {self.granularity}, {mode}" + (", clipped" if self.clip_latent else "")


class ActFakeQuant(nn.Module):
    """Fake-quantizes a layer's input as an ``ActivationSpec`` says (static or dynamic).

    ``lowbit.qat.calibrate`` initialises static ranges exactly as PTQ calibration does (the spec's
    observer over all calibration batches; ``begin_calibration`` / ``end_calibration``). Training
    then updates them: STE: an EMA of each batch's range (``observer="minmax"``: min / max; any other
    observer: the MSE-optimal clipped range of the batch); ``lsq=True``: a learned scale (the zero
    point stays fixed). Without calibration the first training batch initialises the range.
    In eval mode the range is frozen; using a static quantizer that never saw data raises.
    """

    def __init__(
        self, spec: ActivationSpec, lsq: bool = False, name: str = "", momentum: float = DEFAULT_MOMENTUM
    ) -> None:
        super().__init__()
        if not spec.enabled:
            raise ValueError("ActFakeQuant needs an activation spec with mode 'dynamic' or 'static'")
        self.spec = spec
        self.name = name
        self.fmt = formats.get(spec.format)
        self.granularity = gran.parse(spec.granularity)
        self.momentum = momentum
        self.lsq = bool(lsq) and spec.mode == "static" and self.fmt.family == "int"
        self.observe = True  # set False to freeze the EMA range while training continues
        self.observer: observers.Observer | None = None  # set while lowbit.qat.calibrate runs
        self.register_buffer("min_val", torch.zeros(()))
        self.register_buffer("max_val", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        if self.lsq:
            self.scale = nn.Parameter(torch.ones(()))
            self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().float()
        if self.spec.observer == "minmax":
            return x.min(), x.max()
        qp = choose_weight_qparams(x.reshape(-1), self.fmt, gran.PerTensor(), self.spec.symmetric, "mse")
        return self._covered_range(qp.scale, qp.zero_point)

    def _covered_range(
        self, scale: torch.Tensor, zero_point: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(min, max)`` that a per-tensor ``(scale, zero_point)`` of this format represents."""
        scale = scale.float().reshape(())
        if zero_point is None:
            top = self.fmt.qmax if self.fmt.qmax > 0 else -self.fmt.qmin
            return -scale * top if self.fmt.signed else torch.zeros(()), scale * top
        zp = zero_point.float().reshape(())
        return (self.fmt.qmin - zp) * scale, (self.fmt.qmax - zp) * scale

    @torch.no_grad()
    def set_range(self, scale: torch.Tensor, zero_point: torch.Tensor | None) -> None:
        """Start from a given static ``(scale, zero_point)`` (as PTQ calibration chooses them): the
        EMA range becomes the range they cover, and LSQ's learned scale / zero point take them."""
        scale = scale.float().reshape(())
        lo, hi = self._covered_range(scale, zero_point)
        self.min_val.copy_(lo)
        self.max_val.copy_(hi)
        self.initialized.fill_(True)
        if self.lsq:
            self.scale.copy_(scale)
            if zero_point is not None:
                self.zero_point.copy_(zero_point.reshape(()).to(self.zero_point))

    def begin_calibration(self) -> None:
        """Observe inputs with the spec's PTQ observer (``lowbit.observers``) until ``end_calibration``;
        meanwhile inputs pass through unquantized, exactly as in ``lowbit.quantize``'s calibration."""
        if self.spec.mode == "static":
            self.observer = observers.get(self.spec.observer)

    def end_calibration(self) -> None:
        """Take the observer's range (``set_range``): the same range ``lowbit.quantize`` would freeze."""
        observer, self.observer = self.observer, None
        if observer is None or observer.count == 0:
            return
        qp = observer.qparams(self.fmt, self.spec.symmetric)
        self.set_range(qp.scale.reshape(()), None if qp.zero_point is None else qp.zero_point.reshape(()))

    @torch.no_grad()
    def _update(self, x: torch.Tensor) -> None:
        lo, hi = self._batch_range(x)
        if not bool(self.initialized):
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
            self.initialized.fill_(True)
            if self.lsq:
                qp = self.range_qparams()
                self.scale.copy_(qp.scale.reshape(()))
                if qp.zero_point is not None:
                    self.zero_point.copy_(qp.zero_point.reshape(()))
            return
        self.min_val.lerp_(lo.to(self.min_val), self.momentum)
        self.max_val.lerp_(hi.to(self.max_val), self.momentum)

    def range_qparams(self) -> QParams:
        """Scalar scale / zero point from the EMA range (what STE mode uses)."""
        return qparams_from_range(self.min_val, self.max_val, self.fmt, (1,), self.spec.symmetric)

    def frozen(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The static ``(scale, zero_point)`` as 0-d tensors, for ``ActivationQuantizer.set_qparams``."""
        if self.spec.mode != "static":
            raise ValueError(f"layer {self.name or '?'}: only static activations have a frozen range")
        if not bool(self.initialized):
            raise ValueError(
                f"layer {self.name or '?'}: its activation range was never observed; train (or run "
                "lowbit.qat.calibrate on) at least one batch that reaches this layer before converting"
            )
        if self.lsq:
            zp = self.zero_point if not self.spec.symmetric else None
            return self.scale.detach().clamp(min=EPS).reshape(()), zp
        qp = self.range_qparams()
        zp = None if qp.zero_point is None else qp.zero_point.reshape(())
        return qp.scale.reshape(()), zp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.mode == "dynamic":
            qp = choose_qparams_dynamic(x, self.fmt, self.granularity, self.spec.symmetric)
            return fake_quantize(x, self.fmt, qp)
        if self.observer is not None:
            self.observer.observe(x)
            return x
        if self.training and self.observe and not (self.lsq and bool(self.initialized)):
            self._update(x)
        scale, zp = self.frozen()
        ones = (1,) * x.dim()
        # Laid out exactly as ActivationQuantizer.frozen_qparams does, so convert is bit-identical.
        qp = QParams(scale.reshape(ones), None if zp is None else zp.reshape(ones), tuple(x.shape) or (1,))
        if self.lsq:
            value = _exact_forward(x, self.fmt, qp)
            soft = _lsq_value(x, self.scale.reshape(ones), qp.zero_point, self.fmt, qp.block)
            return value + (soft - soft.detach())
        return fake_quantize(x, self.fmt, qp)

    def extra_repr(self) -> str:
        mode = "lsq" if self.lsq else "ema"
        return f"{self.spec.mode} {self.fmt.name}, {mode}"


def choose_qparams_dynamic(
    x: torch.Tensor, fmt: formats.Format, granularity: gran.Granularity, symmetric: bool
) -> QParams:
    """Per-call parameters, as ``lowbit.nn.ActivationQuantizer`` chooses them in dynamic mode."""
    from lowbit.primitives import choose_qparams

    return choose_qparams(x.detach(), fmt, granularity, symmetric)
