"""`max` calibration: the largest magnitude seen, tracked by torch.ao's `MinMaxObserver`."""

from __future__ import annotations

import math

import torch
from torch.ao.quantization import MinMaxObserver

from sensitivity.errors import FPModelError
from sensitivity.quant.calibrators.base import Calibrator, NothingCollectedError, ReduceOp

__all__ = ["MaxCalibrator"]


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
