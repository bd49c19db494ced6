"""`TensorQuantizer`: a module that fake-quantizes a tensor with a calibrated `amax` buffer."""

from __future__ import annotations

import torch
from torch import nn

from sensitivity.quant.fake import amax_to_scale, exporting_onnx, fake_quant
from sensitivity.spec import qrange

__all__ = ["NotCalibratedError", "TensorQuantizer"]


class NotCalibratedError(RuntimeError):
    """A quantizer ran before its amax was set: a bug in the caller, not a user error."""


class TensorQuantizer(nn.Module):
    """Symmetric fake quantizer: per tensor (`axis=None`) or per channel along `axis`.

    `amax` is a buffer so it travels with the state dict; it is `None` until calibrated. Disabled
    quantizers pass their input through unchanged, which is how a layer is kept in FP.
    """

    amax: torch.Tensor | None

    def __init__(self, num_bits: int = 8, axis: int | None = None, unsigned: bool = False) -> None:
        super().__init__()
        self.num_bits = int(num_bits)
        self.axis = axis
        self.unsigned = bool(unsigned)
        self.enabled = True
        self.register_buffer("amax", None)
        #: (amax tensor, its version, bits, unsigned, scale): the scale of the amax last seen, so that the
        #: scan's many calls on small batch pieces do not recompute it (the cache holds the amax tensor
        #: itself, so a new amax is never mistaken for the old one)
        self._scale_cache: tuple | None = None

    def set_amax(self, amax: torch.Tensor | float) -> None:
        self.amax = torch.as_tensor(amax, dtype=torch.float32).detach().clone()

    def scale(self) -> torch.Tensor:
        """amax / qmax (read-only: shared between calls while amax, bits and sign stay the same)."""
        amax = self.amax
        if amax is None:
            raise NotCalibratedError("quantizer used before calibration")
        cache = getattr(self, "_scale_cache", None)  # modules unpickled from before the cache existed
        if (
            cache is None
            or cache[0] is not amax
            or cache[1] != amax._version
            or cache[2:4] != (self.num_bits, self.unsigned)
        ):
            cache = (
                amax,
                amax._version,
                self.num_bits,
                self.unsigned,
                amax_to_scale(amax, self.num_bits, self.unsigned),
            )
            self.__dict__["_scale_cache"] = cache
        return cache[4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        scale = self.scale().to(x.device)
        if exporting_onnx():
            return self._export_op(x, scale)
        return fake_quant(x, scale, self.num_bits, self.unsigned, self.axis)

    def _export_op(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """torch's fake-quantize ops, which the ONNX exporter turns into QuantizeLinear/DequantizeLinear.

        Only while exporting: in the graph ONNX Runtime / TensorRT then compute x / scale, the toolkit's
        convention, whatever these ops round in torch."""
        qmin, qmax = qrange(self.num_bits, self.unsigned)
        # scales become graph constants (initializers), as TensorRT requires, not ops on buffers
        if self.axis is None:
            return torch.fake_quantize_per_tensor_affine(x, float(scale), 0, qmin, qmax)
        const = torch.tensor(scale.reshape(-1).tolist(), dtype=torch.float32, device=x.device)
        zero = torch.zeros(const.numel(), dtype=torch.int32, device=x.device)
        return torch.fake_quantize_per_channel_affine(x, const, zero, self.axis, qmin, qmax)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # amax starts as None; accept a saved amax of any shape instead of refusing a shape mismatch.
        key = prefix + "amax"
        if key in state_dict:
            self.amax = state_dict[key].detach().clone().float()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        where = "per-tensor" if self.axis is None else f"axis={self.axis}"
        sign = "unsigned" if self.unsigned else "signed"
        state = "" if self.enabled else ", disabled"
        return f"{self.num_bits}-bit {sign} {where}{state}"
