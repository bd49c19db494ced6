"""The calibration pass: every target layer's input observed over the fitting batches, and the layers'
shapes, calls per forward, MACs and FP time recorded on the way (what the report, the piece budget and the
kept outputs' budget read: a kept output saves its layer's time, and spconv's CPU kernels take several
times longer per multiply-add than a dense convolution)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from sensitivity.capture.hooks import forward_hooks, layer_inputs
from sensitivity.capture.observe import LayerObserver, channel_dim
from sensitivity.capture.outputs import OutputSelector, as_tensor, check_fp_outputs
from sensitivity.io.batches import Batch, batch_len, batch_to, run_checked
from sensitivity.prepare import LayerInfo
from sensitivity.quant.registry import layer_macs
from sensitivity.spec import QuantSpec

__all__ = ["calibrate"]


def _noop() -> None:
    return None


@contextmanager
def _timed(model: nn.Module, names: list[str], seconds: dict[str, float]) -> Iterator[None]:
    """Each named module's own time per call, summed into `seconds` (entered before any other forward
    hook, so the clock stops before the observers' work)."""
    started: dict[str, float] = {}

    def start(name: str) -> None:
        started[name] = time.perf_counter()

    def stop(name: str) -> None:
        t = started.pop(name, None)
        if t is not None:
            seconds[name] += time.perf_counter() - t

    with ExitStack() as stack:
        for name in names:
            mod = model.get_submodule(name)
            stack.callback(mod.register_forward_pre_hook(lambda m, a, _n=name: start(_n)).remove)
            stack.callback(mod.register_forward_hook(lambda m, a, o, _n=name: stop(_n)).remove)
        yield


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
    seconds: dict[str, float] = defaultdict(float)
    samples = 0
    with (
        torch.no_grad(),
        _timed(model, names, seconds),
        layer_inputs(model, names) as inputs,
        forward_hooks(model, names, hook),
    ):
        for i, batch in enumerate(batches):
            if device is not None:
                batch = batch_to(batch, device)
            samples += batch_len(batch) or 1
            out = run_checked(model, batch, first_index + i)
            if first[0]:
                first[0] = False
                for name, count in calls.items():
                    info[name].calls = count
            check_fp_outputs(out, first_index + i)
            if i == 0 and outputs is not None:
                outputs(out)
            progress()
    for name, total in seconds.items():
        info[name].seconds = total / (samples * max(info[name].calls, 1))
    return observers
