"""The calibrator-choice range histogram: its bins depend only on the set of values (any batch order, any
split across ranks or resumed runs gives the same counts, exactly), and its amax values match the direct
computations on the same bins."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sensitivity.quant.calibrators import DyadicHistogram, compute_amax_percentile


def _batches(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scales = (0.3, 1.0, 7.0, 0.01, 40.0)  # the top grows several octaves over the batches
    return [torch.randn(500, generator=g) * s for s in scales]


def _filled(batches: list[torch.Tensor]) -> DyadicHistogram:
    h = DyadicHistogram(num_bins=256)
    for b in batches:
        h.collect(b)
    return h


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_counts_do_not_depend_on_order_or_split(seed: int) -> None:
    batches = _batches(seed)
    whole = _filled([torch.cat(batches)])
    forward, backward = _filled(batches), _filled(batches[::-1])
    halves = _filled(batches[::2])
    halves.merge_state(_filled(batches[1::2]).state())
    for other in (forward, backward, halves):
        assert other.exp == whole.exp
        assert torch.equal(other.hist, whole.hist) and torch.equal(other.neg, whole.neg)
    assert whole.hist.sum() == sum(b.numel() for b in batches)


def test_bins_are_floor_of_x_over_the_bin_width() -> None:
    x = torch.tensor([0.0, 0.49, 0.5, 1.0, 3.99, -2.0, 2.5])
    h = _filled([x])
    assert h.top == 4.0  # smallest power of two above max |x| = 3.99
    width = h.top / h.num_bins
    expected = np.bincount(np.floor(np.abs(x.numpy()) / width).astype(int), minlength=h.num_bins)
    assert np.array_equal(h.hist.numpy(), expected)
    assert h.neg.sum() == 1 and h.neg[int(2.0 / width)] == 1


@pytest.mark.parametrize("scale", [1e-3, 1.0, 37.0])
def test_random_values_land_in_floor_bins(scale: float) -> None:
    """200k values against numpy's floor(|x| / width) in float64, with every bin edge and the float just
    below it, on both signs: the integer index the histogram computes (int32) truncates like the formula."""
    gen = torch.Generator().manual_seed(int(scale * 1000))
    x = torch.randn(200_000, generator=gen) * scale
    top = 2.0 ** math.frexp(float(x.abs().max()))[1]
    edges = torch.arange(256, dtype=torch.float32) * (top / 256)  # _filled's 256 bins: exact multiples
    below = torch.nextafter(edges, torch.zeros_like(edges))
    x[: 4 * 256] = torch.cat((edges, -edges, below, -below))
    h = _filled([x])
    assert h.top == top
    index = np.floor(np.abs(x.numpy().astype(np.float64)) / (top / 256)).astype(int)
    assert np.array_equal(h.hist.numpy(), np.bincount(index, minlength=256))
    expected_neg = np.bincount(index[x.numpy() < 0], minlength=256).astype(float)
    expected_neg[0] = 0.0  # negatives in bin 0 count as zeros (the unsigned range saturates them)
    assert np.array_equal(h.neg.numpy(), expected_neg)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 37.0])
def test_non_negative_values_take_the_short_path_to_the_same_bins(scale: float) -> None:
    """A non-negative batch (an input after a ReLU) is binned without the signed layout: the same floor
    bins as numpy's in float64, every edge and the float below it, -0.0 in bin 0, nothing in `neg`; and
    batches of both kinds, one of them subsampled, add up as one signed histogram of them all does."""
    gen = torch.Generator().manual_seed(int(scale * 1000) + 1)
    x = torch.randn(200_000, generator=gen).abs_() * scale
    top = 2.0 ** math.frexp(float(x.max()))[1]
    edges = torch.arange(256, dtype=torch.float32) * (top / 256)
    x[: 2 * 256] = torch.cat((edges, torch.nextafter(edges, torch.zeros_like(edges))))
    x[2 * 256] = -0.0
    h = _filled([x])
    index = np.floor(x.numpy().astype(np.float64) / (top / 256)).astype(int)
    assert np.array_equal(h.hist.numpy(), np.bincount(index, minlength=256))
    assert float(h.neg.abs().sum()) == 0.0
    signed = torch.randn(3000, generator=gen) * scale
    big = torch.rand(3_000_017, generator=gen) * scale  # above HIST_SAMPLE: a weighted subsample
    mixed = _filled([x, signed, big])
    one_signed = DyadicHistogram(num_bins=256)
    one_signed.collect(signed)
    one_signed.merge_state(_filled([x]).state())
    one_signed.merge_state(_filled([big]).state())
    assert mixed.exp == one_signed.exp
    assert torch.equal(mixed.hist, one_signed.hist) and torch.equal(mixed.neg, one_signed.neg)


def test_zeros_first_then_values() -> None:
    h = _filled([torch.zeros(10), torch.tensor([1.5, -0.25])])
    assert h.hist[0] == 10 and h.hist.sum() == 12 and h.top == 2.0
    only_zeros = _filled([torch.zeros(3)])
    assert float(only_zeros.amax_by("percentile", 99.0)) == 0.0


def test_amax_matches_the_formulas_on_its_bins() -> None:
    batches = _batches(0)
    h = _filled(batches)
    edges = np.linspace(0.0, h.top, h.num_bins + 1).astype(np.float32)
    for p in (99.0, 99.9, 99.99):
        direct = compute_amax_percentile(h.hist.numpy(), edges, p)
        assert float(h.amax_by("percentile", p)) == float(direct)
        # pytorch-quantization's rule: the left edge of the bin where the float CDF reaches p, which
        # rounding can push on to the next non-empty bin: between the sample quantile's bin and the next value
        values = torch.cat(batches).abs().sort().values
        k = math.ceil(p / 100 * len(values)) - 1
        upper = float(values[min(k + 1, len(values) - 1)])
        assert float(values[k]) - h.top / h.num_bins <= float(direct) <= upper
    assert float(h.amax_by("max")) == pytest.approx(float(torch.cat(batches).abs().max()))
    mse = float(h.amax_by("mse"))
    assert 0 < mse <= h.top and math.isfinite(mse)


def test_unsigned_counts_negative_values_at_zero() -> None:
    x = torch.cat([torch.linspace(0, 1, 101), -torch.linspace(0.5, 8, 100)])
    h = _filled([x])
    # unsigned: the 100 negative values saturate to code 0, so the 99th percentile is inside [0, 1]
    assert float(h.amax_by("percentile", 99.0, unsigned=True)) <= 1.0
    assert float(h.amax_by("percentile", 99.0, unsigned=False)) > 7.0


def test_bad_bins_and_mismatched_merges_are_refused() -> None:
    with pytest.raises(ValueError, match="power of two"):
        DyadicHistogram(num_bins=1000)
    with pytest.raises(ValueError, match="number of bins"):
        DyadicHistogram(num_bins=64).merge_state(DyadicHistogram(num_bins=128).state())


def test_amax_values_follow_new_counts() -> None:
    """The amax values are kept between calls, and forgotten by anything that changes the counts."""
    h = _filled([torch.linspace(-1, 1, 1001)])
    first = float(h.amax_by("percentile", 50.0))
    assert float(h.amax_by("percentile", 50.0)) == first
    h.collect(torch.full((5000,), 0.9))
    assert float(h.amax_by("percentile", 50.0)) > first
    grown = float(h.amax_by("mse"))
    other = _filled([torch.full((100000,), 30.0)])
    h.merge_state(other.state())
    assert float(h.amax_by("mse")) > grown


def test_mse_on_grouped_bins_matches_the_full_search_closely() -> None:
    """`mse` searches 512 grouped bins (exact sums of nested bins), every second centre: its range is
    within a few of the 4096-bin search's bin widths, for 128x less work."""
    from sensitivity.quant.calibrators import compute_amax_mse

    x = torch.cat([torch.randn(20000), torch.randn(50) * 30])
    h = DyadicHistogram()
    h.collect(x)
    edges = np.linspace(0.0, h.top, h.num_bins + 1).astype(np.float32)
    full = float(compute_amax_mse(h.hist.numpy(), edges, 8, False))
    assert abs(float(h.amax_by("mse")) - full) <= 4 * h.top / 512


def test_large_tensors_are_binned_from_a_weighted_prime_stride_subsample() -> None:
    from sensitivity.quant.calibrators.sample import HIST_SAMPLE, sampled

    small = torch.randn(1000)
    values, weight = sampled(small)
    assert weight == 1.0 and values.numel() == 1000
    big = torch.randn(8, 96, 56, 56)  # 2.4M values: step 3
    values, weight = sampled(big)
    step = int(weight)
    assert step == 3 and all(step % d for d in range(2, step))
    assert torch.equal(values, big.reshape(-1)[::step]) and values.numel() <= HIST_SAMPLE
    h = DyadicHistogram()
    h.collect(big)
    assert float(h.hist.sum()) == pytest.approx(big.numel(), rel=1e-5)  # counts stand for every value
    assert h.max == float(big.abs().max())  # the max is never subsampled


@pytest.mark.parametrize("tail", ["gaussian", "outliers"])
def test_subsampled_ranges_match_the_full_histogram(tail: str) -> None:
    """Percentile and mse ranges from the subsample within 2% of those from every value (4.2M values, 4x
    the sample): the tail keeps about 100 sampled values above the 99.99th percentile per batch."""
    from sensitivity.quant.calibrators import sample

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, 64, 64, 64, generator=gen)
    if tail == "outliers":
        x[:, 3] *= 20.0
    full, part = DyadicHistogram(), DyadicHistogram()
    part.collect(x)
    limit = sample.HIST_SAMPLE
    try:
        sample.HIST_SAMPLE = x.numel()
        full.collect(x)
    finally:
        sample.HIST_SAMPLE = limit
    for method in ("percentile", "mse"):
        a, b = float(full.amax_by(method)), float(part.amax_by(method))
        assert b == pytest.approx(a, rel=0.02), method
