"""Calibrators: turn the activations a layer sees during calibration into one amax.

A calibrator observes one activation tensor per batch (`collect`) and, at the end, answers the amax that
the per-tensor quantizer should use (`compute_amax`). Four methods, as in pytorch-quantization 2.1.3:

- `max`: the largest magnitude seen, tracked by torch.ao's `MinMaxObserver`.
- `percentile`, `entropy`, `mse`: chosen from a histogram of |x| (of max(x, 0) when unsigned: negative
  inputs saturate to code 0, so they count as zeros) that reproduces pytorch-quantization's
  `HistogramCalibrator` binning exactly, including how it grows the range when a later batch exceeds it, so
  the amax values match it. Entropy is computed for all candidate thresholds at once (pytorch-quantization
  loops in Python over O(bins²) items); MSE scores every candidate with this toolkit's own fake quantizer.

Differences from pytorch-quantization, where it fails or loses precision: counts are float64 (its float32
counts stop counting exactly beyond 2^24 per bin, e.g. the zero bin after ReLU); a first batch of all zeros
is held back instead of producing a zero-width histogram; tensors with no elements are skipped;
non-finite activations raise `FPModelError`.

For several processes, `state()` / `merge_state()` expose the collected statistics as tensors. The running
range of a growing histogram depends on the order of the batches, so two histograms only add exactly when
their bins agree: a distributed run first all-reduces (max) a `max` calibrator, then builds the histogram
calibrators with `hist_range=` that global max, and all-reduces (sum) their `hist`. With a fixed range the
result equals pytorch-quantization fed all batches as a single batch.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Literal

import numpy as np
import torch
from torch.ao.quantization import MinMaxObserver

from sensitivity.errors import CalibrationDataError, FPModelError
from sensitivity.quant.fake import amax_to_scale, fake_quant
from sensitivity.quant.spec import CALIBRATORS

__all__ = [
    "Calibrator",
    "HistogramCalibrator",
    "MaxCalibrator",
    "NothingCollectedError",
    "ReduceOp",
    "compute_amax_entropy",
    "compute_amax_mse",
    "compute_amax_percentile",
    "make_calibrator",
]

ReduceOp = Literal["sum", "max"]

#: Elements per vectorised block in the entropy / mse searches (float64: 8 MiB per array).
_BLOCK_ELEMS = 1 << 20
#: torch.histc counts in float32, exact up to 2^24 per bin: histogram larger tensors piecewise.
_HISTC_CHUNK = 1 << 24


class NothingCollectedError(CalibrationDataError):
    """`compute_amax` before any activation: the layer never ran on the calibration batches."""


class Calibrator(ABC):
    """Observes a layer's input over the calibration batches and answers one per-tensor amax."""

    method: str

    def __init__(self, num_bits: int, unsigned: bool) -> None:
        self.num_bits = int(num_bits)
        self.unsigned = bool(unsigned)

    @abstractmethod
    def collect(self, x: torch.Tensor) -> None:
        """Observe one activation tensor (any shape, dtype and device); called once per batch."""

    @abstractmethod
    def compute_amax(self) -> torch.Tensor:
        """The calibrated amax: a float32 scalar on CPU. Raises `NothingCollectedError` before any data."""

    @abstractmethod
    def state(self) -> dict[str, torch.Tensor]:
        """The collected statistics as CPU tensors, for merging across processes (see `reduce_ops`)."""

    @abstractmethod
    def merge_state(self, other: dict[str, torch.Tensor]) -> None:
        """Fold in another calibrator's `state()` (same configuration), as if it had seen those batches too."""

    @abstractmethod
    def reduce_ops(self) -> dict[str, ReduceOp]:
        """How each `state()` tensor combines across ranks (`all_reduce` with SUM or MAX).

        Raises `RuntimeError` where the state cannot be combined element-wise (a growing histogram).
        """

    def __repr__(self) -> str:
        sign = "unsigned" if self.unsigned else "signed"
        return f"{type(self).__name__}(method={self.method!r}, {self.num_bits}-bit {sign})"


class MaxCalibrator(Calibrator):
    """amax = max |x| over all batches (max(x, 0) when unsigned), via torch.ao's `MinMaxObserver`.

    The observer keeps a running min and max on the data's device (no host sync per batch); the amax is
    derived from both, which is why the state is the amax itself: it all-reduces with MAX.
    """

    method = "max"

    def __init__(self, num_bits: int, unsigned: bool) -> None:
        super().__init__(num_bits, unsigned)
        self._observer = MinMaxObserver()
        self._merged = torch.tensor(-math.inf)  # amax folded in from other calibrators' states

    def collect(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        if self._observer.min_val.device != x.device:
            self._observer.to(x.device)
        self._observer(x.detach())

    def _amax(self) -> torch.Tensor:
        lo = self._observer.min_val.detach().cpu()
        hi = self._observer.max_val.detach().cpu()
        amax = hi.clamp(min=0) if self.unsigned else torch.maximum(-lo, hi)
        if lo > hi:  # still the observer's (+inf, -inf): nothing seen
            amax = torch.tensor(-math.inf)
        return torch.maximum(amax, self._merged).float()

    def compute_amax(self) -> torch.Tensor:
        amax = self._amax()
        if amax.isneginf():
            raise NothingCollectedError("the calibrator received no activations")
        if not torch.isfinite(amax):
            raise FPModelError(f"calibration activations are not finite (max |x| = {amax.item()})")
        return amax

    def state(self) -> dict[str, torch.Tensor]:
        """{"amax": scalar}; -inf before any data, so MAX over ranks ignores an idle rank."""
        return {"amax": self._amax()}

    def merge_state(self, other: dict[str, torch.Tensor]) -> None:
        self._merged = torch.maximum(self._merged, other["amax"].detach().float().cpu().reshape(()))

    def reduce_ops(self) -> dict[str, ReduceOp]:
        return {"amax": "max"}


class HistogramCalibrator(Calibrator):
    """A histogram of |x| (max(x, 0) when unsigned), then amax by percentile, entropy or mse.

    Growing range (`hist_range=None`, pytorch-quantization's behaviour): the first batch spans
    [0, its max] with `num_bins` bins; a later batch beyond the last edge appends bins of the same width. The
    amax then depends on the batch order, and two such histograms merge only approximately.

    Fixed range (`hist_range=R`): `num_bins` bins on [0, R], values above R in the last bin. Histograms of
    the same R add exactly, so ranks can all-reduce `state()["hist"]`; with R the all-reduced max of a
    `max` calibrator this equals pytorch-quantization on all the batches as one. R = 0 (a layer whose
    inputs are all zero) gives amax 0.

    Not torch.ao's `HistogramObserver`: it re-bins by upsampling when the range grows and picks its range
    by its own L2 search, so neither its histogram nor its amax can match pytorch-quantization's.
    """

    def __init__(
        self,
        method: str,
        num_bits: int,
        unsigned: bool,
        *,
        percentile: float = 99.99,
        num_bins: int = 2048,
        hist_range: float | None = None,
        start_bin: int = 128,
    ) -> None:
        super().__init__(num_bits, unsigned)
        if method not in ("percentile", "entropy", "mse"):
            raise ValueError(f"histogram method must be percentile, entropy or mse, got {method!r}")
        if not 0.0 <= percentile <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {percentile!r}")
        if num_bins < 2:
            raise ValueError(f"num_bins must be at least 2, got {num_bins!r}")
        self.method = method
        self.percentile = float(percentile)
        self.start_bin = int(start_bin)
        self._num_bins = int(num_bins)  # current number of histc bins (grows with the range)
        self._zeros = 0.0  # zeros seen while the range is still zero (no bins yet)
        self._hist: torch.Tensor | None = None  # float64 counts, CPU
        self._edges: torch.Tensor | None = None  # float32 edges as pytorch-quantization computes them
        self.hist_range: float | None = None
        self._max: torch.Tensor | None = None  # fixed range: running max on the data's device (finiteness)
        if hist_range is not None:
            r = float(np.float32(hist_range))
            if not (math.isfinite(r) and r >= 0):
                raise ValueError(f"hist_range must be a finite number >= 0, got {hist_range!r}")
            self.hist_range = r
            if r > 0:
                self._edges = torch.linspace(0, r, self._num_bins + 1)
                self._hist = torch.zeros(self._num_bins, dtype=torch.float64)

    # -- collection ---------------------------------------------------------------------------------
    def collect(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        with torch.no_grad():
            x = x.detach().float()
            x = x.clamp(min=0) if self.unsigned else x.abs()  # a new tensor: safe to clamp in place below
            if self.hist_range is not None:
                self._collect_fixed(x)
            else:
                self._collect_growing(x)

    def _collect_fixed(self, x: torch.Tensor) -> None:
        if self._hist is None:
            self._zeros += float(x.numel())  # a zero range: every value is (clamped to) zero
            return
        top = x.max()  # no host sync: checked for NaN / inf in compute_amax
        self._max = top if self._max is None else torch.maximum(self._max.to(top.device), top)
        x.clamp_(max=self.hist_range)  # outliers beyond the fixed range count in the last bin
        self._hist += _histc(x, self._num_bins, self.hist_range)

    def _collect_growing(self, x: torch.Tensor) -> None:
        x_max = x.max().item()
        if not math.isfinite(x_max):
            raise FPModelError(f"calibration activations are not finite (max |x| = {x_max})")
        if self._hist is None or self._edges is None:
            if x_max == 0:
                self._zeros += float(x.numel())
                return
            self._edges = torch.linspace(0, x_max, self._num_bins + 1)
            hist = _histc(x, self._num_bins, x_max)
        else:
            if x_max > self._edges[-1].item():
                self._grow(x_max)
            hist = _histc(x, self._num_bins, self._edges[-1].item())
            hist[: self._hist.numel()] += self._hist
        hist[0] += self._zeros
        self._zeros = 0.0
        self._hist = hist

    def _grow(self, x_max: float) -> None:
        # pytorch-quantization's arithmetic, op for op (float32): the number of histc bins and the edges
        # are computed separately and may disagree by one; its amax indexes these edges, so we keep them.
        assert self._edges is not None
        top = torch.tensor(x_max, dtype=torch.float32)
        width = self._edges[1] - self._edges[0]
        self._num_bins = int((top / width).ceil().item())
        self._edges = torch.arange(0, top + width, width)

    # -- results ------------------------------------------------------------------------------------
    def histogram(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(counts float64, edges float32), as pytorch-quantization would hold them after the same batches."""
        if self._hist is None or self._edges is None:
            if self._zeros > 0:  # only zeros so far: one bin at zero
                return torch.tensor([self._zeros], dtype=torch.float64), torch.zeros(2)
            raise NothingCollectedError("the calibrator received no activations")
        hist = self._hist.clone()
        hist[0] += self._zeros
        if hist.sum() == 0:
            raise NothingCollectedError("the calibrator received no activations")
        return hist, self._edges

    def compute_amax(self) -> torch.Tensor:
        hist, edges = self.histogram()
        if self._max is not None and not torch.isfinite(self._max):
            raise FPModelError(f"calibration activations are not finite (max |x| = {self._max.item()})")
        if edges[-1] == 0:
            return torch.tensor(0.0)
        h, e = hist.numpy(), edges.numpy()
        if self.method == "percentile":
            return compute_amax_percentile(h, e, self.percentile)
        if self.method == "entropy":
            return compute_amax_entropy(h, e, self.num_bits, self.unsigned, start_bin=self.start_bin)
        return compute_amax_mse(h, e, self.num_bits, self.unsigned, start_bin=self.start_bin)

    def state(self) -> dict[str, torch.Tensor]:
        """Fixed range: {"hist", "zeros"} (SUM) and "max" (MAX, -inf before data; only checked for NaN/inf).

        Growing range: {"hist", "edges", "num_bins", "zeros"}, for `merge_state` only (shapes differ).
        """
        if self.hist_range is not None:
            hist = self._hist if self._hist is not None else torch.zeros(0, dtype=torch.float64)
            top = self._max.detach().float().cpu() if self._max is not None else torch.tensor(-math.inf)
            return {"hist": hist.clone(), "zeros": torch.tensor(self._zeros, dtype=torch.float64), "max": top}
        if self._hist is None or self._edges is None:
            hist, edges = torch.zeros(0, dtype=torch.float64), torch.zeros(0)
        else:
            hist, edges = self._hist.clone(), self._edges.clone()
        return {
            "hist": hist,
            "edges": edges,
            "num_bins": torch.tensor(self._num_bins),
            "zeros": torch.tensor(self._zeros, dtype=torch.float64),
        }

    def reduce_ops(self) -> dict[str, ReduceOp]:
        if self.hist_range is None:
            raise RuntimeError(
                "a growing histogram cannot be all-reduced: build the calibrator with hist_range= the "
                "all-reduced max of a `max` calibrator"
            )
        return {"hist": "sum", "zeros": "sum", "max": "max"}

    def merge_state(self, other: dict[str, torch.Tensor]) -> None:
        """Exact when the bins agree (always, for the same fixed range); else re-binned by bin centre."""
        o_hist = other["hist"].detach().double().cpu()
        self._zeros += float(other["zeros"])
        if self.hist_range is not None:
            o_max = other["max"].detach().float().cpu().reshape(())
            self._max = o_max if self._max is None else torch.maximum(self._max.cpu(), o_max)
            if o_hist.numel() == 0:
                return
            if self._hist is None or o_hist.shape != self._hist.shape:
                raise ValueError("merge_state: the other histogram has a different number of bins")
            self._hist += o_hist
            return
        if o_hist.numel() == 0:
            return
        o_edges = other["edges"].detach().float().cpu()
        o_bins = int(other["num_bins"])
        if self._hist is None or self._edges is None:  # adopt theirs: exact
            self._hist, self._edges, self._num_bins = o_hist.clone(), o_edges.clone(), o_bins
            self._hist[0] += self._zeros
            self._zeros = 0.0
            return
        if o_bins == self._num_bins and torch.equal(o_edges, self._edges):
            self._hist += o_hist
            return
        # Different ranges: grow ours over theirs as a batch would, then move each of their bins to the bin
        # of ours holding its centre (pytorch-quantization's histc spreads edges[-1] over num_bins bins).
        o_top = o_edges[-1].item()
        if o_top > self._edges[-1].item():
            self._grow(o_top)
            grown = torch.zeros(self._num_bins, dtype=torch.float64)
            grown[: self._hist.numel()] = self._hist
            self._hist = grown
        top = self._edges[-1].item()
        centres = (torch.arange(o_bins, dtype=torch.float64) + 0.5) * (o_top / o_bins)
        index = (centres * (self._num_bins / top)).long().clamp_(0, self._num_bins - 1)
        self._hist.index_add_(0, index, o_hist)


def _histc(x: torch.Tensor, bins: int, top: float) -> torch.Tensor:
    """torch.histc on [0, top] as float64 on CPU, in pieces so that float32 counts stay exact."""
    flat = x.reshape(-1)
    hist = torch.zeros(bins, dtype=torch.float64)
    for piece in flat.split(_HISTC_CHUNK):
        hist += torch.histc(piece, bins=bins, min=0, max=top).double().cpu()
    return hist


def compute_amax_percentile(hist: np.ndarray, edges: np.ndarray, percentile: float) -> torch.Tensor:
    """The left edge of the bin where the CDF reaches `percentile` %, as pytorch-quantization computes it."""
    hist = np.asarray(hist, dtype=np.float64)
    cdf = np.cumsum(hist / hist.sum())
    idx = int(np.searchsorted(cdf, percentile / 100))
    return torch.tensor(float(edges[min(idx, len(edges) - 1)]), dtype=torch.float32)


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
    rows = max(1, _BLOCK_ELEMS // (levels + 1))
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
    rows = max(1, _BLOCK_ELEMS // b.size)
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
    rows = max(1, _BLOCK_ELEMS // n)
    for lo in range(0, cand.numel(), rows):
        amax = centres[cand[lo : lo + rows]]
        scale = amax_to_scale(amax, num_bits, unsigned)[:, None]
        xq = fake_quant(centres.expand(amax.numel(), n), scale, num_bits, unsigned)
        err = (xq - centres).double()
        mse[lo : lo + rows] = (err * err * counts).sum(dim=1)
    return centres[cand[int(torch.argmin(mse))]].clone()


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
