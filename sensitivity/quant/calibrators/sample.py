"""A strided subsample of a large tensor for the histograms that only need its distribution.

Why: binning is several full sweeps of a tensor (scale, integer index, bincount); on an edge model's
expanded activations (10M values a layer per batch) it cost more than the layer's convolution. About 2^20
values a call keep the histograms' shape (the 99.99th percentile still has about 100 values above it per
batch) at a tenth of the cost. The step is prime, so it does not alias with a channel, row or image
period, and it depends only on the size: every rank and every run takes the same values. Counts are
weighted by the step, so batches of different sizes still add up in proportion.
"""

from __future__ import annotations

import math

import torch

__all__ = ["HIST_SAMPLE", "sampled"]

#: values binned per call at most (about; the step is rounded up to a prime)
HIST_SAMPLE = 1 << 20


def _prime_at_least(n: int) -> int:
    def prime(k: int) -> bool:
        return k >= 2 and all(k % d for d in range(2, math.isqrt(k) + 1))

    while not prime(n):
        n += 1
    return n


def sampled(x: torch.Tensor, limit: int | None = None) -> tuple[torch.Tensor, float]:
    """(values, weight): `x` flattened, every `step`-th value where it has more than `limit` (the weight
    is then the step: each kept value stands for `step` values), else all of it with weight 1."""
    limit = HIST_SAMPLE if limit is None else limit
    flat = x.reshape(-1)
    if flat.numel() <= limit:
        return flat, 1.0
    step = _prime_at_least(math.ceil(flat.numel() / limit))
    return flat[::step], float(step)
