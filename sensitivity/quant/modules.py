"""Quantized layers that subclass the float layer they replace, built with `from_float`.

Each holds `input_quantizer` (per tensor) and `weight_quantizer` (per output channel), so the state dict
keeps the original keys plus the quantizers'. Weights are fake-quantized once and cached: the scan runs
many batches through the same weights, and re-quantizing them per call would dominate small layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sensitivity.quant.quantizer import TensorQuantizer
from sensitivity.quant.spec import QuantSpec

__all__ = [
    "QUANT_MODULES",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantConvTranspose1d",
    "QuantConvTranspose2d",
    "QuantConvTranspose3d",
    "QuantLinear",
    "QuantMixin",
    "is_spconv_module",
    "quant_class_for",
    "weight_channel_axis",
]


def weight_channel_axis(module: nn.Module) -> int:
    """Axis of the output channels in the weight: 1 for transposed convs ([Cin, Cout/g, k...]), else 0."""
    return 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0


def per_channel_amax(weight: torch.Tensor, axis: int) -> torch.Tensor:
    dims = [d for d in range(weight.dim()) if d != axis]
    return weight.detach().abs().amax(dim=dims).float()


class QuantMixin:
    """Shared quantizer plumbing for the quantized layer classes."""

    input_quantizer: TensorQuantizer
    weight_quantizer: TensorQuantizer
    weight: nn.Parameter

    def _init_quantizers(self, spec: QuantSpec, act_unsigned: bool = False) -> None:
        axis = weight_channel_axis(self)  # type: ignore[arg-type]
        self.input_quantizer = TensorQuantizer(spec.a_bits, axis=None, unsigned=act_unsigned)
        self.weight_quantizer = TensorQuantizer(spec.w_bits, axis=axis, unsigned=False)
        self.weight_quantizer.set_amax(per_channel_amax(self.weight, axis))
        self._wq_cache: tuple[tuple, torch.Tensor] | None = None

    @classmethod
    def from_float(cls, module: nn.Module, spec: QuantSpec, act_unsigned: bool = False) -> nn.Module:
        """Re-class `module` (already a deepcopy: its parameters are shared, not copied) as quantized."""
        base = next(b for b in cls.__mro__ if b in QUANT_MODULES)
        if type(module) is not base:
            raise TypeError(f"{cls.__name__}.from_float expects {base.__name__}, got {type(module).__name__}")
        qmod = cls.__new__(cls)
        qmod.__dict__ = module.__dict__.copy()
        qmod._parameters = module._parameters.copy()
        qmod._buffers = module._buffers.copy()
        qmod._modules = module._modules.copy()
        qmod._forward_hooks = type(module._forward_hooks)()
        qmod._forward_pre_hooks = type(module._forward_pre_hooks)()
        qmod._init_quantizers(spec, act_unsigned)
        return qmod

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight, recomputed only when the weight or its amax changed."""
        wq = self.weight_quantizer
        if not wq.enabled:
            return self.weight
        amax = wq.amax
        key = (id(self.weight), self.weight._version, id(amax), amax._version if amax is not None else -1)
        if self._wq_cache is None or self._wq_cache[0] != key:
            with torch.no_grad():
                self._wq_cache = (key, wq(self.weight.detach()))
        return self._wq_cache[1]

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_quantizer(x)


class _QuantConv(QuantMixin):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._quant_input(input), self.quantized_weight(), self.bias)  # type: ignore[attr-defined]


class QuantConv1d(_QuantConv, nn.Conv1d):
    pass


class QuantConv2d(_QuantConv, nn.Conv2d):
    pass


class QuantConv3d(_QuantConv, nn.Conv3d):
    pass


class QuantLinear(QuantMixin, nn.Linear):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(self._quant_input(input), self.quantized_weight(), self.bias)


class _QuantConvTranspose(QuantMixin):
    _conv_fn = staticmethod(F.conv_transpose2d)
    _nd = 2

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        output_padding = self._output_padding(  # type: ignore[attr-defined]
            input,
            output_size,
            self.stride,
            self.padding,
            self.kernel_size,
            self._nd,
            self.dilation,  # type: ignore[attr-defined]
        )
        return self._conv_fn(
            self._quant_input(input),
            self.quantized_weight(),
            self.bias,  # type: ignore[attr-defined]
            self.stride,  # type: ignore[attr-defined]
            self.padding,  # type: ignore[attr-defined]
            output_padding,
            self.groups,  # type: ignore[attr-defined]
            self.dilation,  # type: ignore[attr-defined]
        )


class QuantConvTranspose1d(_QuantConvTranspose, nn.ConvTranspose1d):
    _conv_fn = staticmethod(F.conv_transpose1d)
    _nd = 1


class QuantConvTranspose2d(_QuantConvTranspose, nn.ConvTranspose2d):
    _conv_fn = staticmethod(F.conv_transpose2d)
    _nd = 2


class QuantConvTranspose3d(_QuantConvTranspose, nn.ConvTranspose3d):
    _conv_fn = staticmethod(F.conv_transpose3d)
    _nd = 3


QUANT_MODULES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
    nn.ConvTranspose1d: QuantConvTranspose1d,
    nn.ConvTranspose2d: QuantConvTranspose2d,
    nn.ConvTranspose3d: QuantConvTranspose3d,
    nn.Linear: QuantLinear,
}


def is_spconv_module(module: nn.Module) -> bool:
    """True for modules whose class comes from spconv (checked by name: spconv is imported only if used)."""
    return type(module).__module__.split(".", 1)[0] == "spconv"


def quant_class_for(module: nn.Module) -> type[nn.Module] | None:
    """The quantized class for exactly this float type (subclasses are user layers with their own forward);
    spconv convolutions resolve through `sensitivity.integrations.spconv`, imported only for them."""
    cls = QUANT_MODULES.get(type(module))
    if cls is None and is_spconv_module(module):
        from sensitivity.integrations.spconv import sparse_quant_class_for

        cls = sparse_quant_class_for(module)
    return cls
