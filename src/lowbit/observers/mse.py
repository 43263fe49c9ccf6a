"""MSE-optimal clipping: the range whose quantization error over the histogram is smallest.

Clipping the observed range to a fraction of itself clips the few largest values but gives every
other value a finer step. The best fraction depends on the format, so it is searched when
``qparams`` is called: every candidate is scored by the expected squared error of quantizing the
histogram's contents, all candidates at once.

>>> import torch, lowbit.formats as F
>>> obs = MSEObserver()
>>> obs.observe(torch.cat([torch.randn(10_000), torch.tensor([40.0])]))
>>> float(obs.qparams(F.get("int4")).scale) < 40.0 / 7
True
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.formats import Format
from lowbit.observers.histogram import HistogramObserver
from lowbit.primitives import QParams, dequantize, qparams_from_range, quantize

# Each non-empty bin is represented by this many evenly spaced points (its mass split equally):
# bins are often wider than an 8-bit step, and a single centre point would misjudge rounding error.
POINTS_PER_BIN = 8


class MSEObserver(HistogramObserver):
    """Range ``[r * min, r * max]`` with the clip ratio ``r`` minimising the expected squared error.

    ``candidates`` ratios are spaced geometrically from 1 down to ``min_ratio`` (heavy-tailed data
    at 4 bits wants ratios well below 0.1). Accumulates and merges like ``HistogramObserver``; the
    search runs in ``qparams`` because the best ratio depends on the format and symmetry.

    >>> import torch, lowbit.formats as F
    >>> obs = MSEObserver(candidates=20)
    >>> obs.observe(torch.linspace(-1, 1, 1001))  # no outliers: clipping anything only adds error
    >>> round(float(obs.qparams(F.get("int8")).scale) * 127, 6)
    1.0
    """

    name = "mse"

    def __init__(self, bins: int = 2048, candidates: int = 100, min_ratio: float = 0.01) -> None:
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        if not 0.0 < min_ratio <= 1.0:
            raise ValueError(f"min_ratio must be in (0, 1], got {min_ratio}")
        super().__init__(bins)
        self.candidates = candidates
        self.min_ratio = min_ratio

    def config(self) -> dict[str, Any]:
        return {"bins": self.bins, "candidates": self.candidates, "min_ratio": self.min_ratio}

    def clip_ratios(self) -> torch.Tensor:
        """The candidate ratios, from 1.0 down to ``min_ratio`` (float32, on the state's device)."""
        steps = torch.arange(self.candidates, dtype=torch.float64) / max(self.candidates - 1, 1)
        return (self.min_ratio**steps).float().to(self.counts.device)

    def _range(self, fmt: Format, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        points, weights = self._sample_points()
        ratios = self.clip_ratios()[:, None]
        lo, hi = self._as_range(float(self.min_val), float(self.max_val))
        lo_c, hi_c = lo.reshape(1, 1) * ratios, hi.reshape(1, 1) * ratios
        # One "block" per candidate: row k of the grid is quantized with candidate k's parameters.
        grid = points.expand(ratios.shape[0], -1).contiguous()
        qp = qparams_from_range(lo_c, hi_c, fmt, (1, grid.shape[1]), symmetric)
        error = _weighted_sq_error(grid, fmt, qp, weights)
        best = int(torch.argmin(error))  # first minimum: ties prefer the wider range
        shape = lo.shape
        return lo_c[best].reshape(shape), hi_c[best].reshape(shape)

    def _sample_points(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``POINTS_PER_BIN`` points inside every non-empty bin, and each point's share of the count."""
        filled = torch.nonzero(self.counts).reshape(-1)
        offsets = (torch.arange(POINTS_PER_BIN, device=filled.device) + 0.5) / POINTS_PER_BIN
        position = (filled[:, None] - self.bins // 2).double() + offsets.double()[None, :]
        points = (position * self.bin_width).clamp(float(self.min_val), float(self.max_val))
        weights = (self.counts[filled].double() / POINTS_PER_BIN)[:, None].expand_as(points)
        return points.reshape(-1).float(), weights.reshape(-1)


def _weighted_sq_error(grid: torch.Tensor, fmt: Format, qp: QParams, weights: torch.Tensor) -> torch.Tensor:
    """Per row of ``grid``: sum of ``weights * (fake_quant(value) - value)**2`` (float64)."""
    restored = dequantize(quantize(grid, fmt, qp), fmt, qp)
    return (((restored - grid).double() ** 2) * weights[None, :]).sum(dim=1)
