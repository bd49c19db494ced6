"""Quantized layers that subclass the float layer they replace, built with `from_float` (the registry,
`sensitivity.quant.registry`, says which replaces which).

Each holds `input_quantizer` (per tensor) and `weight_quantizer` (per output channel), so the state dict
keeps the original keys plus the quantizers'. Weights are fake-quantized once and cached: the scan runs
many batches through the same weights, and re-quantizing them per call would dominate small layers.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from sensitivity.quant.fake import exporting_onnx
from sensitivity.quant.packed import PackedWeight, pack_weight
from sensitivity.quant.quantizer import TensorQuantizer
from sensitivity.quant.smoothing import Smoother, channel_absmax, smoothed_input_amax, smoothing_factors
from sensitivity.quant.wrapped import OP_NAMES, OpIntercept, overrides_forward
from sensitivity.spec import QuantSpec

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
    "is_wrapped_kind",
    "subclass_twin",
    "weight_channel_axis",
]


def weight_channel_axis(module: nn.Module) -> int:
    """Axis of the output channels in the weight: 1 for transposed convs ([Cin, Cout/g, k...]), else 0."""
    return 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0


def per_channel_amax(weight: torch.Tensor, axis: int) -> torch.Tensor:
    dims = [d for d in range(weight.dim()) if d != axis]
    return weight.detach().abs().amax(dim=dims).float()


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
    #: inside `swapped`: the quantized weight serves one call, so it is neither packed nor cached
    _wq_transient: bool = False

    def _init_quantizers(self, spec: QuantSpec, act_unsigned: bool = False) -> None:
        axis = weight_channel_axis(self)  # type: ignore[arg-type]
        self.input_quantizer = TensorQuantizer(spec.a_bits, axis=None, unsigned=act_unsigned)
        self.weight_quantizer = TensorQuantizer(spec.w_bits, axis=axis, unsigned=False)
        self.smoother = None
        self.dynamic_alpha: float | None = None
        self.weight_quantizer.set_amax(per_channel_amax(self.weight, axis))
        #: (key, the fake-quantized weight: as codes and scale where they fit a byte) for `quantized_weight`
        self._wq_cache: tuple[tuple, PackedWeight | torch.Tensor] | None = None

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
        """The fake-quantized (smoothed) weight, recomputed only when the weight, amax or factors changed;
        cached as 8-bit codes and widened on each call (a new tensor: callers may keep or change it)."""
        wq = self.weight_quantizer
        if not wq.enabled:
            return self.smoothed_weight()
        if exporting_onnx():
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
        if self._wq_transient:  # a candidate's setting: one call, so the plain fake-quantized tensor
            with torch.no_grad():  # (packing it would be two more sweeps over the weight for nothing)
                return wq(self.smoothed_weight())
        if self._wq_cache is None or self._wq_cache[0] != key:
            with torch.no_grad():
                self._wq_cache = (key, pack_weight(wq, self.smoothed_weight()))
        cached = self._wq_cache[1]
        return cached.widened() if isinstance(cached, PackedWeight) else cached

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.smoother is not None:
            x = self.smoother(x)
        return self.input_quantizer(x)

    def _forward_with(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Run the layer's own operation on an (already quantized) input and weight."""
        raise NotImplementedError

    @contextlib.contextmanager
    def swapped(
        self, smoother: Smoother | None, input_amax: torch.Tensor | None, weight_amax: torch.Tensor | None
    ) -> Iterator[None]:
        """Run with another smoother and amaxes for the block (a candidate setting, or dynamic smoothing);
        everything is put back after, and the quantized weight is recomputed rather than cached (caching
        one per setting would hold as many extra copies of the weight)."""
        saved = (self.smoother, self.input_quantizer.amax, self.weight_quantizer.amax, self._wq_cache)
        saved_dynamic, saved_transient = self.dynamic_alpha, self._wq_transient
        self._wq_transient = True
        self.dynamic_alpha = None
        self.smoother, self.input_quantizer.amax, self.weight_quantizer.amax = (
            smoother,
            input_amax,
            weight_amax,
        )
        self._wq_cache = None
        try:
            yield
        finally:
            self.smoother, self.input_quantizer.amax, self.weight_quantizer.amax, self._wq_cache = saved
            self.dynamic_alpha, self._wq_transient = saved_dynamic, saved_transient

    def smoothing_setting(
        self, x_absmax: torch.Tensor, alpha: float
    ) -> tuple[Smoother, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(smoother, smoothed input amax, smoothed weight amax, s) for per-channel input maxima `x_absmax`."""
        s = smoothing_factors(x_absmax, self.weight_input_absmax(), alpha).to(self.weight.device)
        axis = self.weight_quantizer.axis
        assert axis is not None
        w_amax = per_channel_amax(self.weight.detach() * self._weight_input_scale(s), axis)
        return Smoother(s, self.input_channel_axis), smoothed_input_amax(x_absmax.to(s.device), s), w_amax, s

    def _dynamic_forward(self, input: object, *args: object, **kwargs: object) -> object:
        """Dynamic SmoothQuant (research): factors and input amax from this batch's own channel maxima."""
        x = getattr(input, "features", input)  # a sparse layer's input is a SparseConvTensor
        assert isinstance(x, torch.Tensor) and self.dynamic_alpha is not None
        smoother, amax, w_amax, _ = self.smoothing_setting(
            channel_absmax(x, self.input_channel_axis), self.dynamic_alpha
        )
        with self.swapped(smoother, amax, w_amax):
            return self(input, *args, **kwargs)

    def forward(self, input: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if self.dynamic_alpha is not None and self.input_quantizer.enabled:
            return self._dynamic_forward(input, *args, **kwargs)  # type: ignore[return-value]
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


class QuantWrapped(QuantMixin):
    """Twin of a conv / Linear subclass whose own `forward` wraps the op (pads the input, transforms the
    weight): that forward runs unchanged and the op receives the quantized input and weight (see
    `sensitivity.quant.wrapped`)."""

    _op: str = ""

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        if self.dynamic_alpha is not None and self.input_quantizer.enabled:
            return self._dynamic_forward(*args, **kwargs)  # type: ignore[return-value]
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
def subclass_twin(cls: type[nn.Module]) -> type[nn.Module]:
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
