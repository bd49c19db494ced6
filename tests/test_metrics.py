"""ErrorStats against direct torch reductions (float64), merging, and the non-finite conventions."""

from __future__ import annotations

import math

import pytest
import torch

from sensitivity.metrics import ErrorStats


def _direct(ref: torch.Tensor, test: torch.Tensor) -> dict[str, float]:
    r, t = ref.double(), test.double()
    d = t - r
    return {
        "l1": d.abs().mean().item(),
        "rel_l1": (d.abs().sum() / r.abs().sum()).item(),
        "mse": (d * d).mean().item(),
        "sqnr_db": (10 * torch.log10((r * r).sum() / (d * d).sum())).item(),
        "cosine": torch.nn.functional.cosine_similarity(r.flatten(), t.flatten(), dim=0).item(),
        "max_abs": d.abs().max().item(),
    }


def test_metrics_match_direct_reductions() -> None:
    ref = torch.randn(4, 8, 5, 5)
    test = ref + 0.05 * torch.randn_like(ref)
    s = ErrorStats()
    s.update(ref, test)
    got = s.metrics()
    for key, want in _direct(ref, test).items():
        # float32 single-pass reductions (pairwise summation) against float64 sums: 1e-6 relative
        assert got[key] == pytest.approx(want, rel=1e-6), key
    assert got["nonfinite"] == 0


def test_merge_over_batches_equals_one_pass() -> None:
    refs = [torch.randn(3, 7) for _ in range(5)]
    tests = [r + 0.1 * torch.randn_like(r) for r in refs]
    merged = ErrorStats()
    for r, t in zip(refs, tests, strict=True):
        part = ErrorStats()
        part.update(r, t)
        merged.merge(part)
    whole = ErrorStats()
    whole.update(torch.cat(refs), torch.cat(tests))
    for key, value in whole.metrics().items():
        # per-batch float32 sums vs one float32 sum: equal to float32 summation error
        assert merged.metrics()[key] == pytest.approx(value, rel=1e-6)
    assert ErrorStats.from_tensor(merged.to_tensor()) == merged


def test_overflowing_float32_sums_fall_back_to_float64() -> None:
    ref = torch.full((1000,), 3e37)
    test = ref * 1.01
    s = ErrorStats()
    s.update(ref, test)  # sum of squares overflows float32: redone in float64, nothing lost
    assert s.nonfinite == 0
    assert s.metrics()["rel_l1"] == pytest.approx(0.01, rel=1e-5)


def test_nonfinite_counted_and_left_out_of_sums() -> None:
    ref = torch.ones(10)
    test = torch.ones(10) * 1.1
    test[2] = float("nan")
    test[5] = float("inf")
    s = ErrorStats()
    s.update(ref, test)
    m = s.metrics()
    assert m["nonfinite"] == 2
    assert m["l1"] == pytest.approx(0.1, rel=1e-6)


def test_exact_match_conventions() -> None:
    x = torch.randn(20)
    s = ErrorStats()
    s.update(x, x.clone())
    m = s.metrics()
    assert m["sqnr_db"] == math.inf
    assert m["rel_l1"] == 0.0
    assert m["cosine"] == pytest.approx(1.0)
    assert math.isnan(ErrorStats().metrics()["l1"])


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        ErrorStats().update(torch.zeros(3), torch.zeros(4))


@pytest.mark.parametrize(
    "shape",
    [(8, 96, 112, 112), (4, 16, 160, 160), (3, 4097), (1, 4095), (2, 3)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_sums_stay_exact_to_float32_on_large_activations(shape: tuple[int, ...]) -> None:
    """An expanded activation (9.6M values) and its siblings: the sums within 2e-6 of float64 however large
    the tensor (float32 rows of 4096 values: about 1e-7 each, added in float64). torch's one-pass float32 L1
    norm was 4e-4 off on the largest, its dot product of the difference 9e-6 (the MSE); a row's remainder
    and tensors shorter than two rows take the other branch."""
    g = torch.Generator().manual_seed(sum(shape))
    ref = torch.randn(shape, generator=g).relu_().mul_(3.0)
    test = ref + 0.01 * torch.randn(shape, generator=g)
    s = ErrorStats()
    s.update(ref, test)
    want = _direct(ref, test)
    r = ref.double()
    assert s.sum_abs_ref == pytest.approx(r.abs().sum().item(), rel=2e-6)
    assert s.sum_sq_ref == pytest.approx((r * r).sum().item(), rel=2e-6)
    for key in ("rel_l1", "mse", "sqnr_db"):
        assert s.metrics()[key] == pytest.approx(want[key], rel=2e-6), key
