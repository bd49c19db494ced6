"""The calibrator interface (as ModelOpt's: collect, compute_amax, reset) and what all calibrators share.

A calibrator observes one activation tensor per batch (`collect`) and, at the end, answers the amax that the
per-tensor quantizer should use (`compute_amax`). For several processes, `state()` / `merge_state()` expose
the collected statistics as tensors and `reduce_ops()` says how each all-reduces.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

import torch

from sensitivity.errors import CalibrationDataError

__all__ = ["BLOCK_ELEMS", "Calibrator", "NothingCollectedError", "ReduceOp"]

ReduceOp = Literal["sum", "max"]

#: Elements per vectorised block in the entropy / mse searches (float64: 8 MiB per array).
BLOCK_ELEMS = 1 << 20


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

    def reset(self) -> None:
        """Forget everything collected (the calibrator is as new)."""
        self.__init__(self.num_bits, self.unsigned)  # type: ignore[misc]

    def __repr__(self) -> str:
        sign = "unsigned" if self.unsigned else "signed"
        return f"{type(self).__name__}(method={self.method!r}, {self.num_bits}-bit {sign})"
