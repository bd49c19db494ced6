"""`percentile` calibration: the amax below which a given share of |x| lies, from the histogram."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["compute_amax_percentile"]


def compute_amax_percentile(hist: np.ndarray, edges: np.ndarray, percentile: float) -> torch.Tensor:
    """The left edge of the bin where the CDF reaches `percentile` %, as pytorch-quantization computes it."""
    hist = np.asarray(hist, dtype=np.float64)
    cdf = np.cumsum(hist / hist.sum())
    idx = int(np.searchsorted(cdf, percentile / 100))
    return torch.tensor(float(edges[min(idx, len(edges) - 1)]), dtype=torch.float32)
