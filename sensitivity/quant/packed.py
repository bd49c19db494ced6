"""A fake-quantized weight kept as its integer codes and scale, widened on use.

A quantized layer caches its fake-quantized weight between calls (the weight is frozen during a scan). As
float32 that cache is a second copy of the model's weights (98 MiB for ResNet-50, the difference between
its scan staying within 2x a plain forward's memory or not); as 8-bit codes it is a quarter of that. The
widened tensor is bit-identical to `fake_quant`'s result: the same codes (round half even of w / scale,
clamped) times the same float32 scale, the same final multiply. Weights with a non-finite value, or codes
that do not fit 8 bits, stay float32 (NaN has no integer code)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sensitivity.quant.fake import broadcast_scale, quantize_codes
from sensitivity.quant.quantizer import TensorQuantizer
from sensitivity.spec import qrange

__all__ = ["PackedWeight", "pack_weight"]


@dataclass(frozen=True)
class PackedWeight:
    """Integer codes (int8 / uint8) and the scale broadcast to the weight's shape."""

    codes: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    def widened(self) -> torch.Tensor:
        return self.codes.to(self.dtype).mul_(self.scale)


def _code_dtype(num_bits: int, unsigned: bool) -> torch.dtype | None:
    qmin, qmax = qrange(num_bits, unsigned)
    if qmin >= -128 and qmax <= 127:
        return torch.int8
    if qmin >= 0 and qmax <= 255:
        return torch.uint8
    return None


def pack_weight(quantizer: TensorQuantizer, w: torch.Tensor) -> PackedWeight | torch.Tensor:
    """`quantizer(w)` as codes and scale where they fit a byte, else the float tensor itself."""
    code_dtype = _code_dtype(quantizer.num_bits, quantizer.unsigned)
    # finite values sum to a finite total unless it overflows (then the float path: right, only slower);
    # one reduction instead of a boolean tensor of the weight's size and its `all`
    if code_dtype is None or not w.is_floating_point() or not math.isfinite(float(w.sum())):
        return quantizer(w)
    scale = broadcast_scale(quantizer.scale().to(device=w.device, dtype=w.dtype), w, quantizer.axis)
    codes = quantize_codes(w, scale, quantizer.num_bits, quantizer.unsigned)
    return PackedWeight(codes.to(code_dtype), scale, w.dtype)
