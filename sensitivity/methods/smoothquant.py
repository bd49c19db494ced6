"""SmoothQuant for convolutions and Linear layers: factors, and the per-layer candidates the scan scores.

On the GEMM view of a layer, X[N·L, Cin·k] · W[Cout, Cin·k]ᵀ, SmoothQuant divides the activation and
multiplies the weight by s = max|X|^α / max|W|^(1-α), moving activation outliers into the weight, which
is quantized per output channel and absorbs them. Two granularities:

- `channel`: one factor per input channel, shared by all k taps of a conv. The division is one
  per-channel multiply before the input quantizer (deployable on TensorRT), foldable into the producer.
- `im2col`: one factor per im2col column (Cin·k), the research notes' method, computed on the unfolded
  input. Not expressible as a per-channel op, so research only (see `sensitivity.methods.im2col`).

Modes: `static` (factors and input amax from calibration statistics, deployable) and `dynamic` (factors
and amax from each batch, as in the notes; an upper bound on what smoothing can do).

Both maxima are clamped away from 0 and the ratio to [S_MIN, S_MAX]: the notes' unclamped sqrt(X/W)
gives NaN on a dead input channel (0/0) and on a zero weight column (x / inf, 0 * inf).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sensitivity.quant.modules import QuantMixin
from sensitivity.quant.smoothing import MAX_EPS, S_MAX, S_MIN, smoothed_input_amax, smoothing_factors
from sensitivity.spec import GRANULARITIES, MODES

__all__ = [
    "GRANULARITIES",
    "MAX_EPS",
    "MODES",
    "S_MAX",
    "S_MIN",
    "SmoothCandidate",
    "notes_factors",
    "parse_alpha_grid",
    "smoothed_input_amax",
    "smoothing_factors",
]


def notes_factors(x_absmax: torch.Tensor, w_absmax: torch.Tensor) -> torch.Tensor:
    """The research notes' unclamped formula, sqrt(max|X| / max|W|): kept to show where it breaks."""
    return torch.sqrt(x_absmax.float() / w_absmax.float())


#: Most values an alpha grid may list (`0:1:0.001`): a bound, since a range's count comes from its step.
MAX_ALPHAS = 1001


def parse_alpha_grid(text: str) -> tuple[float, ...]:
    """`0.5`, `0.25,0.5,0.75` or `start:stop:step` (inclusive, e.g. `0.1:0.9:0.1`); empty = no SmoothQuant."""
    from sensitivity.errors import SpecError

    text = text.strip()
    if not text:
        return ()
    try:
        if ":" in text:
            start, stop, step = (float(p) for p in text.split(":"))
            if step <= 0:
                raise ValueError
            n = round((stop - start) / step) + 1  # OverflowError when infinite, ValueError when NaN
            values = None if n > MAX_ALPHAS else [round(start + i * step, 6) for i in range(max(n, 0))]
        else:
            values = [float(p) for p in text.split(",") if p.strip()]
    except (ValueError, OverflowError):
        raise SpecError(f"cannot parse alpha grid {text!r}: use 0.5, 0.25,0.5,0.75 or 0.1:0.9:0.1") from None
    if values is None:
        raise SpecError(f"alpha grid {text!r} lists more than {MAX_ALPHAS} values: use a larger step")
    bad = [v for v in values if not 0.0 <= v <= 1.0]
    if bad or not values:
        raise SpecError(f"alpha grid {text!r} must list values in [0, 1]")
    return tuple(dict.fromkeys(values))


@dataclass
class SmoothCandidate:
    """Channel-granularity SmoothQuant of one quantized layer, scored on the FP input (isolated error).

    Static: factors and input amax fixed from the fitting batches' per-channel maxima. Dynamic: the layer
    recomputes both from each batch (see `QuantMixin.dynamic_alpha`)."""

    qmod: QuantMixin
    alpha: float
    mode: str
    x_absmax: torch.Tensor | None = None  # static: per-input-channel max |X| over the fitting batches

    def __post_init__(self) -> None:
        self.setting = None
        if self.mode == "static":
            assert self.x_absmax is not None
            self.setting = self.qmod.smoothing_setting(self.x_absmax, self.alpha)

    @property
    def factors(self) -> torch.Tensor | None:
        return None if self.setting is None else self.setting[3]

    def __call__(self, args: tuple) -> Any:
        if self.setting is None:  # dynamic
            saved = self.qmod.dynamic_alpha
            self.qmod.dynamic_alpha = self.alpha
            try:
                return self.qmod(*args)
            finally:
                self.qmod.dynamic_alpha = saved
        smoother, amax, w_amax, _ = self.setting
        with self.qmod.swapped(smoother, amax, w_amax):
            return self.qmod(*args)
