"""SmoothQuant for convolutions and Linear layers: factors, and the per-layer candidates the scan scores.

On the GEMM view of a layer, X[N·L, Cin·k] · W[Cout, Cin·k]ᵀ, SmoothQuant divides the activation and
multiplies the weight by s = max|X|^α / max|W|^(1-α), moving activation outliers into the weight, which
is quantized per output channel and absorbs them. Two granularities:

- `channel`: one factor per input channel, shared by all k taps of a conv. The division is one
  per-channel multiply before the input quantizer (deployable on TensorRT), foldable into the producer.
- `im2col`: one factor per im2col column (Cin·k), the research notes' method, computed on the unfolded
  input. Not expressible as a per-channel op, so research only (see `sensitivity.im2col`).

Modes: `static` (factors and input amax from calibration statistics, deployable) and `dynamic` (factors
and amax from each batch, as in the notes; an upper bound on what smoothing can do).

Both maxima are clamped away from 0 and the ratio to [S_MIN, S_MAX]: the notes' unclamped sqrt(X/W)
gives NaN on a dead input channel (0/0) and on a zero weight column (x / inf, 0 * inf).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from sensitivity.capture.outputs import as_tensor
from sensitivity.quant.fake import amax_to_scale, fake_quant
from sensitivity.quant.modules import QuantMixin, Smoother, per_channel_amax

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
    "variant",
]

GRANULARITIES = ("channel", "im2col")
MODES = ("static", "dynamic")
#: Maxima are clamped to at least this before the power (a dead channel has max |X| = 0).
MAX_EPS = 1e-5
#: Factors are clamped to this range: beyond it a factor only moves rounding error around.
S_MIN, S_MAX = 1e-5, 1e5


def smoothing_factors(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^α / max|W|^(1-α), both maxima clamped to >= MAX_EPS, s clamped to [S_MIN, S_MAX]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    x = x_absmax.detach().double().clamp(min=MAX_EPS)
    w = w_absmax.detach().double().to(x.device).clamp(min=MAX_EPS)
    s = x.pow(alpha) / w.pow(1.0 - alpha)
    return s.clamp(S_MIN, S_MAX).float()


def notes_factors(x_absmax: torch.Tensor, w_absmax: torch.Tensor) -> torch.Tensor:
    """The research notes' unclamped formula, sqrt(max|X| / max|W|): kept to show where it breaks."""
    return torch.sqrt(x_absmax.float() / w_absmax.float())


def smoothed_input_amax(x_absmax: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Max calibration of the smoothed input, exact from per-channel maxima: max_c max|X_c| / s_c."""
    return (x_absmax.float() / s.float()).max()


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


@contextmanager
def variant(qmod: QuantMixin, state: dict[str, Any]) -> Any:
    """Temporarily give `qmod` another smoother, input amax and weight amax/cache (a scan candidate)."""
    saved = (qmod.smoother, qmod.input_quantizer.amax, qmod.weight_quantizer.amax, qmod._wq_cache)
    saved_dynamic = qmod.dynamic_alpha
    qmod.dynamic_alpha = None
    qmod.smoother = state["smoother"]
    qmod.input_quantizer.amax = state["input_amax"]
    qmod.weight_quantizer.amax = state["weight_amax"]
    qmod._wq_cache = None
    try:
        yield
    finally:
        # the candidate's quantized weight is not kept: K alphas x every layer's weight would hold K more
        # copies of the model for the whole pass, and re-quantizing a weight costs far less than the layer
        qmod.smoother, qmod.input_quantizer.amax, qmod.weight_quantizer.amax, qmod._wq_cache = saved
        qmod.dynamic_alpha = saved_dynamic


@dataclass
class SmoothCandidate:
    """Channel-granularity SmoothQuant of one quantized layer, scored on the FP input (isolated error).

    Static: factors and input amax fixed from the fitting batches' per-channel maxima. Dynamic: both
    recomputed from each batch (then the weight is re-quantized per call)."""

    qmod: QuantMixin
    alpha: float
    mode: str
    x_absmax: torch.Tensor | None = None  # static: per-input-channel max |X| over the fitting batches

    def __post_init__(self) -> None:
        self.w_absmax = self.qmod.weight_input_absmax()
        self.state: dict[str, Any] | None = None
        if self.mode == "static":
            assert self.x_absmax is not None
            self.state = self._state(self.x_absmax)

    def _state(self, x_absmax: torch.Tensor) -> dict[str, Any]:
        q = self.qmod
        s = smoothing_factors(x_absmax, self.w_absmax, self.alpha).to(q.weight.device)
        smoother = Smoother(s, q.input_channel_axis)
        w = q.weight.detach() * q._weight_input_scale(s)
        axis = q.weight_quantizer.axis
        assert axis is not None
        return {
            "smoother": smoother,
            "input_amax": smoothed_input_amax(x_absmax.to(s.device), s),
            "weight_amax": per_channel_amax(w, axis),
            "scale": s,
        }

    @property
    def factors(self) -> torch.Tensor | None:
        return None if self.state is None else self.state["scale"]

    def __call__(self, args: tuple) -> Any:
        state = self.state
        if state is None:  # dynamic: this batch's own per-channel maxima
            x = as_tensor(args[0])
            assert x is not None
            axis = self.qmod.input_channel_axis % x.dim()
            dims = [d for d in range(x.dim()) if d != axis]
            state = self._state(x.detach().abs().amax(dim=dims).float() if dims else x.detach().abs().float())
        with variant(self.qmod, state):
            return self.qmod(*args)


def fake_quant_tensor(x: torch.Tensor, amax: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Signed per-tensor fake quantization (the im2col path quantizes its unfolded matrix with this)."""
    return fake_quant(x, amax_to_scale(amax, num_bits, False).to(x.device), num_bits, False)


Candidate = Callable[[tuple], Any]
