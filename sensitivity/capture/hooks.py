"""Hooks in context managers, so they are always removed (even when a batch raises)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from sensitivity.capture.outputs import as_tensor
from sensitivity.quant.modules import is_wrapped_kind
from sensitivity.quant.wrapped import OpIntercept, during_forward, op_name

__all__ = ["LayerInputs", "forward_hooks", "layer_inputs"]


@contextmanager
def forward_hooks(
    model: nn.Module, names: list[str], hook: Callable[[str, nn.Module, tuple, Any], Any]
) -> Iterator[None]:
    """Call `hook(name, module, args, output)` after each named module runs."""
    handles = []
    try:
        for name in names:
            mod = model.get_submodule(name)
            handles.append(mod.register_forward_hook(lambda m, a, o, _n=name: hook(_n, m, a, o)))
        yield
    finally:
        for h in handles:
            h.remove()


class LayerInputs:
    """The tensor each layer's op actually receives: the module's first argument, except for conv
    subclasses whose forward wraps the op (pads the input, say), where the op's own input is recorded.
    Call it once per layer call (in its forward hook): the recorded input is let go then, not held until
    the layer's next call."""

    def __init__(self, taps: dict[str, OpIntercept]) -> None:
        self.taps = taps

    def __call__(self, name: str, args: tuple) -> torch.Tensor | None:
        tap = self.taps.get(name)
        if tap is not None:
            return tap.take_input()
        return as_tensor(args[0]) if args else None


@contextmanager
def layer_inputs(model: nn.Module, names: list[str]) -> Iterator[LayerInputs]:
    """`with layer_inputs(model, names) as inputs:` then `inputs(name, args)` inside a forward hook."""
    with ExitStack() as stack:
        taps: dict[str, OpIntercept] = {}
        for name in names:
            mod = model.get_submodule(name)
            if is_wrapped_kind(mod):
                op = op_name(mod)
                assert op is not None
                taps[name] = OpIntercept(op, keep_input=True)
                stack.enter_context(during_forward(mod, taps[name]))
        yield LayerInputs(taps)
