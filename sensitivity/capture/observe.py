"""Per-layer input statistics gathered in the calibration pass: amax calibrator, sign, channel maxima."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from sensitivity.capture.outputs import all_finite
from sensitivity.quant.calibrators import Calibrator, DyadicHistogram, make_calibrator
from sensitivity.quant.calibrators.sample import sampled
from sensitivity.quant.registry import input_channel_axis
from sensitivity.spec import QuantSpec

__all__ = ["LayerObserver", "RangeHistogram", "channel_dim"]


def channel_dim(module: nn.Module) -> int:
    """Input-channel axis of a layer's input: last for Linear and for spconv features [N_active, C],
    1 for dense (N, C, ...) convs."""
    return input_channel_axis(module)


@dataclass
class LayerObserver:
    """Streams one layer's inputs: the activation calibrator, the minimum, and per-channel max |x|."""

    spec: QuantSpec
    channel_axis: int
    calibrator: Calibrator = field(init=False)
    min_value: float = math.inf
    max_abs: float = 0.0
    chan_absmax: torch.Tensor | None = None
    batches: int = 0
    #: set for convs scanned with im2col SmoothQuant: per-column max |X_unf| is tracked too (k x the cost)
    col_module: nn.Module | None = None
    col_absmax: torch.Tensor | None = None
    #: a fixed histogram range (distributed runs: histograms must add up across ranks)
    hist_range: float | None = None
    #: keep a histogram of |x| too, from which every `CALIBRATOR_CHOICES` range is computed per layer
    choices: bool = False
    range_hist: DyadicHistogram | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.calibrator = self.new_calibrator()
        if self.choices:
            self.range_hist = DyadicHistogram(self.spec.a_bits)

    def new_calibrator(self, unsigned: bool = False) -> Calibrator:
        """An empty calibrator of this observer's configuration (merge a state into it to copy one)."""
        return make_calibrator(
            self.spec.calibrator,
            self.spec.a_bits,
            unsigned,
            percentile=self.spec.percentile,
            num_bins=self.spec.num_bins,
            hist_range=self.hist_range,
        )

    def observe(self, x: torch.Tensor) -> None:
        """Two reductions per batch (per-channel min and max, no |x| copy); the max calibrator is fed the
        batch's [min, max] (its amax only depends on those), histogram calibrators the tensor itself."""
        x = x.detach()
        self.batches += 1
        axis = self.channel_axis % x.dim()
        dims = [d for d in range(x.dim()) if d != axis]
        if dims:
            cmin, cmax = x.amin(dim=dims), x.amax(dim=dims)
        else:
            cmin = cmax = x
        mn, mx = cmin.min(), cmax.max()
        self.calibrator.collect(torch.stack((mn, mx)) if self.spec.calibrator == "max" else x)
        if self.range_hist is not None and math.isfinite(float(mn)) and math.isfinite(float(mx)):
            self.range_hist.collect(x, (float(mn), float(mx)))  # non-finite: the FP model's check names them
        self.min_value = min(self.min_value, float(mn))
        self.max_abs = max(self.max_abs, abs(float(mn)), abs(float(mx)))
        chan = torch.maximum(cmax, -cmin).float().cpu()
        self.chan_absmax = chan if self.chan_absmax is None else torch.maximum(self.chan_absmax, chan)
        if self.col_module is not None:
            from sensitivity.methods.im2col import im2col_column_absmax

            col = im2col_column_absmax(self.col_module, x).cpu()
            self.col_absmax = col if self.col_absmax is None else torch.maximum(self.col_absmax, col)

    @property
    def nonnegative(self) -> bool:
        return self.batches > 0 and self.min_value >= 0.0

    def unsigned(self) -> bool:
        """Unsigned activation codes: only with act_sign=auto and an input never seen negative."""
        return self.spec.act_sign == "auto" and self.nonnegative

    def amax(self, unsigned: bool | None = None) -> torch.Tensor:
        """Calibrated activation amax for the signed (default) or unsigned code range."""
        unsigned = self.unsigned() if unsigned is None else unsigned
        if not unsigned or self.spec.calibrator == "max":
            return self.calibrator.compute_amax()
        twin = self.new_calibrator(unsigned=True)  # same range as the source, so the copy is exact
        twin.merge_state(self.calibrator.state())
        return twin.compute_amax()

    def calibrator_amax(self, choice: str, unsigned: bool | None = None) -> torch.Tensor:
        """The activation amax of a per-layer calibrator choice (`max`, `p99.99`, `mse`, ...), for the
        signed or unsigned code range; the spec's own choice is exactly `amax()`."""
        unsigned = self.unsigned() if unsigned is None else unsigned
        if choice == self.spec.calibrator_choice:
            return self.amax(unsigned)
        if choice == "max":
            return torch.tensor(self.max_abs, dtype=torch.float32)
        if self.range_hist is None:
            raise ValueError(
                f"calibrator {choice!r} needs the range histogram (observer built without choices)"
            )
        if choice.startswith("p"):
            return self.range_hist.amax_by("percentile", float(choice[1:]), unsigned)
        return self.range_hist.amax_by(choice, None, unsigned)

    def merge(self, other: LayerObserver) -> None:
        """Fold in another observer of the same layer (e.g. the held-out batches seen on another rank)."""
        if other.batches == 0:
            return
        self.batches += other.batches
        self.min_value = min(self.min_value, other.min_value)
        self.max_abs = max(self.max_abs, other.max_abs)
        for attr in ("chan_absmax", "col_absmax"):
            mine, theirs = getattr(self, attr), getattr(other, attr)
            if theirs is not None:
                setattr(self, attr, theirs.clone() if mine is None else torch.maximum(mine, theirs))
        self.calibrator.merge_state(other.calibrator.state())
        if self.range_hist is not None and other.range_hist is not None:
            self.range_hist.merge_state(other.range_hist.state())

    def outlier_ratio(self) -> float:
        """max / median of the per-channel max |x|: how far the worst channel stands out."""
        if self.chan_absmax is None or self.chan_absmax.numel() == 0:
            return float("nan")
        med = float(self.chan_absmax.median())
        mx = float(self.chan_absmax.max())
        return mx / med if med > 0 else (math.inf if mx > 0 else 1.0)


class RangeHistogram:
    """Counts over a fixed [lo, hi] range (values beyond it land in the edge bins): what the report plots.

    The range comes from the fitting batches, so the held-out batches' excursions show as edge mass. Large
    tensors are counted from a strided subsample, weighted (128 bins of a plot need the shape, not every
    value; 2^18 values a call keep edge masses down to about 4e-6 of the values visible)."""

    #: values counted per call at most
    sample = 1 << 18

    def __init__(self, lo: float, hi: float, bins: int = 128) -> None:
        if not hi > lo:
            lo, hi = lo - 1.0, hi + 1.0
        self.lo, self.hi, self.bins = float(lo), float(hi), int(bins)
        self.counts = torch.zeros(self.bins, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        x, weight = sampled(x.detach(), limit=self.sample)
        x = x.float()
        if not all_finite(x):
            x = x[torch.isfinite(x)]
        # one bincount (torch.histc is single-threaded and 3x slower): bin floor((x - lo) / width), clamped;
        # int32 indices (the bins fit): half the memory traffic of int64, the same counts
        index = (x - self.lo).mul_(self.bins / (self.hi - self.lo)).clamp_(0, self.bins - 1).to(torch.int32)
        self.counts += torch.bincount(index, minlength=self.bins).double().cpu() * weight
