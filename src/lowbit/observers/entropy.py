"""Entropy calibration (TensorRT style): the clipping threshold whose quantized histogram loses
the least information, measured by the KL divergence.

For every candidate threshold ``i`` (in bins of ``|x|``): ``P`` is the histogram up to ``i`` with
the clipped outliers added to its last bin; ``Q`` is the same bins merged into as many buckets as
the format has levels on one side of zero, each bucket's count spread evenly over its non-empty
bins (empty bins stay empty). The threshold minimising ``KL(P || Q)`` wins.

>>> import torch, lowbit.formats as F
>>> obs = EntropyObserver()
>>> obs.observe(torch.cat([torch.randn(10_000), torch.tensor([60.0])]))
>>> float(obs.qparams(F.get("int8")).scale) < 60.0 / 127
True
"""

from __future__ import annotations

import torch

from lowbit.formats import Format
from lowbit.observers.histogram import HistogramObserver

# Mass given to bins where P has values but Q has none, so the divergence stays finite.
SMOOTHING = 1e-4


class EntropyObserver(HistogramObserver):
    """Symmetric threshold ``t`` minimising ``KL(P || Q)``; range ``[-t, t]`` clamped to the data.

    Levels per side: ``2**bits`` when the data never goes below zero and the format can spend all
    its codes on ``[0, t]`` (unsigned, or asymmetric), else ``2**(bits - 1)`` (128 for int8).
    Integer formats only: the buckets model evenly spaced levels. Accumulates and merges like
    ``HistogramObserver``.

    >>> import torch, lowbit.formats as F
    >>> obs = EntropyObserver(bins=512)
    >>> obs.observe(torch.rand(1000))  # never below zero: uint8 spends all 256 levels on [0, t]
    >>> qp = obs.qparams(F.get("uint8"), symmetric=False)
    >>> qp.zero_point.tolist(), float(qp.scale) * 255 <= 1.0
    ([0], True)
    """

    name = "entropy"

    def _range(self, fmt: Format, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if fmt.family != "int":
            raise ValueError(
                f"entropy calibration assumes evenly spaced integer levels; for {fmt.name} use the "
                "'mse' or 'percentile' observer"
            )
        non_negative = float(self.min_val) >= 0.0
        spends_all_codes = not fmt.signed or not symmetric
        levels = fmt.levels if non_negative and spends_all_codes else fmt.levels // 2
        half = self.bins // 2
        # Fold the signed histogram onto |x|: bin j of either sign covers magnitudes [j, j+1) * width.
        counts = self.counts.cpu().double()
        magnitude = counts[half:] + counts[:half].flip(0)
        threshold = best_threshold(magnitude, levels) * self.bin_width
        return self._as_range(-threshold, threshold)


def best_threshold(hist: torch.Tensor, levels: int) -> int:
    """Number of leading bins of the magnitude histogram ``hist`` to keep (TensorRT's search).

    >>> best_threshold(torch.tensor([5.0, 3.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]), 2)
    2
    """
    bins = hist.numel()
    last = int(torch.nonzero(hist).max()) + 1 if bool(hist.any()) else 1
    # Thresholds past the last non-empty bin cover no more data, they only coarsen the buckets: skip.
    first_candidate = min(levels, last)
    outliers = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])  # outliers[i] = hist[i:].sum()
    best, best_divergence = last, float("inf")
    for i in range(first_candidate, min(last, bins) + 1):
        p = hist[:i].clone()
        if i < bins:
            p[i - 1] += outliers[i]
        divergence = float(kl_divergence(p, quantized_histogram(hist[:i], p > 0, levels)))
        if divergence < best_divergence:
            best, best_divergence = i, divergence
    return best


def quantized_histogram(hist: torch.Tensor, support: torch.Tensor, levels: int) -> torch.Tensor:
    """Merge ``hist`` into ``levels`` buckets of adjacent bins, then spread each bucket's count
    evenly over the bins of ``support`` inside it (bins outside ``support`` get zero).

    >>> quantized_histogram(torch.tensor([4.0, 0.0, 2.0, 2.0]), torch.tensor([1, 0, 1, 1]) > 0, 2).tolist()
    [4.0, 0.0, 2.0, 2.0]
    """
    bins = hist.numel()
    bucket = torch.arange(bins) * min(levels, bins) // bins
    totals = torch.zeros(levels, dtype=hist.dtype).index_add_(0, bucket, hist)
    filled = torch.zeros(levels, dtype=hist.dtype).index_add_(0, bucket, support.to(hist.dtype))
    spread = totals[bucket] / filled[bucket].clamp(min=1)
    return torch.where(support, spread, torch.zeros_like(spread))


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``KL(P || Q)`` of two unnormalised histograms; ``Q`` is smoothed over ``P``'s support so a bin
    where only ``P`` has mass costs a large but finite amount.

    >>> float(kl_divergence(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0])))
    0.0
    """
    support = p > 0
    p = p[support] / p.sum()
    q = q[support]
    q_sum = q.sum()
    q = q / q_sum if q_sum > 0 else torch.zeros_like(q)
    q = (1.0 - SMOOTHING) * q + SMOOTHING / p.numel()
    return (p * torch.log(p / q)).sum()
