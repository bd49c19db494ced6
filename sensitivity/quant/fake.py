"""Fake quantization that reproduces ONNX QuantizeLinear -> DequantizeLinear as deployed.

ONNX Runtime computes q = saturate(round_half_even(x / scale)). torch's fake_quantize_* ops round
x * (1 / scale) and pytorch-quantization rounds x * (qmax / amax); all three agree except where x / scale
lands within an ulp of a .5 tie. The toolkit follows the deployed ONNX convention (x / scale) so that the
errors it reports are the errors TensorRT / ORT will show (tests check this against ONNX Runtime).
"""

from __future__ import annotations

import sys

import torch

from sensitivity.spec import qrange

__all__ = ["amax_to_scale", "broadcast_scale", "exporting_onnx", "fake_quant", "quantize_codes"]


def exporting_onnx() -> bool:
    """Whether an ONNX export is tracing. `torch.onnx` is imported lazily by torch (0.1-0.2 s); a process
    that never imported it cannot be exporting, so the check costs nothing on the scan's hot path."""
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and bool(onnx.is_in_onnx_export())


def amax_to_scale(amax: torch.Tensor, num_bits: int, unsigned: bool) -> torch.Tensor:
    """scale = amax / qmax; a zero amax (dead channel) gets scale 1, which maps its zeros to zero."""
    qmax = qrange(num_bits, unsigned)[1]
    amax = amax.float()
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def broadcast_scale(scale: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """A per-channel `scale` shaped to broadcast against `x` along `axis` (a per-tensor one as it is)."""
    if axis is None or scale.dim() == 0:
        return scale
    shape = [1] * x.dim()
    shape[axis] = -1
    return scale.reshape(shape)


def quantize_codes(
    x: torch.Tensor, scale: torch.Tensor, num_bits: int, unsigned: bool = False, axis: int | None = None
) -> torch.Tensor:
    """Integer codes (as float) of ONNX QuantizeLinear: saturate(round_half_even(x / scale))."""
    qmin, qmax = qrange(num_bits, unsigned)
    return torch.clamp(torch.round(x / broadcast_scale(scale, x, axis)), qmin, qmax)


def fake_quant(
    x: torch.Tensor, scale: torch.Tensor, num_bits: int, unsigned: bool = False, axis: int | None = None
) -> torch.Tensor:
    """Dequantized codes: what a Q/DQ pair outputs. NaN stays NaN, +-inf saturates like ONNX."""
    qmin, qmax = qrange(num_bits, unsigned)
    s = broadcast_scale(scale.to(x.dtype), x, axis)
    y = x / s
    if y.requires_grad:
        return torch.clamp(torch.round(y), qmin, qmax) * s
    # one allocation, then in place: this runs on every activation of every quantized layer
    return y.round_().clamp_(qmin, qmax).mul_(s)
