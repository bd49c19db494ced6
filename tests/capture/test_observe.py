"""`LayerObserver`: the input statistics of one layer, against torch reductions (exact)."""

from __future__ import annotations

import torch

from sensitivity.capture.observe import LayerObserver, RangeHistogram
from sensitivity.spec import QuantSpec


def _batches(signed: bool = True) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 5, 6, 6, generator=g) * (i + 1) for i in range(3)]
    return xs if signed else [x.relu() for x in xs]


def test_statistics_equal_torch_reductions() -> None:
    obs = LayerObserver(QuantSpec(), channel_axis=1)
    xs = _batches()
    for x in xs:
        obs.observe(x)
    allx = torch.cat(xs)
    assert obs.batches == 3 and obs.min_value == float(allx.min()) and obs.max_abs == float(allx.abs().max())
    assert torch.equal(obs.chan_absmax, allx.abs().amax(dim=(0, 2, 3)))
    assert torch.equal(obs.amax(), allx.abs().max().float())


def test_unsigned_only_with_auto_and_a_never_negative_input() -> None:
    signed, auto = LayerObserver(QuantSpec(), 1), LayerObserver(QuantSpec(act_sign="auto"), 1)
    for x in _batches(signed=False):
        signed.observe(x)
        auto.observe(x)
    assert not signed.unsigned() and auto.unsigned()
    auto.observe(-torch.ones(1, 5, 2, 2))
    assert not auto.unsigned()


def test_merging_equals_observing_everything() -> None:
    spec = QuantSpec(calibrator="percentile")
    xs = _batches()
    one = LayerObserver(spec, 1, hist_range=20.0)
    a, b = LayerObserver(spec, 1, hist_range=20.0), LayerObserver(spec, 1, hist_range=20.0)
    for x in xs:
        one.observe(x)
    a.observe(xs[0])
    b.observe(xs[1])
    b.observe(xs[2])
    a.merge(b)
    assert (
        a.batches == one.batches
        and a.min_value == one.min_value
        and torch.equal(a.chan_absmax, one.chan_absmax)
    )
    assert torch.equal(a.amax(), one.amax())


def test_range_histogram_counts_everything_with_outliers_at_the_edges() -> None:
    h = RangeHistogram(-1.0, 1.0, bins=4)
    h.update(torch.tensor([-5.0, -0.9, 0.1, 0.9, 7.0, float("nan")]))
    assert h.counts.tolist() == [2.0, 0.0, 1.0, 2.0]
