"""Learned 1-D grids for the codebook formats: per-row quantiles, or exact 1-D k-means (Lloyd).

In one dimension a k-means cluster is a contiguous run of the sorted values, so Lloyd's algorithm
needs no distance matrix. Each row is sorted once and its prefix sums taken; then one iteration is
a binary search of the centroid midpoints in the sorted row (the cluster boundaries) and two
lookups per cluster (its size and sum). That is O(levels * log n) per row and iteration instead of
O(n * levels), so Lloyd runs to convergence cheaply and the sort dominates the cost.

Values are assigned exactly as ``lowbit.primitives.quantize`` does (float32 midpoints, a value on a
midpoint goes to the lower centroid), so the learned grid is a fixed point of the quantizer that
will use it.

>>> import torch
>>> learn_grid(torch.tensor([[0.0, 0.5, 1.0, 1.5, 10.0, 11.0]]), levels=2).tolist()
[[0.75, 10.5]]
"""

from __future__ import annotations

import numpy as np
import torch

LEARNERS = ("kmeans", "quantile")

# Lloyd iterations are cheap here (see the module docstring); most rows converge long before this.
DEFAULT_ITERS = 300

# Rows are processed in chunks of about this many values, bounding the sorted copy and its float64
# prefix sums (~20 bytes per value). A single row is never split, so one huge row uses ~20 bytes/value.
_CHUNK_VALUES = 1 << 22


def learn_grid(
    rows: torch.Tensor, levels: int, learner: str = "kmeans", iters: int = DEFAULT_ITERS
) -> torch.Tensor:
    """A sorted grid of ``levels`` values per row of ``rows`` (``[n_blocks, block_numel]``).

    ``quantile``: the row's quantiles at ``(i + 0.5) / levels`` (linear interpolation, as
    ``torch.quantile``). ``kmeans``: 1-D k-means started from those quantiles, run until the
    assignment stops changing or ``iters`` iterations. A row with at most ``levels`` distinct values
    gets exactly those values (zero error), the largest repeated to fill the grid. Returns float32
    ``[n_blocks, levels]``, ascending along each row.

    >>> rows = torch.tensor([[3.0, 3.0, 3.0], [0.0, 1.0, 2.0]])
    >>> learn_grid(rows, levels=2).tolist()
    [[3.0, 3.0], [0.5, 2.0]]
    >>> learn_grid(torch.arange(8.0).reshape(1, 8), levels=4, learner="quantile").tolist()
    [[0.875, 2.625, 4.375, 6.125]]
    """
    if learner not in LEARNERS:
        raise ValueError(f"unknown grid learner {learner!r}; use one of {LEARNERS}")
    if levels < 1:
        raise ValueError(f"a grid needs at least 1 level, got levels={levels}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    if rows.dim() != 2:
        raise ValueError(f"rows must be 2-D [n_blocks, block_numel], got shape {tuple(rows.shape)}")
    rows = rows.detach().float()
    n_rows, n_values = rows.shape
    if n_rows == 0 or n_values == 0:
        return torch.zeros(n_rows, levels, device=rows.device)
    if not bool(torch.isfinite(rows).all()):
        raise ValueError("rows contain NaN or Inf; clean the tensor before learning a grid")
    grid = torch.empty(n_rows, levels, device=rows.device)
    step = max(1, _CHUNK_VALUES // n_values)
    for start in range(0, n_rows, step):
        ordered = sort_rows(rows[start : start + step])
        if learner == "quantile":
            grid[start : start + step] = quantiles_of_sorted(ordered, levels)
        else:
            grid[start : start + step] = _kmeans_of_sorted(ordered, levels, iters)
    return grid


def sort_rows(rows: torch.Tensor) -> torch.Tensor:
    """Each row sorted ascending (float32).

    On CPU numpy's vectorised sort is used: it is about 10x faster than ``torch.sort`` on one long
    row (a 16M-value per-tensor block sorts in ~0.2 s instead of ~3.5 s on two cores).

    >>> sort_rows(torch.tensor([[2.0, -1.0, 0.5]])).tolist()
    [[-1.0, 0.5, 2.0]]
    """
    if rows.device.type == "cpu":
        return torch.from_numpy(np.sort(rows.detach().float().numpy(), axis=1))
    return rows.float().sort(dim=1).values


def quantiles_of_sorted(ordered: torch.Tensor, levels: int) -> torch.Tensor:
    """Quantiles at ``(i + 0.5) / levels`` of each already sorted row, interpolated linearly.

    >>> quantiles_of_sorted(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), 2).tolist()
    [[0.75, 2.25]]
    """
    n_values = ordered.shape[1]
    q = (torch.arange(levels, dtype=torch.float64, device=ordered.device) + 0.5) / levels
    pos = q * (n_values - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n_values - 1)
    frac = (pos - lo).float()
    values = torch.lerp(ordered[:, lo], ordered[:, hi], frac)
    return values.sort(dim=1).values  # interpolation rounding must never break the order


def _kmeans_of_sorted(ordered: torch.Tensor, levels: int, iters: int) -> torch.Tensor:
    """1-D k-means grid of each sorted row; rows with few distinct values take those values."""
    grid = quantiles_of_sorted(ordered, levels)
    is_new = torch.ones_like(ordered, dtype=torch.bool)
    is_new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    distinct_rank = is_new.cumsum(dim=1) - 1  # index of each value among its row's distinct values
    few = distinct_rank[:, -1] < levels
    if bool(few.any()):
        few_values = ordered[few]
        exact = few_values[:, -1:].expand(-1, levels).clone()  # pad with the largest value: stays sorted
        grid[few] = exact.scatter_(1, distinct_rank[few], few_values)
    many = ~few
    if bool(many.all()):
        return _lloyd(ordered, grid, iters)
    if bool(many.any()):
        grid[many] = _lloyd(ordered[many], grid[many], iters)
    return grid


def _prefix_sums(values: torch.Tensor) -> torch.Tensor:
    """``[R, n]`` -> float64 ``[R, n + 1]`` with a leading 0: any run's sum is two lookups.

    float64 because a 16M-value float32 running sum would lose the small clusters' sums.
    """
    return torch.nn.functional.pad(torch.cumsum(values, dim=1, dtype=torch.float64), (1, 0))


def _run_totals(prefix: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Sum of each run ``[bounds[:, j], bounds[:, j + 1])`` from prefix sums."""
    return prefix.gather(1, bounds[:, 1:]) - prefix.gather(1, bounds[:, :-1])


def _cluster_bounds(ordered: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``[R, levels + 1]`` start positions of each centroid's run in the sorted rows (plus the end).

    Same float32 midpoints as ``primitives.quantize``; ``right=True`` counts the values equal to a
    midpoint into the lower cluster, which is where ``quantize`` sends them.
    """
    mid = (grid[:, 1:] + grid[:, :-1]) / 2
    inner = torch.searchsorted(ordered, mid.contiguous(), right=True)
    n_rows, n_values = ordered.shape
    first = torch.zeros(n_rows, 1, dtype=torch.long, device=ordered.device)
    return torch.cat([first, inner, torch.full_like(first, n_values)], dim=1)


def _lloyd(ordered: torch.Tensor, grid: torch.Tensor, iters: int) -> torch.Tensor:
    """Lloyd iterations on sorted rows that each have more distinct values than levels."""
    prefix = _prefix_sums(ordered)
    square_prefix: torch.Tensor | None = None  # only needed to re-seed empty clusters
    for _ in range(iters):
        bounds = _cluster_bounds(ordered, grid)
        count = bounds[:, 1:] - bounds[:, :-1]
        total = _run_totals(prefix, bounds)
        # An empty cluster keeps its centroid for now; it is re-seeded just below.
        mean = torch.where(count > 0, total / count.clamp(min=1), grid.double()).float()
        empty = count == 0
        if bool(empty.any()):
            if square_prefix is None:
                square_prefix = _prefix_sums(ordered.square())
            mean = _reseed_empty(ordered, bounds, count, total, square_prefix, mean, empty)
        new_grid = mean.sort(dim=1).values
        if torch.equal(new_grid, grid):
            break  # same centroids -> same assignment: a fixed point
        grid = new_grid
    return grid


def _reseed_empty(
    ordered: torch.Tensor,
    bounds: torch.Tensor,
    count: torch.Tensor,
    total: torch.Tensor,
    square_prefix: torch.Tensor,
    mean: torch.Tensor,
    empty: torch.Tensor,
) -> torch.Tensor:
    """Move one empty centroid per row to the far end of the cluster with the largest squared error.

    Duplicate quantiles (rows with many equal values, e.g. pruned zeros) start as empty clusters;
    left alone they would waste levels forever. The next assignment splits the worst cluster.
    """
    safe_count = count.clamp(min=1).double()
    sse = torch.where(count > 0, _run_totals(square_prefix, bounds) - total.square() / safe_count, 0.0)
    worst = sse.argmax(dim=1, keepdim=True)
    low = ordered.gather(1, bounds.gather(1, worst))
    high = ordered.gather(1, bounds.gather(1, worst + 1) - 1)
    centre = mean.gather(1, worst)
    far_end = torch.where(high - centre >= centre - low, high, low)
    first_empty = empty.int().argmax(dim=1, keepdim=True)
    fix = empty.any(dim=1, keepdim=True) & (sse.gather(1, worst) > 0)
    return mean.scatter(1, first_empty, torch.where(fix, far_end, mean.gather(1, first_empty)))
