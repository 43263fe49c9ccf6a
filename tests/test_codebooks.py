"""Learned codebooks: 1-D k-means against an exhaustive search and an independent dynamic programme,
quantile grids against ``torch.quantile``, product quantization round trips, the codebook formats
through the primitives (padding, degenerate and non-finite input), and k-means against int4 / nf4.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

import lowbit.formats as F
from lowbit.codecs import kmeans1d as kmeans
from lowbit.codecs.kmeans1d import dp_atoms, learn_grid, quantiles_of_sorted, sort_rows
from lowbit.codecs.product import decode_pq, encode_pq, fit_pq
from lowbit.granularity import PerChannel, PerGroup, PerTensor, PerToken
from lowbit.primitives import choose_qparams, dequantize, fake_quantize, quantize

# --- references ----------------------------------------------------------------------------------


def exhaustive_sse(values: np.ndarray, k: int) -> float:
    """Least squared error over every cut of the sorted values into k non-empty runs.

    In one dimension an optimal k-means cluster is a run of the sorted values, so this is the
    true optimum (tiny inputs only: C(n - 1, k - 1) cuts).
    """
    x = np.sort(values.astype(np.float64))
    best = math.inf
    for cuts in itertools.combinations(range(1, len(x)), k - 1):
        runs = np.split(x, cuts)
        best = min(best, sum(float(((r - r.mean()) ** 2).sum()) for r in runs))
    return best


def optimal_grid(values: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Textbook O(k n^2) dynamic programme (float64, one row at a time): centroids and squared error."""
    x = np.sort(values.astype(np.float64))
    n = len(x)
    s1 = np.concatenate([[0.0], np.cumsum(x)])
    s2 = np.concatenate([[0.0], np.cumsum(x * x)])
    best = np.full((k + 1, n + 1), np.inf)
    best[0, 0] = 0.0
    arg = np.zeros((k + 1, n + 1), dtype=np.int64)
    for m in range(1, k + 1):
        for j in range(m, n + 1):
            i = np.arange(m - 1, j)
            run = s2[j] - s2[i] - (s1[j] - s1[i]) ** 2 / (j - i)
            total = best[m - 1, i] + run
            arg[m, j] = i[np.argmin(total)]
            best[m, j] = total.min()
    ends, j = [n], n
    for m in range(k, 0, -1):
        j = arg[m, j]
        ends.append(j)
    ends.reverse()
    grid = np.array([x[a:b].mean() for a, b in itertools.pairwise(ends)])
    return grid, float(best[k, n])


def grid_sse(rows: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Per row: squared error of sending every value to its nearest grid value (float64)."""
    distance = (rows.double()[:, :, None] - grid.double()[:, None, :]).abs()
    return distance.min(dim=2).values.square().sum(dim=1)


def student_t(shape: tuple[int, ...], gen: torch.Generator, dof: int = 3) -> torch.Tensor:
    z = torch.randn(shape, generator=gen)
    return z / torch.sqrt(sum(torch.randn(shape, generator=gen) ** 2 for _ in range(dof)) / dof)


def test_reference_programme_matches_the_exhaustive_search(gen: torch.Generator) -> None:
    for n, k in [(6, 2), (9, 3), (11, 4), (12, 5)]:
        values = torch.randn(n, generator=gen).numpy()
        assert optimal_grid(values, k)[1] == pytest.approx(exhaustive_sse(values, k), rel=1e-12, abs=1e-12)


# --- 1-D k-means -------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [2, 3, 4, 8, 16])
def test_kmeans_is_optimal_on_small_rows(levels: int, gen: torch.Generator) -> None:
    """Up to dp_atoms(levels, rows, values) values per row the grid is the exact optimum: the same
    squared error and the same centroids as the reference programme."""
    for n, kind in [(levels + 1, "normal"), (40, "normal"), (128, "student_t"), (97, "duplicates")]:
        if n <= levels:
            continue
        rows = torch.randn(6, n, generator=gen) if kind != "student_t" else student_t((6, n), gen)
        if kind == "duplicates":  # many repeated values (pruned zeros, coarse inputs)
            rows = torch.where(rows.abs() < 0.7, torch.zeros_like(rows), rows.mul(4).round())
        assert n <= dp_atoms(levels, *rows.shape)
        grid = learn_grid(rows, levels)
        assert bool((grid[:, 1:] >= grid[:, :-1]).all())
        ours = grid_sse(rows, grid)
        for r in range(rows.shape[0]):
            values = rows[r].numpy()
            if len(np.unique(values)) <= levels:
                assert float(ours[r]) == 0.0
                continue
            reference, sse = optimal_grid(values, levels)
            assert float(ours[r]) == pytest.approx(sse, rel=1e-5, abs=1e-9)
            if kind != "duplicates":  # ties between equal partitions are possible with repeats
                np.testing.assert_allclose(grid[r].numpy(), reference, rtol=1e-5, atol=1e-6)


def test_kmeans_is_never_worse_than_sklearn(gen: torch.Generator) -> None:
    rows = torch.cat([torch.randn(4, 64, generator=gen), student_t((4, 64), gen)])
    grid = learn_grid(rows, 8)
    ours = grid_sse(rows, grid)
    for r in range(rows.shape[0]):
        fitted = KMeans(n_clusters=8, n_init=10, random_state=0).fit(rows[r].double().numpy()[:, None])
        assert float(ours[r]) <= fitted.inertia_ * (1 + 1e-6)


def test_plain_lloyd_from_quantiles_is_what_the_programme_avoids(gen: torch.Generator) -> None:
    """Why the dynamic programme: Lloyd from equal-count quantiles stalls far from the optimum."""
    rows = torch.randn(16, 128, generator=gen)
    ordered = sort_rows(rows)
    lloyd = kmeans._lloyd(ordered, quantiles_of_sorted(ordered, 16), 300)
    assert float(grid_sse(rows, lloyd).sum()) > 1.5 * float(grid_sse(rows, learn_grid(rows, 16)).sum())


def exact_sse(rows: torch.Tensor, levels: int) -> torch.Tensor:
    """Exact optimum through the programme with one atom per value (checked above against the
    reference), affordable for a handful of long rows."""
    ordered = sort_rows(rows)
    prefix = kmeans._prefix_sums(ordered)
    bounds = kmeans._optimal_bounds(ordered, prefix, levels, ordered.shape[1])
    grid = kmeans._run_totals(prefix, bounds) / (bounds[:, 1:] - bounds[:, :-1])
    return grid_sse(rows, grid.float())


@pytest.mark.parametrize("budget_rows", [1, 4096])
def test_kmeans_over_atoms_is_near_exact_on_long_rows(budget_rows: int, gen: torch.Generator) -> None:
    """Rows longer than the atoms: the optimum over atoms refined by Lloyd stays within 1% (1024
    atoms, a per-tensor call) or on average 3% (65 atoms, a per-channel call of 4096 rows) of the
    optimum."""
    rows = torch.cat([torch.randn(3, 1500, generator=gen), student_t((3, 1500), gen)])
    atoms = dp_atoms(16, budget_rows, 4096 * 4096 // budget_rows)  # as for a 4096x4096 weight
    assert atoms < rows.shape[1]
    ordered = sort_rows(rows)
    grid = kmeans._kmeans_of_sorted(ordered, 16, kmeans.DEFAULT_ITERS, atoms)
    ratio = grid_sse(rows, grid) / exact_sse(rows, 16)
    assert float(ratio.min()) >= 1 - 1e-6
    if budget_rows == 1:
        assert float(ratio.max()) <= 1.01
    else:
        assert float(ratio.mean()) <= 1.03 and float(ratio.max()) <= 1.08


def test_kmeans_without_the_programme_still_beats_quantile_starts(monkeypatch, gen: torch.Generator) -> None:
    """Calls with too many rows for the programme (a per-group codebook of a large weight) start
    Lloyd from an even spread of each row's range: within 35% of the optimum on 128 values."""
    monkeypatch.setattr(kmeans, "DP_BUDGET", 1000)
    rows = torch.cat([torch.randn(8, 128, generator=gen), student_t((8, 128), gen)])
    assert dp_atoms(16, *rows.shape) == 0
    ratio = grid_sse(rows, learn_grid(rows, 16)) / exact_sse(rows, 16)
    assert float(ratio.mean()) <= 1.35 and float(ratio.min()) >= 1 - 1e-6


def test_kmeans_grid_is_a_fixed_point_of_the_quantizer(gen: torch.Generator) -> None:
    """Every centroid is the mean of the values ``quantize`` sends to it."""
    w = student_t((32, 256), gen)
    fmt = F.get("kmeans_3")
    qp = choose_qparams(w, fmt, PerChannel(0))
    codes = quantize(w, fmt, qp).long()
    grid = qp.codebook.reshape(32, 8)
    for r in range(32):
        for c in codes[r].unique():
            members = w[r][codes[r] == c].double()
            assert float(grid[r, c]) == pytest.approx(float(members.mean()), rel=1e-5, abs=1e-6)


def test_rows_with_few_distinct_values_get_exactly_those_values() -> None:
    rows = torch.tensor([[2.0, 2.0, 2.0, 2.0], [1.0, -1.0, 1.0, -1.0], [0.0, 5.0, 5.0, 3.0]])
    assert learn_grid(rows, 4).tolist() == [[2.0] * 4, [-1.0, 1.0, 1.0, 1.0], [0.0, 3.0, 5.0, 5.0]]
    assert learn_grid(rows, 1).tolist() == [[2.0], [0.0], [3.25]]


def test_chunked_rows_give_the_same_grid_as_one_call(monkeypatch, gen: torch.Generator) -> None:
    rows = torch.randn(40, 300, generator=gen)
    whole = learn_grid(rows, 8)
    monkeypatch.setattr(kmeans, "_CHUNK_VALUES", 900)  # three rows per chunk
    assert torch.equal(learn_grid(rows, 8), whole)


def test_learn_grid_validates_its_arguments() -> None:
    rows = torch.randn(2, 5)
    with pytest.raises(ValueError, match="unknown grid learner"):
        learn_grid(rows, 4, "median")
    with pytest.raises(ValueError, match="at least 1 level"):
        learn_grid(rows, 0)
    with pytest.raises(ValueError, match="iters must be >= 0"):
        learn_grid(rows, 4, iters=-1)
    with pytest.raises(ValueError, match="rows must be 2-D"):
        learn_grid(torch.randn(5), 4)
    with pytest.raises(ValueError, match="NaN or Inf"):
        learn_grid(torch.tensor([[1.0, math.nan]]), 2)
    assert learn_grid(torch.empty(0, 5), 4).shape == (0, 4)
    assert learn_grid(torch.empty(3, 0), 4).tolist() == [[0.0] * 4] * 3


# --- quantile grid -------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [2, 4, 16])
def test_quantile_grid_is_torch_quantile_at_bin_centres(levels: int, gen: torch.Generator) -> None:
    for n in (1, 5, 128, 1000):
        rows = student_t((5, n), gen)
        q = ((torch.arange(levels, dtype=torch.float64) + 0.5) / levels).float()
        assert torch.equal(learn_grid(rows, levels, "quantile"), torch.quantile(rows, q, dim=1).T)


def test_quantile_grid_survives_values_near_the_float32_limit() -> None:
    rows = torch.tensor([[-3.0e38, 3.0e38, 0.0, 1.0]])
    grid = learn_grid(rows, 4, "quantile")
    assert bool(torch.isfinite(grid).all()) and grid[0, 0] < 0 < grid[0, -1]


# --- codebook formats through the primitives -----------------------------------------------------------


@pytest.mark.parametrize("name", ["kmeans_4", "quantile_4", "kmeans_2"])
@pytest.mark.parametrize("gran", [PerTensor(), PerChannel(0), PerChannel(1), PerGroup(16), PerToken()])
def test_codes_are_nearest_codebook_entries_and_round_trip(name: str, gran, gen: torch.Generator) -> None:
    fmt = F.get(name)
    w = student_t((12, 40), gen)
    qp = choose_qparams(w, fmt, gran)
    codes = quantize(w, fmt, qp)
    assert codes.dtype == torch.uint8 and int(codes.max()) < fmt.levels
    y = dequantize(codes, fmt, qp)
    # Idempotent: values already on the grid keep their codes (ties resolve the same way).
    assert torch.equal(dequantize(quantize(y, fmt, qp), fmt, qp), y)
    # Every value sits on (one of) its nearest grid entries.
    grids = qp.codebook.reshape(-1, fmt.levels)
    per_value = grids[_block_index(w.shape, qp.block)]
    nearest = (w[..., None] - per_value).abs().min(dim=-1).values
    torch.testing.assert_close((y - w).abs(), nearest, rtol=0, atol=1e-6)


def _block_index(shape: tuple[int, ...], block: tuple[int, ...]) -> torch.Tensor:
    """Index of each element's block in the flattened scale grid."""
    index = torch.zeros(shape, dtype=torch.long)
    stride = 1
    for d in reversed(range(len(shape))):
        blocks = math.ceil(shape[d] / block[d])
        pos = torch.arange(shape[d]) // block[d]
        view = [1] * len(shape)
        view[d] = shape[d]
        index = index + pos.reshape(view) * stride
        stride *= blocks
    return index


@pytest.mark.parametrize("name", ["kmeans_4", "quantile_4"])
def test_partial_groups_learn_from_their_real_values_only(name: str, gen: torch.Generator) -> None:
    """A group cut short at the end of a row is zero-padded internally; the padding is not data."""
    fmt = F.get(name)
    w = torch.randn(4, 37, generator=gen) + 3.0  # far from zero, so learned padding would show
    qp = choose_qparams(w, fmt, PerGroup(16))
    grids = qp.codebook.reshape(4, 3, fmt.levels)
    for r in range(4):
        for g, cols in enumerate((slice(0, 16), slice(16, 32), slice(32, 37))):
            expected = learn_grid(w[r, cols].reshape(1, -1), fmt.levels, fmt.learner or "kmeans")
            assert torch.equal(grids[r, g], expected[0])
    constant = torch.full((3, 10), -2.5)
    assert torch.equal(fake_quantize(constant, fmt, choose_qparams(constant, fmt, PerGroup(4))), constant)


DEGENERATE = {
    "all_zero": lambda: torch.zeros(3, 5),
    "constant": lambda: torch.full((3, 5), -2.5),
    "single_element": lambda: torch.tensor([-2.5]),
    "single_element_2d": lambda: torch.tensor([[-2.5]]),
    "scalar": lambda: torch.tensor(-2.5),
    "empty": lambda: torch.empty(0),
    "empty_rows": lambda: torch.empty(0, 4),
    "empty_cols": lambda: torch.empty(4, 0),
    "conv_kernel": lambda: torch.full((2, 3, 2, 2), 0.75),
}
LEARNED = ["kmeans_4", "quantile_4", "kmeans_1", "pq", "pq_2x3"]


@pytest.mark.parametrize("input_kind", DEGENERATE)
@pytest.mark.parametrize("name", LEARNED)
def test_degenerate_input_gives_finite_exact_results(name: str, input_kind: str) -> None:
    fmt = F.get(name)
    for dtype in (torch.float32, torch.bfloat16):
        x = DEGENERATE[input_kind]().to(dtype)
        for gran in (PerTensor(), PerChannel(0), PerChannel(-1), PerGroup(4), PerToken()):
            qp = choose_qparams(x, fmt, gran)
            if qp.codebook is not None:
                assert bool(torch.isfinite(qp.codebook).all())
            y = fake_quantize(x, fmt, qp)
            assert y.shape == x.shape and y.dtype == dtype
            # At most 2**bits distinct values (here one or none): learned exactly.
            assert torch.equal(y, x)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", LEARNED)
def test_non_finite_input_raises_a_clear_error(name: str, bad: float) -> None:
    fmt = F.get(name)
    x = torch.tensor([[1.0, bad], [0.5, -2.0]])
    problem = "1 NaN and 0 Inf" if math.isnan(bad) else "0 NaN and 1 Inf"
    with pytest.raises(ValueError, match=f"tensor contains {problem} values"):
        choose_qparams(x, fmt, PerChannel(0))
    qp = choose_qparams(torch.ones(2, 2), fmt, PerChannel(0))
    with pytest.raises(ValueError, match=f"tensor contains {problem} values"):
        quantize(x, fmt, qp)


@pytest.mark.parametrize(
    "name", ["int8", "uint8", "int4", "uint1", "binary", "ternary", "fp8_e4m3", "nf4", *LEARNED]
)
def test_values_near_the_float32_limit_stay_finite(name: str) -> None:
    """Every format family: ranges wider than the largest float32 (max - min overflows) and sums of
    huge magnitudes (binary's mean) must not turn into inf or NaN parameters."""
    fmt = F.get(name)
    x = torch.tensor([[3.0e38, -3.0e38, 1.0, 0.0], [2.0e38, 2.5e38, -1.0e38, 5.0]])
    for gran in (PerTensor(), PerChannel(0)):
        for symmetric in (True, False):
            qp = choose_qparams(x, fmt, gran, symmetric)
            assert bool(torch.isfinite(qp.scale).all())
            y = fake_quantize(x, fmt, qp)
            assert bool(torch.isfinite(y).all()), (gran, symmetric, y)


# --- product quantization --------------------------------------------------------------------------------


def test_pq_codes_are_the_nearest_codewords(gen: torch.Generator) -> None:
    w = torch.randn(300, 10, generator=gen)
    codebook = fit_pq(w, bits=4, dim=4)
    codes = encode_pq(w, codebook)
    assert codes.shape == (300, 3) and codes.dtype == torch.uint8
    padded = torch.nn.functional.pad(w, (0, 2)).reshape(300, 3, 4)
    for s in range(3):
        distance = torch.cdist(padded[:, s].double(), codebook[s].double())
        best = distance.min(dim=1).values
        chosen = distance.gather(1, codes[:, s].long()[:, None])[:, 0]
        torch.testing.assert_close(chosen, best, rtol=0, atol=1e-5)


def test_pq_round_trip_is_exact_for_codeword_matrices(gen: torch.Generator) -> None:
    w = torch.randn(300, 12, generator=gen)
    codebook = fit_pq(w, bits=3, dim=4)
    rebuilt = decode_pq(encode_pq(w, codebook), codebook, 12)
    # Decoding is a lookup: encoding the decoded matrix finds the same codewords, exactly.
    assert torch.equal(decode_pq(encode_pq(rebuilt, codebook), codebook, 12), rebuilt)
    few = torch.randn(6, 7, generator=gen)  # no more rows than codewords: the rows are the codebook
    small = fit_pq(few, bits=3, dim=3)
    assert torch.equal(decode_pq(encode_pq(few, small), small, 7), few)


def test_pq_error_falls_with_more_bits(gen: torch.Generator) -> None:
    w = torch.randn(512, 64, generator=gen)
    errors = []
    for bits in (2, 4, 6, 8):
        fmt = F.get(f"pq_{bits}x4")
        errors.append(float((fake_quantize(w, fmt, choose_qparams(w, fmt)) - w).pow(2).mean()))
    assert all(a > 1.1 * b for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 0.5 * float(w.pow(2).mean())


def test_pq_is_deterministic_and_keeps_conv_shapes(gen: torch.Generator) -> None:
    kernel = torch.randn(32, 3, 3, 3, generator=gen)
    fmt = F.get("pq_4x3")
    first, second = choose_qparams(kernel, fmt), choose_qparams(kernel, fmt)
    assert torch.equal(first.codebook, second.codebook)
    codes = quantize(kernel, fmt, first)
    assert codes.shape == (32, 9)
    assert dequantize(codes, fmt, first).shape == kernel.shape


def test_pq_validates_its_inputs() -> None:
    with pytest.raises(ValueError, match="needs 1 <= bits <= 16"):
        fit_pq(torch.randn(4, 4), bits=0, dim=2)
    with pytest.raises(ValueError, match="2-D"):
        fit_pq(torch.randn(4), bits=2, dim=2)
    codebook = fit_pq(torch.randn(8, 4), bits=2, dim=2)
    with pytest.raises(ValueError, match="sub-spaces"):
        encode_pq(torch.randn(8, 6), codebook)
    with pytest.raises(ValueError, match="do not belong to this codebook"):
        decode_pq(torch.full((1, 2), 7), codebook, 4)


# --- k-means against the fixed 4-bit grids ---------------------------------------------------------------


def test_kmeans_4_beats_int4_and_nf4_per_tensor_on_a_gaussian_weight() -> None:
    """The acceptance comparison at 2048x2048 (the 4096x4096 figures are in bench/formats_table.py)."""
    w = torch.randn(2048, 2048, generator=torch.Generator().manual_seed(0))
    error = {}
    for name in ("kmeans_4", "nf4", "int4"):
        fmt = F.get(name)
        error[name] = float((fake_quantize(w, fmt, choose_qparams(w, fmt)) - w).double().pow(2).mean())
    assert error["kmeans_4"] < error["nf4"] < error["int4"], error
    # Lloyd-Max for 16 levels of N(0, 1) is 0.009497; a learned per-tensor grid should be right there.
    assert error["kmeans_4"] == pytest.approx(0.009497, rel=0.01)
