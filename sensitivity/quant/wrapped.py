"""Quantized twins of conv / Linear *subclasses* whose own `forward` wraps the op.

Real code subclasses convs all the time: EfficientNet's `Conv2dStaticSamePadding` pads its input in
`forward`, timm's `Conv2dSame` does the same, `StdConv2d` standardizes its weight before the op, mmcv-style
layers add their own plumbing. Re-classing such a layer as `QuantConv2d` would drop that `forward`; keeping
the subclass and quantizing its module input would quantize the wrong tensor. Instead the twin subclasses
the user's class, runs the user's `forward` unchanged, and an `OpIntercept` (a TorchFunctionMode active
only during that call) hands the one conv / linear op the quantized input and weight: the tensors that
actually reach the op, as a deployed Q/DQ graph would quantize them.

A weight that reaches the op as `self.weight` uses the layer's cached, smoothed, quantized weight; a weight
the `forward` computed (standardized, reparametrized) is quantized per output channel as it arrives, with
its own amax. Such layers get no BN folding and no SmoothQuant (scaling the stored weight would be undone
or distorted by the transform): `probing` tells the scan which layers those are.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "OP_NAMES",
    "OpIntercept",
    "OpProbe",
    "call_as_caller",
    "during_forward",
    "op_name",
    "overrides_forward",
    "probing",
]

#: The functional op each supported float layer type calls (`F.conv2d` is `torch.conv2d`, named "conv2d").
OP_NAMES: dict[type[nn.Module], str] = {
    nn.Conv1d: "conv1d",
    nn.Conv2d: "conv2d",
    nn.Conv3d: "conv3d",
    nn.ConvTranspose1d: "conv_transpose1d",
    nn.ConvTranspose2d: "conv_transpose2d",
    nn.ConvTranspose3d: "conv_transpose3d",
    nn.Linear: "linear",
}

#: Methods of the torch base classes a subclass may override to change what reaches the op.
_FORWARD_METHODS = ("forward", "_conv_forward")


def op_name(module_or_cls: nn.Module | type) -> str | None:
    """The op name of the nearest supported torch base class (None for other modules)."""
    cls = module_or_cls if isinstance(module_or_cls, type) else type(module_or_cls)
    for base in cls.__mro__:
        if base in OP_NAMES:
            return OP_NAMES[base]
    return None


def overrides_forward(cls: type) -> bool:
    """True when `cls` (a subclass of a supported torch layer) replaces `forward` or `_conv_forward`."""
    base = next(b for b in cls.__mro__ if b in OP_NAMES)
    return any(getattr(cls, m, None) is not getattr(base, m, None) for m in _FORWARD_METHODS)


def call_as_caller(func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """`func(*args, **kwargs)` from inside a TorchFunctionMode handler, with the warnings it raises
    attributed to the code that called the torch function (two frames up: the mode's handler is called
    straight from that code), not to the handler: a user's model warning must point at the user's line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = func(*args, **kwargs)
    if caught:
        frame = _user_frame(sys._getframe(2))
        registry = frame.f_globals.setdefault("__warningregistry__", {})
        module = frame.f_globals.get("__name__", "<model>")
        for w in caught:
            warnings.warn_explicit(
                w.message, w.category, frame.f_code.co_filename, frame.f_lineno, module, registry
            )
    return out


_INTERNAL = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__)))


def _user_frame(frame: types.FrameType) -> types.FrameType:
    """The nearest frame outside torch and this package (torch's Python wrappers such as F.interpolate
    dispatch to the mode from their own code), or `frame` when there is none."""
    found: types.FrameType | None = frame
    while found is not None and found.f_code.co_filename.startswith(_INTERNAL):
        found = found.f_back
    return found or frame


def _split(args: tuple, kwargs: dict) -> tuple[Any, Any]:
    x = args[0] if args else kwargs.get("input")
    w = args[1] if len(args) > 1 else kwargs.get("weight")
    return x, w


def _replace(args: tuple, kwargs: dict, x: Any, w: Any) -> tuple[tuple, dict]:
    args = list(args)  # type: ignore[assignment]
    if args:
        args[0] = x  # type: ignore[index]
    else:
        kwargs = {**kwargs, "input": x}
    if len(args) > 1:
        args[1] = w  # type: ignore[index]
    else:
        kwargs = {**kwargs, "weight": w}
    return tuple(args), kwargs


class OpIntercept(TorchFunctionMode):
    """While active, every call of the torch function named `op` gets `transform(input, weight)` applied to
    its input and weight first (None: just record). Counts the calls and keeps the weight seen last, and
    with `keep_input` / `keep_output` the op's last input / output until `take_input` / `take_output`.

    Torch functions other than `op` pass through untouched; inside the handler the mode is inactive (torch
    pops it), so the transform's own ops are not intercepted. Nothing is kept unasked: a tensor held here
    outlives the model's own reference, and on a model whose convs pad their input (TF SAME padding) the
    last input and output of every layer, held through a forward, had been the scan's peak memory."""

    def __init__(
        self, op: str, transform: Callable[[Any, Any], tuple[Any, Any]] | None = None,
        keep_input: bool = False, keep_output: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.op = op
        self.transform = transform
        self.keep_input, self.keep_output = keep_input, keep_output
        self.calls = 0
        self.last_input: torch.Tensor | None = None
        self.last_output: Any = None
        self.weight: Any = None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) != self.op:
            return call_as_caller(func, args, kwargs)
        self.calls += 1
        x, w = _split(args, kwargs)
        self.weight = w
        if self.keep_input:
            self.last_input = x
        if self.transform is not None:
            args, kwargs = _replace(args, kwargs, *self.transform(x, w))
        out = call_as_caller(func, args, kwargs)
        if self.keep_output:
            self.last_output = out
        return out

    def take_input(self) -> torch.Tensor | None:
        """The op's last input (`keep_input`), let go here."""
        x, self.last_input = self.last_input, None
        return x

    def take_output(self) -> Any:
        """The op's last output (`keep_output`), let go here."""
        out, self.last_output = self.last_output, None
        return out


@dataclass(frozen=True)
class OpProbe:
    """What a wrapped layer's calls did: how often it called its op, and whether the weight that reached
    the op was the stored parameter (False: `forward` computed it, e.g. weight standardization)."""

    calls: int
    module_calls: int
    weight_is_parameter: bool
    #: the module returned the op's output itself (nothing applied after it): BN folds into it exactly
    returns_op_output: bool

    @property
    def problem(self) -> str | None:
        """Why the layer cannot be quantized through its op, or None."""
        if self.module_calls and self.calls != self.module_calls:
            per = self.calls / self.module_calls
            return f"its forward calls {self.op_word} {per:g} times per call (quantizable: exactly once)"
        return None

    op_word: str = "its op"


class probing:
    """`with probing(modules) as probes:` run the model once; then `probes[name]()` is that layer's
    `OpProbe`. Each module's op is recorded only inside its own forward."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> dict[str, Callable[[], OpProbe]]:
        probes: dict[str, Callable[[], OpProbe]] = {}
        for name, module in self.modules.items():
            op = op_name(module)
            assert op is not None, type(module)
            seen = OpIntercept(op, keep_output=True)
            counter = _CallCounter()
            self.stack.enter_context(during_forward(module, seen, counter))
            probes[name] = functools.partial(_probe_result, module, seen, counter, op)
        return probes

    def __exit__(self, *exc: object) -> None:
        self.stack.close()


@dataclass
class _CallCounter:
    calls: int = 0
    returns_op_output: bool = True


def _probe_result(module: nn.Module, seen: OpIntercept, counter: _CallCounter, op: str) -> OpProbe:
    weight = getattr(module, "weight", None)
    weight_ok = seen.weight is None or seen.weight is weight
    return OpProbe(seen.calls, counter.calls, weight_ok, counter.returns_op_output, f"{op}()")


@contextlib.contextmanager
def during_forward(
    module: nn.Module, mode: TorchFunctionMode, counter: _CallCounter | None = None
) -> Iterator[None]:
    """`mode` is active inside every call of `module`'s own forward while the block runs (an instance-level
    `forward`, removed after), so the op calls of other modules are never seen."""
    inner = type(module).forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        with mode:
            out = inner(module, *args, **kwargs)
        if counter is not None:
            counter.calls += 1
            take = getattr(mode, "take_output", None)
            counter.returns_op_output &= callable(take) and out is take()
        return out

    module.__dict__["forward"] = forward
    try:
        yield
    finally:
        module.__dict__.pop("forward", None)
