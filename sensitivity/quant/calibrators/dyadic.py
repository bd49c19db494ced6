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
from sensitivity.quant.calibrators.sample import sampled

__all__ = ["DyadicHistogram"]

#: no top yet (only zeros seen, or nothing)
_NO_TOP = -(2**31)
#: `mse` searches this many bins (groups of nested bins added: exact), every second bin centre from the
#: 64th a candidate: its candidates x bins grid is what it costs (128x less than every centre of 4096 bins,
#: about 1 ms a layer) for a range chosen to within 1/256 of the top
_MSE_BINS = 512


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
        self._amax: dict[tuple[str, float | None, bool], torch.Tensor] = {}  # cleared by any new count

    @property
    def top(self) -> float:
        return math.ldexp(1.0, self.exp) if self.exp != _NO_TOP else 0.0

    def collect(self, x: torch.Tensor, bounds: tuple[float, float] | None = None) -> None:
        """One signed bincount per batch: the index trunc(x · n / 2^k) (toward zero) puts x and -x in the
        same |x| bin; the negative side is also kept apart (`neg`, for the unsigned range). Negative values
        in bin 0 count as positives there: for the unsigned range they saturate to 0 either way. `bounds`:
        x's (min, max) where the caller has them already (saves a pass over x). Large tensors are binned
        from a strided subsample (`sampled`); their max and the top always come from every value."""
        if x.numel() == 0:
            return
        with torch.no_grad():
            x = x.detach().float().reshape(-1)
            lo, hi = bounds if bounds is not None else (float(v) for v in torch.aminmax(x))
            top = max(-float(lo), float(hi))
            if not math.isfinite(top):
                raise FPModelError(f"calibration activations are not finite (max |x| = {top})")
            self.max = max(self.max, top)
            self._amax.clear()
            if top == 0.0 and self.exp == _NO_TOP:
                self.zeros += float(x.numel())
                return
            self.grow_to(math.frexp(top)[1])  # top < 2^e
            n = self.num_bins
            scale = math.ldexp(1.0, int(math.log2(n)) - self.exp)  # n / 2^k, a power of two: exact
            values, weight = sampled(x)
            # int32 (|values · scale| < n): truncates toward zero like int64, at half the memory traffic;
            # bincount on it ran 2x faster here. No clamp: the top is finite and above every |value| and the
            # scale a power of two, so the index lies in [0, 2n - 2] exactly (were it not, bincount would
            # refuse a negative index and a longer count would not add to the bins: loud, never wrong)
            index = (values * scale).to(torch.int32)
            if lo >= 0:  # no negative value (an input after a ReLU): the |x| bins are the index itself, and
                # the signed layout below would add zeros (a sweep and four small ops less a call)
                counts = torch.bincount(index, minlength=n).double().cpu()
                self.hist += counts * weight if weight != 1.0 else counts
                return
            counts = torch.bincount(index.add_(n - 1), minlength=2 * n - 1).double().cpu()
            if weight != 1.0:
                counts *= weight
            negative = counts[: n - 1].flip(0)  # |x| bins 1 .. n-1 of the negative values
            self.hist += counts[n - 1 :]
            self.hist[1:] += negative
            self.neg[1:] += negative

    def changed(self) -> None:
        """Forget the amax values computed so far (the counts were changed from outside, e.g. all-reduced)."""
        self._amax.clear()

    def grow_to(self, exp: int) -> None:
        """Raise the top to 2^exp (never lowers it): pairs of bins merge, exactly."""
        self._amax.clear()
        if self.exp == _NO_TOP:
            self.exp = exp
            self.hist[0] += self.zeros
            self.zeros = 0.0
            return
        pad = torch.zeros(self.num_bins // 2, dtype=torch.float64)
        while self.exp < exp:
            self.hist = torch.cat((self.hist.view(-1, 2).sum(1), pad))
            self.neg = torch.cat((self.neg.view(-1, 2).sum(1), pad))
            self.neg[0] = 0.0  # negatives in bin 0 count as zeros: the unsigned range saturates them to 0
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
        key = (method, percentile, unsigned)
        if key not in self._amax:
            self._amax[key] = self._amax_of(method, percentile, unsigned)
        return self._amax[key].clone()

    def _amax_of(self, method: str, percentile: float | None, unsigned: bool) -> torch.Tensor:
        hist = self.hist.clone()
        if unsigned:
            hist -= self.neg
            hist[0] += float(self.neg.sum())
        if method == "mse" and self.num_bins > _MSE_BINS:
            hist = hist.view(_MSE_BINS, -1).sum(1)
        edges = torch.linspace(0.0, self.top, hist.numel() + 1, dtype=torch.float64).float()
        h, e = hist.numpy(), edges.numpy()
        if method == "percentile":
            return compute_amax_percentile(h, e, 99.99 if percentile is None else percentile)
        if method == "mse":
            return compute_amax_mse(h, e, self.num_bits, unsigned, start_bin=64, stride=2)
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
        self.changed()
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
        self._amax.clear()
        self.grow_to(top)
        theirs.grow_to(top)
        self.hist += theirs.hist
        self.neg += theirs.neg
