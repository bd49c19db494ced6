"""SmoothQuant's arithmetic and its input side, as the quantized layers apply it.

On the GEMM view of a layer, X[N·L, Cin·k] · W[Cout, Cin·k]ᵀ, SmoothQuant divides the activation and
multiplies the weight by s = max|X|^α / max|W|^(1-α), moving activation outliers into the weight, which is
quantized per output channel and absorbs them. Both maxima are clamped away from 0 and the ratio to
[S_MIN, S_MAX]: the research notes' unclamped sqrt(X/W) gives NaN on a dead input channel (0/0) and on a
zero weight column (x / inf, 0 * inf). Which layers get it and with what alpha is decided elsewhere
(`sensitivity.methods`); here is only what a deployed layer computes.
"""

from __future__ import annotations

import torch
from torch import nn

from sensitivity.quant.fake import exporting_onnx

__all__ = [
    "MAX_EPS",
    "S_MAX",
    "S_MIN",
    "Smoother",
    "channel_absmax",
    "smoothed_input_amax",
    "smoothing_factors",
]

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


def smoothed_input_amax(x_absmax: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Max calibration of the smoothed input, exact from per-channel maxima: max_c max|X_c| / s_c."""
    return (x_absmax.float() / s.float().to(x_absmax.device)).max()


def channel_absmax(x: torch.Tensor, axis: int) -> torch.Tensor:
    """max |x| per channel along `axis` (the statistic both static and dynamic smoothing start from)."""
    axis %= x.dim()
    dims = [d for d in range(x.dim()) if d != axis]
    x = x.detach()
    return (x.abs().amax(dim=dims) if dims else x.abs()).float()


class Smoother(nn.Module):
    """SmoothQuant's input side: multiply the input by 1/s per input channel, before the input quantizer.

    Kept as one per-channel multiply (a Mul node in ONNX, which TensorRT runs), unless the final model
    folds it into the producer. `scale` (s > 0) is a buffer so it travels with the state dict.
    """

    def __init__(self, scale: torch.Tensor, channel_axis: int, folded: bool = False) -> None:
        super().__init__()
        self.channel_axis = int(channel_axis)
        #: True once 1/s lives in the producer's weights: the input arrives already divided
        self.folded = bool(folded)
        #: True once s lives in this layer's own weight (the deployed form): no multiply at run time
        self.weight_baked = False
        self.register_buffer("scale", scale.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded:
            return x
        shape = [1] * x.dim()
        shape[self.channel_axis] = -1
        inv = 1.0 / self.scale
        if exporting_onnx():  # one Mul by a constant in the graph
            inv = torch.tensor(inv.tolist(), dtype=torch.float32, device=x.device)
        return x * inv.to(x.dtype).reshape(shape)

    def extra_repr(self) -> str:
        folded = ", folded into the producer" if self.folded else ""
        return f"channels={self.scale.numel()}, axis={self.channel_axis}{folded}"
