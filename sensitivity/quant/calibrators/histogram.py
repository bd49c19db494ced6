"""Histogram calibration (`percentile`, `entropy`, `mse`): a histogram of |x| built bit for bit as
pytorch-quantization 2.1.3 builds it, then the method's amax from it.

Differences from pytorch-quantization, where it fails or loses precision: counts are float64 (its float32
counts stop counting exactly beyond 2^24 per bin, e.g. the zero bin after ReLU); a first batch of all zeros
is held back instead of producing a zero-width histogram; tensors with no elements are skipped;
non-finite activations raise `FPModelError`.

The running range of a growing histogram depends on the order of the batches, so two histograms only add
exactly when their bins agree: a distributed run first all-reduces (max) a `max` calibrator, then builds
the histogram calibrators with `hist_range=` that global max, and all-reduces (sum) their `hist`. With a
fixed range the result equals pytorch-quantization fed all batches as a single batch.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sensitivity.errors import FPModelError
from sensitivity.quant.calibrators.base import Calibrator, NothingCollectedError, ReduceOp
from sensitivity.quant.calibrators.entropy import compute_amax_entropy
from sensitivity.quant.calibrators.mse import compute_amax_mse
from sensitivity.quant.calibrators.percentile import compute_amax_percentile

__all__ = ["HISTC_CHUNK", "HistogramCalibrator"]

#: torch.histc counts in float32, exact up to 2^24 per bin: histogram larger tensors piecewise.
HISTC_CHUNK = 1 << 24


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
        self._config = {
            "percentile": percentile,
            "num_bins": num_bins,
            "hist_range": hist_range,
            "start_bin": start_bin,
        }
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

    def reset(self) -> None:
        self.__init__(self.method, self.num_bits, self.unsigned, **self._config)  # type: ignore[misc, arg-type]

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
        return self.amax_by(self.method, self.percentile, self.unsigned)

    def amax_by(
        self, method: str, percentile: float | None = None, unsigned: bool | None = None
    ) -> torch.Tensor:
        """The amax `method` (percentile / entropy / mse; `max`: the last edge) picks from this histogram,
        for the signed or unsigned code range: one histogram serves every calibrator choice."""
        hist, edges = self.histogram()
        if self._max is not None and not torch.isfinite(self._max):
            raise FPModelError(f"calibration activations are not finite (max |x| = {self._max.item()})")
        if edges[-1] == 0:
            return torch.tensor(0.0)
        unsigned = self.unsigned if unsigned is None else unsigned
        h, e = hist.numpy(), edges.numpy()
        if method == "max":
            top = self._max if self._max is not None else edges[-1]
            return torch.as_tensor(top, dtype=torch.float32).detach().cpu().reshape(())
        if method == "percentile":
            return compute_amax_percentile(h, e, self.percentile if percentile is None else percentile)
        if method == "entropy":
            return compute_amax_entropy(h, e, self.num_bits, unsigned, start_bin=self.start_bin)
        if method == "mse":
            return compute_amax_mse(h, e, self.num_bits, unsigned, start_bin=self.start_bin)
        raise ValueError(f"unknown histogram method {method!r}")

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
    for piece in flat.split(HISTC_CHUNK):
        hist += torch.histc(piece, bins=bins, min=0, max=top).double().cpu()
    return hist
