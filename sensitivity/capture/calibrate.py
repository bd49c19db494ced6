"""The calibration pass: every target layer's input observed over the fitting batches, and the layers'
shapes, calls per forward and MACs recorded on the way (what the report, the piece budget and the kept
outputs' budget read)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from sensitivity.capture.hooks import forward_hooks, layer_inputs
from sensitivity.capture.observe import LayerObserver, channel_dim
from sensitivity.capture.outputs import OutputSelector, as_tensor, check_fp_outputs
from sensitivity.io.batches import Batch, batch_to, run_checked
from sensitivity.prepare import LayerInfo
from sensitivity.quant.registry import layer_macs
from sensitivity.spec import QuantSpec

__all__ = ["calibrate"]


def _noop() -> None:
    return None


def calibrate(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    batches: Sequence[Batch],
    spec: QuantSpec,
    progress: Callable[[], None] = _noop,
    observers: dict[str, LayerObserver] | None = None,
    first_index: int = 0,
    device: torch.device | str | None = None,
    outputs: OutputSelector | None = None,
) -> dict[str, LayerObserver]:
    """Observe every target layer's input over `batches`; also fills shapes, calls and MACs of `layers`.
    `outputs` is tried on the first batch's output, so a selection that fails does so before any work."""
    if observers is None:
        observers = {
            layer.name: LayerObserver(spec, channel_dim(model.get_submodule(layer.name))) for layer in layers
        }
    info = {layer.name: layer for layer in layers}
    calls: dict[str, int] = defaultdict(int)  # per forward, counted on the first batch
    first = [True]

    def hook(name: str, mod: nn.Module, args: tuple, out: Any) -> None:
        x = inputs(name, args)
        y = as_tensor(out)
        if x is None or y is None:
            return
        observers[name].observe(x)
        li = info[name]
        if not li.in_shape:
            li.in_shape, li.out_shape = tuple(x.shape), tuple(y.shape)
            li.macs = layer_macs(mod, li.in_shape, li.out_shape, out)
        if first[0]:
            calls[name] += 1

    names = [layer.name for layer in layers]
    with torch.no_grad(), layer_inputs(model, names) as inputs, forward_hooks(model, names, hook):
        for i, batch in enumerate(batches):
            if device is not None:
                batch = batch_to(batch, device)
            out = run_checked(model, batch, first_index + i)
            if first[0]:
                first[0] = False
                for name, count in calls.items():
                    info[name].calls = count
            check_fp_outputs(out, first_index + i)
            if i == 0 and outputs is not None:
                outputs(out)
            progress()
    return observers
