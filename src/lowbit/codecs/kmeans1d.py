"""Learned 1-D grids for the codebook formats: per-row quantiles, or optimal 1-D k-means.

In one dimension a k-means cluster is a contiguous run of the sorted values, which allows two
things a general k-means cannot do:

- **The optimum by dynamic programming.** The best way to cut ``n`` sorted values into ``k`` runs
  follows from the best ways to cut every prefix into ``k - 1`` runs; with prefix sums each run's
  squared error is O(1), so the search is O(k * n**2) per row and vectorises over rows. To bound
  that cost, long rows are first merged into ``atoms`` runs (half of equal count, half of equal
  width, so the tails keep their resolution) and the optimum over atoms seeds the next step. The
  number of atoms comes from a budget for the whole call that grows with its size (``dp_atoms``):
  a row no longer than that gets the exact optimum (small blocks of small weights); a per-tensor
  grid uses 1024 atoms, a per-channel grid of a 4096x4096 weight 65 (typically within 1-3% of the
  optimal error).
- **Cheap Lloyd iterations.** Each row is sorted once and its prefix sums taken; then one Lloyd
  iteration is a binary search of the centroid midpoints in the sorted row (the cluster boundaries)
  and two lookups per cluster (its size and sum): O(levels * log n) per row instead of O(n * levels).
  Lloyd refines the seed from the programme. Alone, from equal-count quantiles, it stalls far from
  the optimum on short rows (their clusters keep their initial sizes); when a call has too many rows
  for the programme (per-group grids of a large weight) it starts from an even spread of each row's
  range instead, which lands on average about 20% above the optimal error (a few rows up to 2x).

Values are assigned exactly as the codebook codec (``lowbit.codecs.codebook``) does (float32
midpoints, a value on a midpoint goes to the lower centroid), so the learned grid is a fixed point
of the quantizer that will use it. A leaf module (numpy and torch only), used by that codec.

>>> import torch
>>> learn_grid(torch.tensor([[0.0, 0.5, 1.0, 1.5, 10.0, 11.0]]), levels=2).tolist()
[[0.75, 10.5]]
"""

from __future__ import annotations

import math

import numpy as np
import torch

LEARNERS = ("kmeans", "quantile")

# Lloyd iterations are cheap here (see the module docstring); most rows converge long before this.
DEFAULT_ITERS = 300

# The dynamic programme costs (levels - 1) * (atoms + 1)**2 steps per row. Its atoms are chosen so a
# call spends DP_STEPS_PER_VALUE steps per value it learns from, but at least DP_MIN_BUDGET (small
# calls are exact) and at most DP_BUDGET (about half a second of one core), and never more than
# MAX_ATOMS atoms per row. With fewer than two atoms per level the programme would only blur the
# data, so it is skipped: Lloyd then starts from an even spread of each row's range.
DP_STEPS_PER_VALUE = 256
DP_MIN_BUDGET = 1 << 24
DP_BUDGET = 1 << 28
MAX_ATOMS = 1024

# Rows per dynamic-programme chunk are chosen so one [rows, atoms + 1, atoms + 1] cost table has about
# this many entries (4 MB of float32: stays in cache while it is swept once per level).
_DP_CHUNK_ENTRIES = 1 << 20

# Rows are processed in chunks of about this many values, bounding the sorted copy and its float64
# prefix sums (~20 bytes per value). A single row is never split, so one huge row uses ~20 bytes/value.
_CHUNK_VALUES = 1 << 22


def learn_grid(
    rows: torch.Tensor, levels: int, learner: str = "kmeans", iters: int = DEFAULT_ITERS
) -> torch.Tensor:
    """A sorted grid of ``levels`` values per row of ``rows`` (``[n_blocks, block_numel]``).

    ``quantile``: the row's quantiles at ``(i + 0.5) / levels`` (linear interpolation, as
    ``torch.quantile``). ``kmeans``: the optimal 1-D k-means grid when the dynamic programme can
    afford one atom per value (``n_values <= dp_atoms(levels, *rows.shape)``), else its optimum over
    atoms refined by Lloyd iterations until the assignment stops changing or ``iters`` iterations.
    A row with at most ``levels`` distinct values gets exactly those values (zero error), the
    largest repeated to fill the grid. Returns float32 ``[n_blocks, levels]``, ascending per row.

    >>> rows = torch.tensor([[3.0, 3.0, 3.0], [0.0, 1.0, 3.0]])
    >>> learn_grid(rows, levels=2).tolist()
    [[3.0, 3.0], [0.5, 3.0]]
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
    atoms = dp_atoms(levels, n_rows, n_values)  # from the whole call: chunking never changes the result
    step = max(1, _CHUNK_VALUES // n_values)
    for start in range(0, n_rows, step):
        ordered = sort_rows(rows[start : start + step])
        if learner == "quantile":
            grid[start : start + step] = quantiles_of_sorted(ordered, levels)
        else:
            grid[start : start + step] = _kmeans_of_sorted(ordered, levels, iters, atoms)
    return grid


def sort_rows(rows: torch.Tensor) -> torch.Tensor:
    """Each row sorted ascending (float32).

    On CPU numpy's vectorised sort is used: it is about 10x faster than ``torch.sort`` on one long
    row (a 16M-value per-tensor block sorts in ~0.2 s instead of ~3.5 s on two cores).

    >>> sort_rows(torch.tensor([[2.0, -1.0, 0.5]])).tolist()
    [[-1.0, 0.5, 2.0]]
    """
    if rows.device.type == "cpu":
        # Contiguous first: numpy keeps a strided input's layout, and searchsorted on non-contiguous
        # sorted rows copies them on every Lloyd iteration.
        return torch.from_numpy(np.sort(rows.detach().float().contiguous().numpy(), axis=1))
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
    # float32 lerp overflows between values of opposite sign near 3e38; float64 does not.
    overflow = ~torch.isfinite(values)
    if bool(overflow.any()):
        wide = torch.lerp(ordered[:, lo].double(), ordered[:, hi].double(), frac.double()).float()
        values = torch.where(overflow, wide, values)
    return values.sort(dim=1).values  # interpolation rounding must never break the order


def dp_atoms(levels: int, n_rows: int, n_values: int) -> int:
    """Atoms per row for the dynamic programme on ``n_rows`` rows of ``n_values`` values (0: skipped).

    Rows with at most this many values get the exact optimum. The programme's cost grows with
    rows * atoms**2 and its budget with the number of values (``DP_STEPS_PER_VALUE``, clamped to
    ``DP_MIN_BUDGET..DP_BUDGET``), so a call with many short rows (per-group grids of a large
    weight) gets few atoms or none.

    >>> dp_atoms(16, 1, 4096 * 4096), dp_atoms(16, 4096, 4096), dp_atoms(16, 131072, 128)
    (1024, 65, 0)
    >>> dp_atoms(16, 8, 128), dp_atoms(256, 1, 4096 * 4096)  # small calls are exact
    (372, 1024)
    """
    budget = min(max(DP_STEPS_PER_VALUE * n_rows * n_values, DP_MIN_BUDGET), DP_BUDGET)
    atoms = min(MAX_ATOMS, math.isqrt(budget // (max(n_rows, 1) * max(levels - 1, 1))) - 1)
    return atoms if atoms >= 2 * levels else 0


def _kmeans_of_sorted(ordered: torch.Tensor, levels: int, iters: int, atoms: int) -> torch.Tensor:
    """1-D k-means grid of each sorted row; rows with few distinct values take those values."""
    is_new = torch.ones_like(ordered, dtype=torch.bool)
    is_new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    few = is_new.sum(dim=1) <= levels
    grid = torch.empty(ordered.shape[0], levels, device=ordered.device)
    if bool(few.any()):
        few_values = ordered[few]
        distinct_rank = is_new[few].cumsum(dim=1) - 1  # index of each value among the distinct ones
        exact = few_values[:, -1:].expand(-1, levels).clone()  # pad with the largest value: stays sorted
        grid[few] = exact.scatter_(1, distinct_rank, few_values)
    del is_new
    many = ~few
    if bool(many.all()):
        return _seeded_lloyd(ordered, levels, iters, atoms)
    if bool(many.any()):
        grid[many] = _seeded_lloyd(ordered[many], levels, iters, atoms)
    return grid


def _seeded_lloyd(ordered: torch.Tensor, levels: int, iters: int, atoms: int) -> torch.Tensor:
    """Lloyd from the dynamic programme's optimum over ``atoms`` atoms, or (``atoms == 0``) from an
    even spread of each row's range.

    Not from the quantiles: equal-count starting clusters stay nearly equally full under Lloyd,
    which on a short row ends at 2-4x the optimal squared error (an even spread: 1.1-1.3x on 128
    Gaussian or Student-t values). Levels that start in an empty stretch are re-seeded by ``_lloyd``.
    """
    prefix = _prefix_sums(ordered)
    if atoms:
        bounds = _optimal_bounds(ordered, prefix, levels, atoms)
        grid = (_run_totals(prefix, bounds) / (bounds[:, 1:] - bounds[:, :-1])).float()
    else:
        lo, hi = ordered[:, :1], ordered[:, -1:]
        grid = lo + (hi - lo) * ((torch.arange(levels, device=ordered.device) + 0.5) / levels)
    # Float32 rounding of two nearly equal values must not break the order the quantizer relies on.
    return _lloyd(ordered, grid.sort(dim=1).values, iters, prefix)


def _atom_edges(ordered: torch.Tensor, atoms: int) -> torch.Tensor:
    """``[R, atoms + 1]`` start positions of the atoms in each sorted row (plus the end).

    A row of at most ``atoms`` values gets one atom per value (the programme is then exact). Longer
    rows: half the atoms hold equal counts (resolution where the values are dense), the other half
    split the value range evenly (resolution in the tails, where the outliers that deserve a level
    of their own are). Some equal-width atoms can be empty; the programme never gives one a level.
    """
    n_rows, n_values = ordered.shape
    device = ordered.device
    if n_values <= atoms:
        return torch.arange(n_values + 1, device=device).expand(n_rows, -1)
    by_count = atoms // 2
    count_edges = (torch.arange(by_count + 1, device=device) * n_values // by_count).expand(n_rows, -1)
    fractions = torch.arange(1, atoms - by_count + 1, device=device, dtype=torch.float64)
    fractions = fractions / (atoms - by_count + 1)
    lo, hi = ordered[:, :1].double(), ordered[:, -1:].double()
    cut_values = (lo + (hi - lo) * fractions).float()
    width_edges = torch.searchsorted(ordered, cut_values.contiguous())
    return torch.cat([count_edges, width_edges], dim=1).sort(dim=1).values


def _optimal_bounds(ordered: torch.Tensor, prefix: torch.Tensor, levels: int, atoms: int) -> torch.Tensor:
    """``[R, levels + 1]`` cluster start positions (in the sorted rows) of the optimal partition of
    each row's atoms into ``levels`` runs; exact k-means when every atom is a single value.

    ``prefix`` is ``_prefix_sums(ordered)``. The squared errors are differences of prefix sums of
    squares, which would cancel for values far from zero: they are taken around each row's median.
    """
    edges = _atom_edges(ordered, atoms)
    count = (edges[:, 1:] - edges[:, :-1]).double()
    median = ordered[:, ordered.shape[1] // 2 :][:, :1].double()
    total = _run_totals(prefix, edges) - count * median
    shifted = ordered.double().sub_(median)  # one float64 copy: a per-tensor row can hold 16M values
    square = _run_totals(_prefix_sums(shifted.square_()), edges)
    del shifted
    n_atoms = edges.shape[1] - 1
    step = max(1, _DP_CHUNK_ENTRIES // (n_atoms + 1) ** 2)
    atom_bounds = torch.cat(
        [
            _optimal_atom_bounds(count[s : s + step], total[s : s + step], square[s : s + step], levels)
            for s in range(0, ordered.shape[0], step)
        ]
    )
    return edges.gather(1, atom_bounds)


def _optimal_atom_bounds(
    count: torch.Tensor, total: torch.Tensor, square: torch.Tensor, levels: int
) -> torch.Tensor:
    """Dynamic programme over atoms ``[R, A]`` (count, sum, sum of squares): ``[R, levels + 1]`` atom
    indices where the optimal runs start (plus ``A``).

    ``best[m][r, j]``: least squared error of cutting atoms ``[0, j)`` into ``m + 1`` runs;
    ``best[m][j] = min_i best[m - 1][i] + cost[j, i]`` with ``cost[j, i]`` the error of the run
    ``[i, j)``. The minimising ``i`` are recovered backwards from the end, one row of ``cost`` each.
    """
    n_rows, n_atoms = count.shape
    pc, pt, ps = (torch.nn.functional.pad(t.cumsum(dim=1), (1, 0)) for t in (count, total, square))
    # cost[r, j, i] = squares - sums**2 / runs over atoms [i, j): float64 differences (prefix sums
    # cancel), computed in place because this table is the biggest thing the programme builds.
    runs = pc[:, :, None] - pc[:, None, :]
    between = pt[:, :, None] - pt[:, None, :]
    between.square_().div_(runs)  # runs <= 0 give inf / nan here; they are masked below
    cost = torch.sub(ps[:, :, None], ps[:, None, :]).sub_(between).clamp_(min=0).float()
    del between
    # Empty runs (i >= j, or only empty atoms) cannot be a cluster: infinite cost.
    cost.masked_fill_(runs <= 0, torch.inf)
    del runs
    best = [cost[:, :, 0].contiguous()]
    scratch = torch.empty_like(cost)
    for _ in range(1, levels):
        torch.add(best[-1][:, None, :], cost, out=scratch)
        best.append(scratch.amin(dim=2))
    bounds = torch.empty(n_rows, levels + 1, dtype=torch.long, device=count.device)
    bounds[:, 0], bounds[:, levels] = 0, n_atoms
    end = torch.full((n_rows,), n_atoms, dtype=torch.long, device=count.device)
    row = torch.arange(n_rows, device=count.device)
    for m in range(levels - 1, 0, -1):
        end = (best[m - 1] + cost[row, end]).argmin(dim=1)
        bounds[:, m] = end
    return bounds


def _prefix_sums(values: torch.Tensor) -> torch.Tensor:
    """``[R, n]`` -> float64 ``[R, n + 1]`` with a leading 0: any run's sum is two lookups.

    float64 because a 16M-value float32 running sum would lose the small clusters' sums.
    """
    out = torch.zeros(values.shape[0], values.shape[1] + 1, dtype=torch.float64, device=values.device)
    torch.cumsum(values, dim=1, dtype=torch.float64, out=out[:, 1:])
    return out


def _run_totals(prefix: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Sum of each run ``[bounds[:, j], bounds[:, j + 1])`` from prefix sums."""
    return prefix.gather(1, bounds[:, 1:]) - prefix.gather(1, bounds[:, :-1])


def _cluster_bounds(ordered: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``[R, levels + 1]`` start positions of each centroid's run in the sorted rows (plus the end).

    Same float32 midpoints as the codebook codec's ``encode``; ``right=True`` counts the values equal
    to a midpoint into the lower cluster, which is where ``quantize`` sends them.
    """
    mid = (grid[:, 1:] + grid[:, :-1]) / 2
    inner = torch.searchsorted(ordered, mid.contiguous(), right=True)
    n_rows, n_values = ordered.shape
    first = torch.zeros(n_rows, 1, dtype=torch.long, device=ordered.device)
    return torch.cat([first, inner, torch.full_like(first, n_values)], dim=1)


def _lloyd(
    ordered: torch.Tensor, grid: torch.Tensor, iters: int, prefix: torch.Tensor | None = None
) -> torch.Tensor:
    """Lloyd iterations on sorted rows that each have more distinct values than levels.

    A row whose centroids did not move has reached a fixed point (same centroids, same assignment)
    and is done. Finished rows are dropped from the working set once they are half of it: rows
    converge at very different speeds, and the slow few must not keep every row iterating.
    """
    prefix = _prefix_sums(ordered) if prefix is None else prefix
    out = grid.clone()
    index: torch.Tensor | None = None  # working rows (None: all of them, nothing copied yet)
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
        moved = (new_grid != grid).any(dim=1)
        grid = new_grid
        n_moved = int(moved.sum())
        if n_moved == 0:
            break
        if 2 * n_moved <= moved.numel():
            _store(out, index, grid)
            keep = torch.nonzero(moved).reshape(-1)
            index = keep if index is None else index[keep]
            ordered, prefix, grid = ordered[keep], prefix[keep], grid[keep]
            square_prefix = None if square_prefix is None else square_prefix[keep]
    _store(out, index, grid)
    return out


def _store(out: torch.Tensor, index: torch.Tensor | None, grid: torch.Tensor) -> None:
    if index is None:
        out.copy_(grid)
    else:
        out[index] = grid


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
