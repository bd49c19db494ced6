"""A histogram of |x| on [0, 2^k) whose bins nest: the range behind the per-layer calibrator choice.

Why not `HistogramCalibrator`: its growing range (pytorch-quantization's) depends on the order of the
batches, so histograms of different ranks or runs only merge approximately. Here the top is the smallest
power of two above every value seen and the bin index is floor(x · n / 2^k), exact in float arithmetic (a
power-of-two scale). When the top doubles, bins 2j and 2j+1 become bin j, which is exactly the histogram
of the same values binned at the new top. So the histogram depends only on the set of values: ranks
all-reduce it exactly (max the exponent, grow, sum), and a resumed calibration adds up exactly. With
`num_bins` = 4096 the values' max spans more than 2048 bins (pytorch-quantization's default resolution).
"""

from __future__ import annotations

import math

import torch

from sensitivity.errors import FPModelError
from sensitivity.quant.calibrators.base import NothingCollectedError
from sensitivity.quant.calibrators.mse import compute_amax_mse
from sensitivity.quant.calibrators.percentile import compute_amax_percentile

__all__ = ["DyadicHistogram"]

#: no top yet (only zeros seen, or nothing)
_NO_TOP = -(2**31)


class DyadicHistogram:
    """|x| (or max(x, 0) for the unsigned code range, computed from the same bins: see `amax_by`)."""

    def __init__(self, num_bits: int = 8, num_bins: int = 4096) -> None:
        if num_bins < 2 or num_bins & (num_bins - 1):
            raise ValueError(f"num_bins must be a power of two >= 2, got {num_bins!r}")
        self.num_bits, self.num_bins = num_bits, num_bins
        self.reset()

    def reset(self) -> None:
        self.exp = _NO_TOP  # top = 2^exp
        self.hist = torch.zeros(self.num_bins, dtype=torch.float64)  # |x| counts
        self.neg = torch.zeros(self.num_bins, dtype=torch.float64)  # counts of the negative values alone
        self.zeros = 0.0  # values seen while no top exists (all zero so far)
        self.max = 0.0

    @property
    def top(self) -> float:
        return math.ldexp(1.0, self.exp) if self.exp != _NO_TOP else 0.0

    def collect(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        with torch.no_grad():
            x = x.detach().float().reshape(-1)
            a = x.abs()
            top = float(a.max())
            if not math.isfinite(top):
                raise FPModelError(f"calibration activations are not finite (max |x| = {top})")
            self.max = max(self.max, top)
            if top == 0.0 and self.exp == _NO_TOP:
                self.zeros += float(x.numel())
                return
            self.grow_to(math.frexp(top)[1])  # top < 2^e
            scale = math.ldexp(1.0, int(math.log2(self.num_bins)) - self.exp)  # n / 2^k, a power of two
            index = (a * scale).long().clamp_(max=self.num_bins - 1).cpu()
            self.hist += torch.bincount(index, minlength=self.num_bins).double()
            negative = index[(x < 0).cpu()]
            if negative.numel():
                self.neg += torch.bincount(negative, minlength=self.num_bins).double()

    def grow_to(self, exp: int) -> None:
        """Raise the top to 2^exp (never lowers it): pairs of bins merge, exactly."""
        if self.exp == _NO_TOP:
            self.exp = exp
            self.hist[0] += self.zeros
            self.zeros = 0.0
            return
        pad = torch.zeros(self.num_bins // 2, dtype=torch.float64)
        while self.exp < exp:
            self.hist = torch.cat((self.hist.view(-1, 2).sum(1), pad))
            self.neg = torch.cat((self.neg.view(-1, 2).sum(1), pad))
            self.exp += 1

    def amax_by(self, method: str, percentile: float | None = None, unsigned: bool = False) -> torch.Tensor:
        """The amax of `max`, `percentile` (at `percentile`) or `mse`, for the signed code range (|x|) or
        the unsigned one (negative values clip to zero: their bins count at zero)."""
        if self.exp == _NO_TOP:
            if self.zeros > 0:
                return torch.tensor(0.0)
            raise NothingCollectedError("the range histogram received no activations")
        if method == "max":
            return torch.tensor(self.max, dtype=torch.float32)
        hist = self.hist.clone()
        if unsigned:
            hist -= self.neg
            hist[0] += float(self.neg.sum())
        edges = torch.linspace(0.0, self.top, self.num_bins + 1, dtype=torch.float64).float()
        h, e = hist.numpy(), edges.numpy()
        if method == "percentile":
            return compute_amax_percentile(h, e, 99.99 if percentile is None else percentile)
        if method == "mse":
            return compute_amax_mse(h, e, self.num_bits, unsigned)
        raise ValueError(f"unknown range histogram method {method!r}")

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "exp": torch.tensor(self.exp, dtype=torch.int64),
            "hist": self.hist.clone(),
            "neg": self.neg.clone(),
            "zeros": torch.tensor(self.zeros, dtype=torch.float64),
            "max": torch.tensor(self.max, dtype=torch.float64),
        }

    def merge_state(self, other: dict[str, torch.Tensor]) -> None:
        """Add another histogram of the same bins count: exact whatever the two tops."""
        hist, neg = other["hist"].double().cpu(), other["neg"].double().cpu()
        if hist.shape != self.hist.shape:
            raise ValueError("merge_state: the other range histogram has a different number of bins")
        self.max = max(self.max, float(other["max"]))
        exp = int(other["exp"])
        if exp == _NO_TOP:
            self.zeros += float(other["zeros"])
            if self.exp != _NO_TOP:
                self.hist[0] += self.zeros
                self.zeros = 0.0
            return
        theirs = DyadicHistogram(self.num_bits, self.num_bins)
        theirs.exp, theirs.hist, theirs.neg, theirs.zeros = exp, hist.clone(), neg.clone(), 0.0
        theirs.hist[0] += float(other["zeros"])
        top = max(self.exp, exp)
        self.grow_to(top)
        theirs.grow_to(top)
        self.hist += theirs.hist
        self.neg += theirs.neg
