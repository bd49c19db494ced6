"""`entropy` calibration (TensorRT's KL divergence): the threshold whose quantized histogram stays closest
to the original, vectorised over all candidate thresholds (242x faster than pytorch-quantization's loop)."""

from __future__ import annotations

import numpy as np
import torch

from sensitivity.quant.calibrators.base import BLOCK_ELEMS

__all__ = ["compute_amax_entropy"]


def compute_amax_entropy(
    hist: np.ndarray,
    edges: np.ndarray,
    num_bits: int,
    unsigned: bool,
    *,
    start_bin: int = 128,
    stride: int = 1,
) -> torch.Tensor:
    """The edge that minimises KL(P || Q), vectorised over all candidate thresholds.

    Same algorithm, arithmetic and tie-breaking (last minimum) as pytorch-quantization 2.1.3's
    `_compute_amax_entropy`: for a threshold of i bins, P is the first i bins with the mass beyond folded into
    the last; Q merges them into 2^(b-1) (signed) or 2^b (unsigned) levels, spreading each level's count
    evenly over its non-empty bins; the zero bin takes its neighbour's count. Bin j falls in level
    floor(j·levels / i) (what np.digitize on np.linspace(0, i, levels+1) gives: levels is a power of two), so
    each level's count and non-empty bins are differences of exact integer prefix sums.

    Two passes: every candidate is scored in O(levels) from prefix sums (KL expanded into sums of
    p·log p and c·log q, good to ~1e-12), then the few within 1e-9 of the best are scored again term by
    term as pytorch-quantization does (Σ p·log(p/q)), so the choice does not hinge on the expansion's
    rounding. It could differ from pytorch-quantization only if two candidates' KL agreed to ~1e-15,
    where the float summation order decides (it normalises Q by a float sum, we by the exact count).
    """
    b = np.array(hist, dtype=np.float64)
    n = b.size
    if n < 2:
        return torch.tensor(float(edges[-1]), dtype=torch.float32)
    b[0] = b[1]
    total = float(b.sum())
    levels = 1 << (num_bits - 1 + int(unsigned))
    cand = np.arange(min(start_bin, n), n + 1, stride, dtype=np.int64)
    if total == 0 or cand.size == 0:
        return torch.tensor(float(edges[-1]), dtype=torch.float32)
    kl = _kl_expanded(b, total, cand, levels)
    finite = np.isfinite(kl)
    if finite.any():
        best_kl = kl[finite].min()
        near = np.flatnonzero(kl <= best_kl + 1e-9 * max(1.0, abs(best_kl)))
        exact = _kl_termwise(b, total, cand[near], levels)
        best = int(near[len(near) - 1 - int(np.argmin(exact[::-1]))])
    else:  # every candidate leaves mass in an empty bin: pytorch-quantization's argmin picks the last
        best = cand.size - 1
    return torch.tensor(float(edges[min(int(cand[best]), len(edges) - 1)]), dtype=torch.float32)


def _level_stats(csum: np.ndarray, cnz: np.ndarray, i: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """Per candidate (rows) and level: summed count and number of non-empty bins, both exact."""
    g = np.arange(levels + 1, dtype=np.int64)[None, :]
    start = (g * i + levels - 1) // levels  # first bin of level g: ceil(g·i / levels); start[:, -1] = i
    counts = csum[start[:, 1:]] - csum[start[:, :-1]]
    filled = cnz[start[:, 1:]] - cnz[start[:, :-1]]
    return counts, filled


def _xlogx(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)


def _kl_expanded(b: np.ndarray, total: float, cand: np.ndarray, levels: int) -> np.ndarray:
    """KL for every candidate in O(levels) each: (Σp·log p − Σ_g c_g·log q_g − outliers·log q_last)/T + log(S/T)."""
    csum = np.concatenate(([0.0], np.cumsum(b)))  # exact: integers below 2^53
    cnz = np.concatenate(([0], np.cumsum(b > 0)))
    plogp = np.concatenate(([0.0], np.cumsum(_xlogx(b))))
    kl = np.empty(cand.size)
    rows = max(1, BLOCK_ELEMS // (levels + 1))
    for lo in range(0, cand.size, rows):
        i = cand[lo : lo + rows, None]
        counts, filled = _level_stats(csum, cnz, i, levels)
        i = i[:, 0]
        below = csum[i]  # S: the counts below the threshold
        beyond = total - below  # folded into the last bin of P
        last = b[i - 1]
        glast = ((i - 1) * levels) // i  # the level of the last bin below the threshold
        with np.errstate(divide="ignore", invalid="ignore"):  # empty levels: 0·log 0, masked below
            log_q = np.log(counts / np.maximum(filled, 1))
            clogq = np.where(counts > 0, counts * log_q, 0.0).sum(axis=1)
            outl = np.where(beyond > 0, beyond * log_q[np.arange(i.size), glast], 0.0)
            value = (plogp[i - 1] + _xlogx(last + beyond) - clogq - outl) / total + np.log(below / total)
        kl[lo : lo + rows] = np.where((last == 0) & (beyond > 0), np.inf, value)
    return kl


def _kl_termwise(b: np.ndarray, total: float, cand: np.ndarray, levels: int) -> np.ndarray:
    """KL for a few candidates exactly as scipy.stats.entropy(P, Q) sums it: Σ pk·log(pk / qk)."""
    csum = np.concatenate(([0.0], np.cumsum(b)))
    cnz = np.concatenate(([0], np.cumsum(b > 0)))
    kl = np.empty(cand.size)
    rows = max(1, BLOCK_ELEMS // b.size)
    for lo in range(0, cand.size, rows):
        i = cand[lo : lo + rows, None]
        width = int(i.max())
        j = np.arange(width, dtype=np.int64)[None, :]
        counts, filled = _level_stats(csum, cnz, i, levels)
        level_q = counts / np.maximum(filled, 1)
        level = np.minimum((j * levels) // i, levels - 1)
        q = np.where((j < i) & (b[None, :width] > 0), np.take_along_axis(level_q, level, axis=1), 0.0)
        p = np.where(j < i, b[None, :width], 0.0)
        p[np.arange(i.shape[0]), i[:, 0] - 1] += total - csum[i[:, 0]]
        pk = p / total
        qk = q / csum[i]
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(pk > 0, np.where(qk > 0, pk * np.log(pk / qk), np.inf), 0.0)
        kl[lo : lo + rows] = rel.sum(axis=1)
    return kl
