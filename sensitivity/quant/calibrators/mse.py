"""`mse` calibration: the amax whose fake quantization of the histogram's bin centres has the least
count-weighted squared error, scored with this toolkit's own (ONNX-rounding) fake quantizer."""

from __future__ import annotations

import numpy as np
import torch

from sensitivity.quant.calibrators.base import BLOCK_ELEMS
from sensitivity.quant.fake import amax_to_scale, fake_quant

__all__ = ["compute_amax_mse"]


def compute_amax_mse(
    hist: np.ndarray,
    edges: np.ndarray,
    num_bits: int,
    unsigned: bool,
    *,
    start_bin: int = 128,
    stride: int = 1,
) -> torch.Tensor:
    """The bin centre that minimises the count-weighted squared error of fake-quantizing the bin centres.

    Candidates and tie-breaking follow pytorch-quantization's `_compute_amax_mse` (centres from
    `start_bin` on, first minimum), but each candidate is scored with this toolkit's fake quantizer (ONNX
    rounding, full int range), all candidates at once; pytorch-quantization's version needs CUDA.
    """
    counts = torch.as_tensor(np.asarray(hist, dtype=np.float64))
    e = torch.as_tensor(np.asarray(edges, dtype=np.float32))
    n = min(counts.numel(), e.numel() - 1)
    counts = counts[:n]
    centres = (e[1 : n + 1] + e[:n]) / 2
    cand = torch.arange(min(start_bin, n - 1), n, stride)
    if cand.numel() == 0:
        return centres[-1].clone()
    mse = torch.empty(cand.numel(), dtype=torch.float64)
    rows = max(1, BLOCK_ELEMS // n)
    for lo in range(0, cand.numel(), rows):
        amax = centres[cand[lo : lo + rows]]
        scale = amax_to_scale(amax, num_bits, unsigned)[:, None]
        xq = fake_quant(centres.expand(amax.numel(), n), scale, num_bits, unsigned)
        err = (xq - centres).double()
        mse[lo : lo + rows] = (err * err * counts).sum(dim=1)
    return centres[cand[int(torch.argmin(mse))]].clone()
