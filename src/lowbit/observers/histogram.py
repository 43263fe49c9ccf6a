"""An exact, mergeable histogram of everything observed, and the percentile range built on it.

The histogram covers ``[-R, R)`` with ``R`` a power of two, in ``bins`` equal bins (``bins`` a power
of two too). A value's bin is ``floor(x * bins / (2R)) + bins / 2``; multiplying by a power of two is
exact in floating point, so binning has no rounding. When a batch needs a larger ``R`` the range
doubles and adjacent pairs of bins add up: because the bin edges of the coarser histogram are a
subset of the finer one's, this gives exactly the counts that binning every value at the larger
``R`` would have given. Hence merging two histograms (bring both to the larger ``R``, add counts)
equals feeding one observer both streams, in any order, count for count.

>>> import torch
>>> obs = HistogramObserver(bins=8)
>>> obs.observe(torch.tensor([-0.5, 0.25, 0.75]))
>>> obs.radius, obs.counts.tolist()
(1.0, [0, 0, 1, 0, 0, 1, 0, 1])
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.formats import Format
from lowbit.observers.base import Observer

# R never goes below 2**MIN_EXPONENT: all-zero data still gets a (tiny) finite histogram.
MIN_EXPONENT = -64
MAX_BINS = 1 << 20


def radius_exponent(absmax: float) -> int:
    """Smallest ``e`` with ``|x| < 2**e`` for every observed ``|x| <= absmax`` (floored).

    >>> radius_exponent(1.0), radius_exponent(0.75), radius_exponent(0.0)
    (1, 0, -64)
    """
    if absmax == 0.0:
        return MIN_EXPONENT
    _, exponent = torch.frexp(torch.tensor(absmax, dtype=torch.float64))  # absmax = m * 2**e, 0.5 <= m < 1
    return max(int(exponent), MIN_EXPONENT)


def coarsen(counts: torch.Tensor, times: int) -> torch.Tensor:
    """Double the histogram's radius ``times`` times: bins ``2j, 2j+1`` become bin ``j + bins/4``.

    >>> coarsen(torch.tensor([1, 2, 3, 4, 5, 6, 7, 8]), 1).tolist()
    [0, 0, 3, 7, 11, 15, 0, 0]
    """
    bins = counts.numel()
    # After log2(bins) doublings every value sits in one of the two centre bins; more change nothing.
    for _ in range(min(times, bins.bit_length())):
        pairs = counts.reshape(bins // 2, 2).sum(dim=1)
        counts = torch.zeros_like(counts)
        counts[bins // 4 : bins // 4 + bins // 2] = pairs
    return counts


class HistogramObserver(Observer):
    """Histogram of all observed values (per tensor), plus their exact min and max.

    Accumulates ``counts`` (int64, ``bins`` entries), the radius exponent (``R = 2**exponent``),
    ``min_val`` and ``max_val``: constant memory. Merging is exact (see the module docstring).
    The range it reports is the full observed ``[min, max]``; subclasses pick narrower ranges.

    >>> import torch, lowbit.formats as F
    >>> a, b = HistogramObserver(), HistogramObserver()
    >>> a.observe(torch.randn(1000)); b.observe(100 * torch.randn(1000))
    >>> both = a.merge(b)
    >>> int(both.counts.sum()), both.qparams(F.get("int8")).scale.shape
    (2000, torch.Size([1]))
    """

    name = "histogram"

    def __init__(self, bins: int = 2048) -> None:
        if bins < 4 or bins > MAX_BINS or bins & (bins - 1):
            raise ValueError(
                f"bins must be a power of two between 4 and {MAX_BINS} (so rebinning is exact), got {bins}"
            )
        super().__init__()
        self.bins = bins
        self.exponent = MIN_EXPONENT
        self.counts = torch.zeros(bins, dtype=torch.int64)
        self.min_val = torch.zeros(())
        self.max_val = torch.zeros(())

    def config(self) -> dict[str, Any]:
        return {"bins": self.bins}

    @property
    def radius(self) -> float:
        """``R``: the histogram covers ``[-R, R)``."""
        return 2.0**self.exponent

    @property
    def bin_width(self) -> float:
        """Width of one bin, ``2R / bins`` (a power of two)."""
        return 2.0 ** (self.exponent + 1) / self.bins

    def edge(self, index: int) -> float:
        """Left edge of bin ``index`` (``edge(bins)`` is ``R``)."""
        return (index - self.bins // 2) * self.bin_width

    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x)
        exponent = radius_exponent(max(-float(lo), float(hi)))
        if self.count == 0:
            self.counts = self.counts.to(x.device)
            self.min_val, self.max_val = lo, hi
            self.exponent = exponent
        else:
            self.min_val = torch.minimum(self.min_val, lo)
            self.max_val = torch.maximum(self.max_val, hi)
        self._grow_to(max(exponent, self.exponent))
        self.counts += torch.bincount(self._bin_index(x.reshape(-1)), minlength=self.bins)
        if self.block is None:
            self.block = tuple(x.shape)

    def _grow_to(self, exponent: int) -> None:
        if exponent > self.exponent:
            self.counts = coarsen(self.counts, exponent - self.exponent)
            self.exponent = exponent

    def _bin_index(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``floor(x * bins / 2R) + bins/2`` for ``|x| < R``."""
        scaled = x * 2.0 ** (self.bins.bit_length() - 2 - self.exponent)  # bins / 2R, a power of two
        index = torch.floor(scaled)
        # A tiny negative value can underflow to -0.0 when scaled; its true floor is -1.
        index = torch.where(x < 0, torch.clamp(index, max=-1.0), index)
        return index.long() + self.bins // 2

    def _absorb(self, other: HistogramObserver) -> None:  # type: ignore[override]
        device = self.counts.device
        other_counts = other.counts.to(device)
        if other.exponent > self.exponent:
            self._grow_to(other.exponent)
        else:
            other_counts = coarsen(other_counts, self.exponent - other.exponent)
        self.counts = self.counts + other_counts
        self.min_val = torch.minimum(self.min_val, other.min_val.to(device))
        self.max_val = torch.maximum(self.max_val, other.max_val.to(device))

    def _range(self, fmt: Format, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return self._as_range(float(self.min_val), float(self.max_val))

    def _as_range(self, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``lo``, ``hi`` clamped to the observed values, as float32 tensors shaped like the scale."""
        lo = min(max(lo, float(self.min_val)), float(self.max_val))
        hi = max(min(hi, float(self.max_val)), float(self.min_val))
        shape = (1,) * len(self.block or ())
        device = self.counts.device
        return (
            torch.tensor(lo, dtype=torch.float32, device=device).reshape(shape),
            torch.tensor(hi, dtype=torch.float32, device=device).reshape(shape),
        )


class PercentileObserver(HistogramObserver):
    """Range from the ``100 - percentile`` to the ``percentile`` point of the histogram.

    Both ends are bin edges, chosen so that at most ``(100 - percentile)%`` of the values fall
    outside each end; the rest of the outliers get clipped. Accumulates and merges like
    ``HistogramObserver``.

    >>> import torch, lowbit.formats as F
    >>> obs = PercentileObserver(percentile=99.0)
    >>> obs.observe(torch.cat([torch.linspace(-1, 1, 1000), torch.tensor([50.0])]))
    >>> float(obs.qparams(F.get("int8")).scale) < 50.0 / 127
    True
    """

    name = "percentile"

    def __init__(self, percentile: float = 99.99, bins: int = 2048) -> None:
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        super().__init__(bins)
        self.percentile = percentile

    def config(self) -> dict[str, Any]:
        return {"percentile": self.percentile, "bins": self.bins}

    def _range(self, fmt: Format, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        cumulative = torch.cumsum(self.counts.cpu(), dim=0).double()
        total = float(cumulative[-1])
        outside = (100.0 - self.percentile) / 100.0 * total
        # First bin whose cumulative count passes the lower tail: its left edge is the lower end.
        low_bin = int(
            torch.searchsorted(cumulative, torch.tensor([outside], dtype=torch.float64), right=True)
        )
        # First bin that reaches all but the upper tail: its right edge is the upper end.
        high_bin = int(torch.searchsorted(cumulative, torch.tensor([total - outside], dtype=torch.float64)))
        return self._as_range(self.edge(low_bin), self.edge(high_bin + 1))
