"""Quantized layers that subclass the float layer they replace, built with `from_float`.

Each holds `input_quantizer` (per tensor) and `weight_quantizer` (per output channel), so the state dict
keeps the original keys plus the quantizers'. Weights are fake-quantized once and cached: the scan runs
many batches through the same weights, and re-quantizing them per call would dominate small layers.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from sensitivity.quant.quantizer import TensorQuantizer
from sensitivity.quant.spec import QuantSpec
from sensitivity.quant.wrapped import OP_NAMES, OpIntercept, overrides_forward

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
    "QuantWrapped",
    "Smoother",
    "is_spconv_module",
    "is_wrapped_kind",
    "quant_class_for",
    "weight_channel_axis",
]


def weight_channel_axis(module: nn.Module) -> int:
    """Axis of the output channels in the weight: 1 for transposed convs ([Cin, Cout/g, k...]), else 0."""
    return 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0


def per_channel_amax(weight: torch.Tensor, axis: int) -> torch.Tensor:
    dims = [d for d in range(weight.dim()) if d != axis]
    return weight.detach().abs().amax(dim=dims).float()


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
        if torch.onnx.is_in_onnx_export():  # one Mul by a constant in the graph
            inv = torch.tensor(inv.tolist(), dtype=torch.float32, device=x.device)
        return x * inv.to(x.dtype).reshape(shape)

    def extra_repr(self) -> str:
        folded = ", folded into the producer" if self.folded else ""
        return f"channels={self.scale.numel()}, axis={self.channel_axis}{folded}"


class QuantMixin:
    """Shared quantizer plumbing for the quantized layer classes.

    A subclass says how its weight relates to input channels (`_weight_input_scale`) and how to run the
    layer on an already-quantized input and weight (`_forward_with`); everything else is shared.
    """

    input_quantizer: TensorQuantizer
    weight_quantizer: TensorQuantizer
    smoother: Smoother | None
    weight: nn.Parameter
    #: input-channel axis of the layer's *input* tensor (1 for N,C,... ; -1 for Linear / sparse features)
    input_channel_axis: int = 1

    def _init_quantizers(self, spec: QuantSpec, act_unsigned: bool = False) -> None:
        axis = weight_channel_axis(self)  # type: ignore[arg-type]
        self.input_quantizer = TensorQuantizer(spec.a_bits, axis=None, unsigned=act_unsigned)
        self.weight_quantizer = TensorQuantizer(spec.w_bits, axis=axis, unsigned=False)
        self.smoother = None
        self.dynamic_alpha: float | None = None
        self.weight_quantizer.set_amax(per_channel_amax(self.weight, axis))
        self._wq_cache: tuple[tuple, torch.Tensor] | None = None

    @classmethod
    def float_class(cls) -> type[nn.Module]:
        return next(b for b in cls.__mro__ if b in QUANT_MODULES or getattr(cls, "_float_cls", None) is b)

    @classmethod
    def from_float(cls, module: nn.Module, spec: QuantSpec, act_unsigned: bool = False) -> nn.Module:
        """Re-class `module` (already a deepcopy: its parameters are shared, not copied) as quantized."""
        base = cls.float_class()
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

    # -- how the weight relates to input channels (overridden per layer family) -------------------------
    def _weight_input_scale(self, s: torch.Tensor) -> torch.Tensor:
        """`s` (one factor per input channel) laid out to multiply the weight (dense conv layout)."""
        w = self.weight
        groups = getattr(self, "groups", 1)
        cout, cin_g = w.shape[0], w.shape[1]
        shape = (cout, cin_g, *([1] * (w.dim() - 2)))
        if groups == 1:
            return s.reshape(1, -1, *([1] * (w.dim() - 2))).expand(shape)
        group_of_out = torch.arange(cout, device=s.device) // (cout // groups)
        idx = group_of_out[:, None] * cin_g + torch.arange(cin_g, device=s.device)[None, :]
        return s[idx].reshape(shape)

    def weight_input_absmax(self) -> torch.Tensor:
        """max |W| over everything that multiplies each input channel: SmoothQuant's weight statistic."""
        w = self.weight.detach().abs()
        groups = getattr(self, "groups", 1)
        per = w.amax(dim=tuple(range(2, w.dim()))) if w.dim() > 2 else w  # [Cout, Cin/g]
        cout, cin_g = per.shape
        return per.reshape(groups, cout // groups, cin_g).amax(dim=1).reshape(-1).float()

    # -- SmoothQuant ------------------------------------------------------------------------------------
    def set_smoothing(self, scale: torch.Tensor | None) -> None:
        """Install (or with None remove) per-input-channel factors s: input * 1/s, weight * s.

        The weight amax is recomputed for the smoothed weight, since per-channel maxima change with s."""
        if scale is None:
            self.smoother = None
        else:
            self.smoother = Smoother(scale.to(self.weight.device), self.input_channel_axis)
        axis = self.weight_quantizer.axis
        assert axis is not None
        self.weight_quantizer.set_amax(per_channel_amax(self.smoothed_weight(), axis))
        self._wq_cache = None

    def smoothed_weight(self) -> torch.Tensor:
        w = self.weight.detach()
        if self.smoother is None or self.smoother.weight_baked:
            return w
        return w * self._weight_input_scale(self.smoother.scale.to(w.dtype))

    def bake_smoothing_(self) -> None:
        """Store W * s as the weight itself (what gets deployed); the smoother keeps only the input side."""
        if self.smoother is None or self.smoother.weight_baked:
            return
        with torch.no_grad():
            self.weight.copy_(self.smoothed_weight())
        self.smoother.weight_baked = True
        self._wq_cache = None

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized (smoothed) weight, recomputed only when the weight, amax or factors changed."""
        wq = self.weight_quantizer
        if not wq.enabled:
            return self.smoothed_weight()
        if torch.onnx.is_in_onnx_export():
            return wq(self.smoothed_weight())  # Q/DQ nodes on the weight, as TensorRT expects
        amax = wq.amax
        sm = self.smoother
        key = (
            id(self.weight),
            self.weight._version,
            id(amax),
            amax._version if amax is not None else -1,
            id(sm.scale) if sm is not None else 0,
            sm.scale._version if sm is not None else -1,
        )
        if self._wq_cache is None or self._wq_cache[0] != key:
            with torch.no_grad():
                self._wq_cache = (key, wq(self.smoothed_weight()))
        return self._wq_cache[1]

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.smoother is not None:
            x = self.smoother(x)
        return self.input_quantizer(x)

    def _forward_with(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Run the layer's own operation on an (already quantized) input and weight."""
        raise NotImplementedError

    def forward(self, input: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if self.dynamic_alpha is not None and self.input_quantizer.enabled:
            # dynamic SmoothQuant (research): factors and input amax from this batch
            from sensitivity.smoothquant import SmoothCandidate

            return SmoothCandidate(self, self.dynamic_alpha, "dynamic")((input, *args, *kwargs.values()))
        return self._forward_with(self._quant_input(input), self.quantized_weight(), *args, **kwargs)


class _QuantConv(QuantMixin):
    def _forward_with(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, weight, self.bias)  # type: ignore[attr-defined]


class QuantConv1d(_QuantConv, nn.Conv1d):
    pass


class QuantConv2d(_QuantConv, nn.Conv2d):
    pass


class QuantConv3d(_QuantConv, nn.Conv3d):
    pass


class QuantLinear(QuantMixin, nn.Linear):
    input_channel_axis = -1

    def _weight_input_scale(self, s: torch.Tensor) -> torch.Tensor:
        return s.reshape(1, -1)

    def weight_input_absmax(self) -> torch.Tensor:
        return self.weight.detach().abs().amax(dim=0).float()

    def _forward_with(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.bias)


class _QuantConvTranspose(QuantMixin):
    _conv_fn = staticmethod(F.conv_transpose2d)
    _nd = 2

    def _weight_input_scale(self, s: torch.Tensor) -> torch.Tensor:
        # weight [Cin, Cout/g, k...]: the input channel is dim 0
        return s.reshape(-1, *([1] * (self.weight.dim() - 1)))

    def weight_input_absmax(self) -> torch.Tensor:
        w = self.weight.detach().abs()
        return w.reshape(w.shape[0], -1).amax(dim=1).float()

    def _forward_with(
        self, x: torch.Tensor, weight: torch.Tensor, output_size: list[int] | None = None
    ) -> torch.Tensor:
        output_padding = self._output_padding(  # type: ignore[attr-defined]
            x,
            output_size,
            self.stride,  # type: ignore[attr-defined]
            self.padding,  # type: ignore[attr-defined]
            self.kernel_size,  # type: ignore[attr-defined]
            self._nd,
            self.dilation,  # type: ignore[attr-defined]
        )
        return self._conv_fn(
            x,
            weight,
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
    """True for modules whose class is (or, like our quantized wrappers, derives from) a spconv class;
    checked by module name, so spconv is imported only where it is used."""
    return any(c.__module__.split(".", 1)[0] == "spconv" for c in type(module).__mro__[:-1])


class QuantWrapped(QuantMixin):
    """Twin of a conv / Linear subclass whose own `forward` wraps the op (pads the input, transforms the
    weight): that forward runs unchanged and the op receives the quantized input and weight (see
    `sensitivity.quant.wrapped`)."""

    _op: str = ""

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        with OpIntercept(self._op, self._quantize_op_args):
            return self._float_cls.forward(self, *args, **kwargs)  # type: ignore[attr-defined]

    def _quantize_op_args(self, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._quant_input(x)
        if w is self.weight:
            return x, self.quantized_weight()
        if self.smoother is not None and not self.smoother.folded:
            raise RuntimeError(
                f"{type(self).__name__}: SmoothQuant cannot apply to a layer whose forward transforms its weight"
            )
        if not self.weight_quantizer.enabled:
            return x, w
        # a weight computed in forward (e.g. standardized): quantized as it reaches the op, own amax
        wq = TensorQuantizer(self.weight_quantizer.num_bits, axis=self.weight_quantizer.axis)
        wq.set_amax(per_channel_amax(w, self.weight_quantizer.axis))  # type: ignore[arg-type]
        return x, wq(w)


@functools.cache
def _subclass_twin(cls: type[nn.Module]) -> type[nn.Module]:
    """The quantized twin of a user subclass of a supported layer: it subclasses `cls` (isinstance, methods
    and state-dict keys stay the user's). Without its own forward, the base's quantized forward serves;
    with one, `QuantWrapped` runs it and quantizes at the op."""
    base = next(b for b in cls.__mro__ if b in QUANT_MODULES)
    if overrides_forward(cls):
        bases: tuple[type, ...] = (QuantWrapped, cls)
        attrs: dict[str, object] = {"_float_cls": cls, "_op": OP_NAMES[base]}
        if issubclass(cls, nn.Linear):
            attrs.update(
                input_channel_axis=-1,
                _weight_input_scale=QuantLinear._weight_input_scale,
                weight_input_absmax=QuantLinear.weight_input_absmax,
            )
        elif issubclass(cls, nn.modules.conv._ConvTransposeNd):
            attrs.update(
                _weight_input_scale=_QuantConvTranspose._weight_input_scale,
                weight_input_absmax=_QuantConvTranspose.weight_input_absmax,
            )
    else:
        bases, attrs = (QUANT_MODULES[base], cls), {"_float_cls": cls}
    twin = type(f"Quant{cls.__name__}", bases, {**attrs, "__module__": cls.__module__})
    twin.__qualname__ = twin.__name__
    return twin


def is_wrapped_kind(module: nn.Module) -> bool:
    """A float layer (not one of ours) whose class overrides the torch layer's forward: its op input and
    weight are only seen by intercepting the op."""
    cls = type(module)
    return (
        cls not in QUANT_MODULES
        and not isinstance(module, QuantMixin)
        and any(b in QUANT_MODULES for b in cls.__mro__)
        and overrides_forward(cls)
    )


def quant_class_for(module: nn.Module) -> type[nn.Module] | None:
    """The quantized class for this float layer: its exact twin for the torch types, a generated twin for
    their subclasses (`_subclass_twin`), None for our own quantized layers and other modules; spconv
    convolutions resolve through `sensitivity.integrations.spconv`, imported only for them."""
    cls = QUANT_MODULES.get(type(module))
    if cls is not None or isinstance(module, QuantMixin):
        return cls
    if is_spconv_module(module):
        from sensitivity.integrations.spconv import sparse_quant_class_for

        return sparse_quant_class_for(module)
    if any(b in QUANT_MODULES for b in type(module).__mro__):
        return _subclass_twin(type(module))
    return None
