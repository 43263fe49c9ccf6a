"""Calibration observers: ranges against PyTorch's own observers (bit for bit), clipping observers
against min-max on heavy-tailed activations, exact merging, constant memory, and awkward input.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.ao.quantization import observer as torch_observers

import lowbit.formats as F
import lowbit.observers as observers
from lowbit.granularity import PerChannel, PerGroup, PerTensor
from lowbit.observers import HistogramObserver, MovingAverageMinMaxObserver, Observer
from lowbit.observers.entropy import best_threshold, kl_divergence, quantized_histogram
from lowbit.observers.histogram import coarsen, radius_exponent
from lowbit.primitives import EPS, fake_quantize

HISTOGRAM_KINDS = ["histogram", "percentile", "mse", "entropy"]


def student_t(shape: tuple[int, ...], gen: torch.Generator, dof: int = 3) -> torch.Tensor:
    """Student-t samples, z / sqrt(chi2_dof / dof), with chi2 as a sum of squared normals."""
    z = torch.randn(shape, generator=gen)
    chi2 = sum(torch.randn(shape, generator=gen) ** 2 for _ in range(dof))
    return z / torch.sqrt(chi2 / dof)


def calibrated(name: str, batches: list[torch.Tensor], **kwargs) -> Observer:
    obs = observers.get(name, **kwargs)
    for batch in batches:
        obs.observe(batch)
    return obs


def state_numel(obs: Observer) -> int:
    """Total size of everything an observer keeps (tensors by element, containers by length)."""
    total = 0
    for value in vars(obs).values():
        if isinstance(value, torch.Tensor):
            total += value.numel()
        elif isinstance(value, (list, dict, set, tuple)):
            total += len(value)
    return total


# --- against PyTorch's observers -------------------------------------------------------------------


def torch_batches(gen: torch.Generator) -> list[torch.Tensor]:
    """Batches whose range drifts, so running and moving-average ranges differ."""
    return [torch.randn(8, 16, 5, generator=gen) * (1 + i) + 0.3 * i for i in range(6)]


@pytest.mark.parametrize("fmt_name, dtype", [("uint8", torch.quint8), ("int8", torch.qint8)])
@pytest.mark.parametrize("kind", ["minmax", "moving_average"])
def test_per_tensor_affine_qparams_match_torch_observers(
    kind: str, fmt_name: str, dtype: torch.dtype, gen: torch.Generator
) -> None:
    reference_class = {
        "minmax": torch_observers.MinMaxObserver,
        "moving_average": torch_observers.MovingAverageMinMaxObserver,
    }[kind]
    reference = reference_class(dtype=dtype, qscheme=torch.per_tensor_affine)
    batches = torch_batches(gen)
    for batch in batches:
        reference(batch)
    scale, zero_point = reference.calculate_qparams()
    qp = calibrated(kind, batches).qparams(fmt_name, symmetric=False)
    assert torch.equal(qp.scale.reshape(-1), scale)
    assert torch.equal(qp.zero_point.reshape(-1), zero_point.to(torch.int32))


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
@pytest.mark.parametrize("fmt_name, dtype", [("uint8", torch.quint8), ("int8", torch.qint8)])
@pytest.mark.parametrize("kind", ["minmax", "moving_average"])
def test_per_channel_affine_qparams_match_torch_observers(
    kind: str, fmt_name: str, dtype: torch.dtype, axis: int, gen: torch.Generator
) -> None:
    reference_class = {
        "minmax": torch_observers.PerChannelMinMaxObserver,
        "moving_average": torch_observers.MovingAveragePerChannelMinMaxObserver,
    }[kind]
    reference = reference_class(ch_axis=axis, dtype=dtype, qscheme=torch.per_channel_affine)
    batches = torch_batches(gen)
    for batch in batches:
        reference(batch)
    scale, zero_point = reference.calculate_qparams()
    obs = calibrated(kind, batches, granularity=PerChannel(axis))
    qp = obs.qparams(fmt_name, symmetric=False)
    channels = batches[0].shape[axis]
    assert qp.scale.shape == tuple(channels if d == axis % 3 else 1 for d in range(3))
    assert torch.equal(qp.scale.reshape(-1), scale)
    assert torch.equal(qp.zero_point.reshape(-1), zero_point.to(torch.int32))


def test_symmetric_scale_maps_the_running_absmax_to_qmax(gen: torch.Generator) -> None:
    """Symmetric ranges deliberately differ from PyTorch's (amax / 127.5 for qint8): amax / qmax
    keeps every observed value representable."""
    batches = torch_batches(gen)
    obs = calibrated("minmax", batches, granularity=PerChannel(1))
    amax = torch.stack([b.abs().amax(dim=(0, 2)) for b in batches]).amax(dim=0)
    for name in ("int8", "int4"):
        qp = obs.qparams(name)
        assert qp.zero_point is None
        assert torch.equal(qp.scale.reshape(-1), amax / F.get(name).qmax)


# --- clipping observers on heavy-tailed activations ------------------------------------------------


@pytest.fixture(scope="module")
def heavy_tailed_calibration() -> tuple[list[torch.Tensor], dict[str, Observer]]:
    """2M Student-t(3) activations in 32 batches, and every range observer calibrated on them.

    Millions of values is what one activation tensor sees in a real calibration run (a few batches
    of tokens times the hidden size), and the size matters: the largest of n Student-t(3) values
    grows like n**(1/3), so min-max spends ever more of its levels on ever rarer outliers, while the
    clipping observers' ranges settle.
    """
    gen = torch.Generator().manual_seed(1234)
    batches = [student_t((64, 1024), gen) for _ in range(32)]
    fitted = {name: calibrated(name, batches) for name in ("minmax", "percentile", "mse", "entropy")}
    return batches, fitted


@pytest.mark.parametrize(
    "fmt_name, symmetric, most", [("int8", True, 0.9), ("uint8", False, 0.9), ("int4", True, 0.5)]
)
def test_clipping_observers_beat_minmax_on_heavy_tailed_activations(
    heavy_tailed_calibration, fmt_name: str, symmetric: bool, most: float
) -> None:
    """Output MSE on the calibration activations: percentile, MSE and entropy each clip the tails
    and win, at 8 bits and (by a wide margin) at 4 bits."""
    batches, fitted = heavy_tailed_calibration
    acts = torch.cat(batches)
    fmt = F.get(fmt_name)
    error = {}
    for name, obs in fitted.items():
        qp = obs.qparams(fmt, symmetric)
        error[name] = float((fake_quantize(acts, fmt, qp) - acts).double().pow(2).mean())
    for name in ("percentile", "mse", "entropy"):
        assert error[name] < most * error["minmax"], (name, error)


def test_clipping_observers_also_win_on_held_out_activations_at_4_bits(heavy_tailed_calibration) -> None:
    """On fresh activations too. (At 8 bits the held-out error is dominated by the handful of fresh
    outliers beyond the clipped range, so a single draw says little; the in-sample test covers it.)"""
    _, fitted = heavy_tailed_calibration
    held_out = student_t((512, 1024), torch.Generator().manual_seed(99))
    fmt = F.get("int4")
    error = {
        name: float((fake_quantize(held_out, fmt, obs.qparams(fmt)) - held_out).double().pow(2).mean())
        for name, obs in fitted.items()
    }
    for name in ("percentile", "mse", "entropy"):
        assert error[name] < 0.5 * error["minmax"], (name, error)


def test_mse_observer_never_loses_to_its_own_full_range(gen: torch.Generator) -> None:
    """The search includes ratio 1 (min-max), so on any data it scores at least as well on the histogram;
    on light-tailed uniform data at 8 bits it keeps (almost) the whole range."""
    x = torch.rand(64, 512, generator=gen) * 2 - 1
    obs = calibrated("mse", [x])
    assert float(obs.clip_ratios()[0]) == 1.0
    fmt = F.get("int8")
    minmax_scale = float(calibrated("minmax", [x]).qparams(fmt).scale)
    assert float(obs.qparams(fmt).scale) >= 0.95 * minmax_scale


# --- merging ---------------------------------------------------------------------------------------


def two_streams(gen: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Two shards whose magnitudes differ by ~1000x, so a histogram must coarsen to merge them."""
    small = [torch.randn(16, 32, generator=gen) * 0.01 for _ in range(3)]
    large = [student_t((16, 32), gen) * 10 for _ in range(4)]
    return small, large


def assert_same_state(a: Observer, b: Observer) -> None:
    assert a.count == b.count
    for key, value in vars(a).items():
        other = vars(b)[key]
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, other), key
        else:
            assert value == other, key


@pytest.mark.parametrize("kind", ["minmax", *HISTOGRAM_KINDS])
def test_merge_equals_one_observer_fed_both_streams_exactly(kind: str, gen: torch.Generator) -> None:
    small, large = two_streams(gen)
    single = calibrated(kind, small + large)
    left, right = calibrated(kind, small), calibrated(kind, large)
    for merged in (left.merge(right), right.merge(left)):
        assert_same_state(merged, single)
        for fmt_name, symmetric in [("int8", True), ("uint8", False), ("int4", True)]:
            got, want = merged.qparams(fmt_name, symmetric), single.qparams(fmt_name, symmetric)
            assert torch.equal(got.scale, want.scale)
            assert (got.zero_point is None) == (want.zero_point is None)
            if want.zero_point is not None:
                assert torch.equal(got.zero_point, want.zero_point)


@pytest.mark.parametrize("gran", [PerTensor(), PerChannel(0), PerChannel(1), PerGroup(8)])
def test_minmax_merge_is_exact_at_every_granularity(gran, gen: torch.Generator) -> None:
    batches = [torch.randn(6, 20, generator=gen) * (i + 1) for i in range(5)]
    single = calibrated("minmax", batches, granularity=gran)
    merged = calibrated("minmax", batches[:2], granularity=gran).merge(
        calibrated("minmax", batches[2:], granularity=gran)
    )
    assert torch.equal(merged.min_val, single.min_val) and torch.equal(merged.max_val, single.max_val)
    assert merged.count == single.count == 5 * 120


def test_histogram_merge_is_exact_in_any_order_and_grouping(gen: torch.Generator) -> None:
    shards = [[torch.randn(100, generator=gen) * 10.0**k] for k in (-3, 2, 0, 5, -1)]
    single = calibrated("histogram", [b for shard in shards for b in shard])
    parts = [calibrated("histogram", shard) for shard in shards]
    left_to_right = parts[0]
    for part in parts[1:]:
        left_to_right = left_to_right.merge(part)
    tree = parts[4].merge(parts[2]).merge(parts[0].merge(parts[3].merge(parts[1])))
    for merged in (left_to_right, tree):
        assert_same_state(merged, single)
    assert int(single.counts.sum()) == 500


def test_moving_average_merge_is_the_batch_weighted_mean_and_close_on_stationary_data(
    gen: torch.Generator,
) -> None:
    """Documented as approximate: the average depends on batch order, so the merge weights the two
    averages by batch count. On stationary data it lands close to one observer fed both streams."""
    batches = [torch.randn(64, 64, generator=gen) for _ in range(300)]
    single = calibrated("moving_average", batches, averaging_constant=0.05)
    left = calibrated("moving_average", batches[:100], averaging_constant=0.05)
    right = calibrated("moving_average", batches[100:], averaging_constant=0.05)
    merged = left.merge(right)
    assert merged.batches == 300 and merged.count == single.count
    expected = (100 * left.max_val + 200 * right.max_val) / 300
    torch.testing.assert_close(merged.max_val, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(merged.max_val, single.max_val, rtol=0.05, atol=0)
    torch.testing.assert_close(merged.min_val, single.min_val, rtol=0.05, atol=0)


@pytest.mark.parametrize("kind", observers.names())
def test_merge_with_an_empty_observer_is_a_copy_and_inputs_are_untouched(
    kind: str, gen: torch.Generator
) -> None:
    obs = calibrated(kind, [torch.randn(8, 8, generator=gen)])
    before = copy.deepcopy(obs)
    for merged in (obs.merge(observers.get(kind)), observers.get(kind).merge(obs)):
        assert merged is not obs
        assert_same_state(merged, obs)
    other = calibrated(kind, [torch.randn(8, 8, generator=gen) * 50])
    obs.merge(other)
    assert_same_state(obs, before)


def test_merge_refuses_other_kinds_settings_and_layouts() -> None:
    with pytest.raises(ValueError, match="merge observers of the same kind"):
        observers.get("minmax").merge(observers.get("histogram"))
    with pytest.raises(ValueError, match="different settings"):
        observers.get("percentile", percentile=99.0).merge(observers.get("percentile", percentile=99.9))
    with pytest.raises(ValueError, match="different settings"):
        observers.get("minmax", granularity="channel:0").merge(observers.get("minmax"))
    a = calibrated("minmax", [torch.randn(4, 8)], granularity="channel:0")
    b = calibrated("minmax", [torch.randn(5, 8)], granularity="channel:0")
    with pytest.raises(ValueError, match="different block layouts"):
        a.merge(b)


# --- constant memory -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", observers.names())
def test_state_size_does_not_grow_with_batches(kind: str, gen: torch.Generator) -> None:
    obs = observers.get(kind)
    obs.observe(torch.randn(32, 64, generator=gen))
    size = state_numel(obs)
    for i in range(300):
        # Growing magnitudes force the histograms to rebin; shapes vary where the observer allows it.
        obs.observe(torch.randn(32, 64, generator=gen) * 1.05**i)
        assert state_numel(obs) == size
    assert obs.count == 301 * 32 * 64


def test_per_channel_state_is_one_range_per_channel(gen: torch.Generator) -> None:
    obs = observers.get("minmax", granularity="channel:1")
    for _ in range(50):
        obs.observe(torch.randn(17, 6, 3, generator=gen))
    assert obs.min_val.shape == obs.max_val.shape == (1, 6, 1)


# --- awkward input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", observers.names())
def test_empty_batches_are_ignored_and_no_data_is_a_clear_error(kind: str) -> None:
    obs = observers.get(kind)
    obs.observe(torch.empty(0))
    obs.observe(torch.empty(3, 0))
    assert obs.count == 0
    with pytest.raises(ValueError, match="saw no data"):
        obs.qparams("int8")
    obs.observe(torch.tensor([1.0, -2.0]))
    obs.observe(torch.empty(0, 2))
    assert obs.count == 2


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("kind", observers.names())
def test_non_finite_batches_raise_and_leave_the_state_alone(kind: str, bad: float) -> None:
    obs = observers.get(kind)
    obs.observe(torch.tensor([0.5, -1.0, 2.0]))
    before = copy.deepcopy(obs)
    problem = "1 NaN and 0 Inf" if math.isnan(bad) else "0 NaN and 1 Inf"
    message = f"calibration batch given to the {kind} observer contains {problem}"
    with pytest.raises(ValueError, match=message):
        obs.observe(torch.tensor([1.0, bad, 0.0]))
    assert_same_state(obs, before)


def test_non_tensor_batches_are_a_type_error() -> None:
    with pytest.raises(TypeError, match="expects a torch.Tensor"):
        observers.get("minmax").observe([1.0, 2.0])  # type: ignore[arg-type]


DEGENERATE = {
    "all_zero": torch.zeros(4, 8),
    "constant": torch.full((4, 8), 2.5),
    "negative_constant": torch.full((4, 8), -0.75),
    "single_element": torch.tensor([-3.0]),
    "scalar": torch.tensor(1.5),
    "tiny": torch.full((4, 8), 1e-30),
    "subnormal": torch.tensor([1e-45, -1e-45, 0.0]),
    "huge": torch.tensor([3e38, -3e38, 1.0]),
}


@pytest.mark.parametrize("data", DEGENERATE)
@pytest.mark.parametrize("kind", observers.names())
def test_degenerate_data_gives_finite_params_and_exact_constants(kind: str, data: str) -> None:
    x = DEGENERATE[data]
    obs = observers.get(kind)
    obs.observe(x)
    obs.observe(x.half() if data in ("all_zero", "constant", "negative_constant") else x)
    formats = [("int8", True), ("uint8", False), ("int4", False)]
    if kind != "entropy":
        formats.append(("fp8_e4m3", True))
    for fmt_name, symmetric in formats:
        fmt = F.get(fmt_name)
        qp = obs.qparams(fmt, symmetric)
        assert bool(torch.isfinite(qp.scale).all()) and bool((qp.scale >= EPS).all())
        y = fake_quantize(x, fmt, qp)
        assert not bool(torch.isnan(y).any())
        if data in ("all_zero", "constant", "negative_constant", "single_element", "scalar"):
            # Every observer's range contains the data when all values are equal: exact (int8 constants
            # are the range end, which the affine grid hits up to float rounding).
            torch.testing.assert_close(y, x, rtol=1e-6, atol=0)


def test_per_channel_zero_range_channels_get_the_smallest_scale() -> None:
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -1.0, 0.5]])
    qp = calibrated("minmax", [x], granularity="channel:0").qparams("int8")
    assert torch.equal(qp.scale.reshape(-1), torch.tensor([EPS, 1.0 / 127]))
    assert torch.equal(fake_quantize(x, F.get("int8"), qp)[0], torch.zeros(3))


def test_observers_refuse_formats_that_learn_from_the_data() -> None:
    obs = calibrated("minmax", [torch.randn(4, 4)])
    for name in ("kmeans_4", "quantile_4", "pq", "binary", "ternary", "fp16"):
        with pytest.raises(ValueError, match="use lowbit.primitives.choose_qparams"):
            obs.qparams(name)
    with pytest.raises(ValueError, match="entropy calibration assumes evenly spaced integer levels"):
        calibrated("entropy", [torch.randn(4, 4)]).qparams("fp8_e4m3")


def test_registry_builds_observers_and_rejects_bad_names_and_settings() -> None:
    assert observers.names() == ["minmax", "moving_average", "histogram", "percentile", "mse", "entropy"]
    assert isinstance(observers.get(" MSE "), observers.MSEObserver)
    with pytest.raises(ValueError, match="unknown observer 'kl'; known observers: minmax"):
        observers.get("kl")
    with pytest.raises(ValueError, match="bad settings for the minmax observer"):
        observers.get("minmax", bins=10)
    for kwargs in ({"bins": 1000}, {"bins": 2}):
        with pytest.raises(ValueError, match="bins must be a power of two"):
            observers.get("histogram", **kwargs)
    with pytest.raises(ValueError, match="percentile must be in"):
        observers.get("percentile", percentile=40.0)
    with pytest.raises(ValueError, match="averaging_constant must be in"):
        MovingAverageMinMaxObserver(averaging_constant=0.0)


# --- histogram and the statistics built on it --------------------------------------------------------


def test_histogram_counts_match_numpy_binning_at_the_final_radius(gen: torch.Generator) -> None:
    """Rebinning as the radius grows is exact: the counts equal binning every value at the end."""
    batches = [torch.randn(1000, generator=gen) * 2.0**k for k in range(-4, 6)]
    obs = calibrated("histogram", batches, bins=256)
    values = torch.cat(batches).double()
    radius = obs.radius
    assert radius == 2.0 ** radius_exponent(float(values.abs().max()))
    expected = torch.histc(values, bins=256, min=-radius, max=radius).long()
    # histc closes the last bin on the right; no value reaches +R, so the bins agree exactly.
    assert torch.equal(obs.counts, expected)


def test_coarsen_sums_adjacent_pairs_towards_the_centre() -> None:
    counts = torch.arange(1, 9)
    assert coarsen(counts, 0).tolist() == counts.tolist()
    assert coarsen(counts, 2).tolist() == [0, 0, 0, 10, 26, 0, 0, 0]
    assert int(coarsen(counts, 40).sum()) == int(counts.sum())


def test_percentile_clips_at_most_the_requested_tail_on_each_side() -> None:
    x = torch.linspace(-1.0, 1.0, 100_001)
    for percentile in (99.0, 99.9):
        obs = calibrated("percentile", [x], percentile=percentile)
        qp = obs.qparams("uint8", symmetric=False)
        step = float(qp.scale)
        lo = float(-qp.zero_point) * step
        hi = lo + 255 * step
        # Clipped: further than half a step outside the grid (the rounded zero point shifts the grid
        # by up to half a step, which rounding error already covers).
        clipped = float(((x < lo - step / 2) | (x > hi + step / 2)).double().mean())
        assert clipped <= 2 * (100 - percentile) / 100
        assert float(obs.qparams("int8").scale) * 127 < 1.0  # and it did clip something


def test_entropy_threshold_keeps_a_tail_free_histogram_and_cuts_a_far_outlier() -> None:
    bell = (torch.exp(-((torch.arange(512.0) / 80) ** 2)) * 1000).round()
    last = int(torch.nonzero(bell).max())
    assert best_threshold(bell, 128) == last + 1  # a tail-free bell: nothing worth clipping
    spiked = torch.cat([bell[:64], torch.zeros(447), torch.ones(1)])
    assert best_threshold(spiked, 16) == 64  # one value far out is not worth 447 empty bins


def test_kl_and_quantized_histogram_helpers() -> None:
    p = torch.tensor([4.0, 0.0, 2.0, 2.0])
    assert float(kl_divergence(p, p * 3)) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_divergence(p, torch.tensor([1.0, 0.0, 1.0, 6.0]))) > 0.0
    q = quantized_histogram(torch.tensor([3.0, 1.0, 0.0, 4.0]), torch.tensor([True, True, False, True]), 2)
    assert q.tolist() == [2.0, 2.0, 0.0, 4.0]


def test_histogram_observer_range_is_the_observed_min_and_max(gen: torch.Generator) -> None:
    x = torch.randn(1000, generator=gen) * 3 + 1
    obs = calibrated("histogram", [x])
    minmax = calibrated("minmax", [x])
    for fmt_name, symmetric in [("int8", True), ("uint8", False)]:
        assert torch.equal(
            obs.qparams(fmt_name, symmetric).scale.reshape(-1),
            minmax.qparams(fmt_name, symmetric).scale.reshape(-1),
        )


def test_fp16_and_bf16_batches_accumulate_like_their_float32_values(gen: torch.Generator) -> None:
    x = torch.randn(64, 64, generator=gen) * 5
    for kind in observers.names():
        for dtype in (torch.float16, torch.bfloat16):
            low = calibrated(kind, [x.to(dtype)])
            full = calibrated(kind, [x.to(dtype).float()])
            assert_same_state(low, full)


def test_histogram_block_is_the_first_batch_shape() -> None:
    obs: HistogramObserver = calibrated("histogram", [torch.randn(3, 5), torch.randn(7)])  # type: ignore[assignment]
    assert obs.block == (3, 5)
    assert obs.qparams("int8").scale.shape == (1, 1)
