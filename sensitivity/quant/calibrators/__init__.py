"""Calibrators: turn the activations a layer sees during calibration into one amax, one file each.

Four methods, as in pytorch-quantization 2.1.3: `max` (torch.ao's MinMaxObserver), and `percentile`,
`entropy`, `mse` chosen from a histogram of |x| (of max(x, 0) when unsigned: negative inputs saturate to
code 0, so they count as zeros) that reproduces pytorch-quantization's `HistogramCalibrator` binning
exactly, so the amax values match it. `DyadicHistogram` holds the range behind the per-layer calibrator
choice (nested power-of-two bins: merges exactly across ranks and resumed runs).
"""

from __future__ import annotations

from sensitivity.quant.calibrators.base import Calibrator, NothingCollectedError, ReduceOp
from sensitivity.quant.calibrators.dyadic import DyadicHistogram
from sensitivity.quant.calibrators.entropy import compute_amax_entropy
from sensitivity.quant.calibrators.histogram import HistogramCalibrator
from sensitivity.quant.calibrators.max import MaxCalibrator
from sensitivity.quant.calibrators.mse import compute_amax_mse
from sensitivity.quant.calibrators.percentile import compute_amax_percentile
from sensitivity.spec import CALIBRATORS

__all__ = [
    "Calibrator",
    "DyadicHistogram",
    "HistogramCalibrator",
    "MaxCalibrator",
    "NothingCollectedError",
    "ReduceOp",
    "compute_amax_entropy",
    "compute_amax_mse",
    "compute_amax_percentile",
    "make_calibrator",
]


def make_calibrator(
    method: str,
    num_bits: int,
    unsigned: bool,
    *,
    percentile: float = 99.99,
    num_bins: int = 2048,
    hist_range: float | None = None,
) -> Calibrator:
    """A fresh calibrator for `method` (one of `CALIBRATORS`: max, percentile, entropy, mse).

    `hist_range` fixes the histogram range (see `HistogramCalibrator`) so that ranks can sum histograms.
    """
    if method not in CALIBRATORS:
        raise ValueError(f"unknown calibrator {method!r}; choose one of {', '.join(CALIBRATORS)}")
    if method == "max":
        return MaxCalibrator(num_bits, unsigned)
    return HistogramCalibrator(
        method, num_bits, unsigned, percentile=percentile, num_bins=num_bins, hist_range=hist_range
    )
