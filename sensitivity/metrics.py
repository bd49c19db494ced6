"""Streaming error statistics between an FP reference and a quantized output.

Everything is kept as sums, maxima and counts in float64 so that batches (and ranks) merge exactly by
addition / max, and the per-layer metrics are derived only at the end. Non-finite quantized (or reference)
elements are counted and left out of the sums, so one NaN does not hide the size of the other errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

__all__ = ["METRICS", "ErrorStats", "error_metrics"]

#: Per-layer metrics, in the column order used by layers.csv.
METRICS = ("l1", "rel_l1", "mse", "sqnr_db", "cosine", "max_abs", "nonfinite")

_SUM_FIELDS = (
    "n",
    "sum_abs_err",
    "sum_sq_err",
    "sum_abs_ref",
    "sum_sq_ref",
    "sum_sq_test",
    "sum_dot",
    "nonfinite",
)
_MAX_FIELDS = ("max_abs_err",)


@dataclass
class ErrorStats:
    """Mergeable accumulator of (test - ref) statistics over any number of tensors."""

    n: float = 0.0
    sum_abs_err: float = 0.0
    sum_sq_err: float = 0.0
    sum_abs_ref: float = 0.0
    sum_sq_ref: float = 0.0
    sum_sq_test: float = 0.0
    sum_dot: float = 0.0
    nonfinite: float = 0.0
    max_abs_err: float = 0.0

    def update(self, ref: torch.Tensor, test: torch.Tensor) -> None:
        """Add one pair of same-shape tensors (reference = FP output, test = quantized output)."""
        if ref.shape != test.shape:
            raise ValueError(f"shape mismatch: reference {tuple(ref.shape)} vs quantized {tuple(test.shape)}")
        ref = ref.detach()
        test = test.detach()
        finite = torch.isfinite(test) & torch.isfinite(ref)
        n_bad = int(finite.numel() - finite.sum())
        if n_bad:
            ref = ref[finite]
            test = test[finite]
            self.nonfinite += n_bad
        ref64 = ref.double()
        test64 = test.double()
        diff = test64 - ref64
        stacked = torch.stack(
            (
                diff.abs().sum(),
                (diff * diff).sum(),
                ref64.abs().sum(),
                (ref64 * ref64).sum(),
                (test64 * test64).sum(),
                (ref64 * test64).sum(),
                diff.abs().max() if diff.numel() else diff.new_zeros(()),
            )
        ).tolist()
        self.n += ref.numel()
        self.sum_abs_err += stacked[0]
        self.sum_sq_err += stacked[1]
        self.sum_abs_ref += stacked[2]
        self.sum_sq_ref += stacked[3]
        self.sum_sq_test += stacked[4]
        self.sum_dot += stacked[5]
        self.max_abs_err = max(self.max_abs_err, stacked[6])

    def merge(self, other: ErrorStats) -> None:
        for name in _SUM_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in _MAX_FIELDS:
            setattr(self, name, max(getattr(self, name), getattr(other, name)))

    def to_tensor(self) -> torch.Tensor:
        """All fields as one float64 vector (sums first, then maxima), for all-reduce."""
        return torch.tensor([getattr(self, f.name) for f in fields(self)], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> ErrorStats:
        return cls(*[float(v) for v in values.tolist()])

    @property
    def empty(self) -> bool:
        return self.n == 0 and self.nonfinite == 0

    def metrics(self) -> dict[str, float]:
        return error_metrics(self)


def error_metrics(s: ErrorStats) -> dict[str, float]:
    """Derive the reported metrics. Conventions: SQNR of an exact match is +inf; empty stats give NaN."""
    nan = float("nan")
    if s.n == 0:
        return {
            "l1": nan,
            "rel_l1": nan,
            "mse": nan,
            "sqnr_db": nan,
            "cosine": nan,
            "max_abs": nan,
            "nonfinite": s.nonfinite,
        }
    l1 = s.sum_abs_err / s.n
    rel_l1 = s.sum_abs_err / s.sum_abs_ref if s.sum_abs_ref > 0 else (0.0 if s.sum_abs_err == 0 else math.inf)
    if s.sum_sq_err == 0:
        sqnr = math.inf
    elif s.sum_sq_ref == 0:
        sqnr = -math.inf
    else:
        sqnr = 10.0 * math.log10(s.sum_sq_ref / s.sum_sq_err)
    denom = math.sqrt(s.sum_sq_ref * s.sum_sq_test)
    cosine = s.sum_dot / denom if denom > 0 else (1.0 if s.sum_sq_err == 0 else 0.0)
    return {
        "l1": l1,
        "rel_l1": rel_l1,
        "mse": s.sum_sq_err / s.n,
        "sqnr_db": sqnr,
        "cosine": cosine,
        "max_abs": s.max_abs_err,
        "nonfinite": s.nonfinite,
    }
