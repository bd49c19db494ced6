"""The scan's passes over calibration batches: calibrate, FP (+ isolated), quantized (cumulative).

Per batch, the FP pass keeps each target layer's output only until the quantized pass of the same batch
has compared against it, so memory grows with one batch's activations, never with the number of batches.
Isolated errors are computed inside the FP pass's hooks (the layer alone quantized, on its FP input), so
they cost one extra layer call per candidate, not one extra model forward per layer.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sensitivity.capture.hooks import LayerInputs, forward_hooks, layer_inputs
from sensitivity.capture.observe import LayerObserver, RangeHistogram, channel_dim
from sensitivity.capture.outputs import OutputSelector, as_tensor, flatten_outputs
from sensitivity.data import Batch, batch_len, batch_to, run_checked, split_batch
from sensitivity.errors import FPModelError
from sensitivity.graph import eager_modules
from sensitivity.metrics import ErrorStats, reference_sums
from sensitivity.prepare import LayerInfo, layer_macs
from sensitivity.quant.spec import QuantSpec

__all__ = ["Candidate", "PassResult", "calibrate", "compare_pass"]

#: An isolated candidate: given the layer's FP call args, return the candidate's output for them.
Candidate = Callable[[tuple], Any]
Progress = Callable[[], None]


def _noop() -> None:
    return None


def calibrate(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    batches: Sequence[Batch],
    spec: QuantSpec,
    progress: Progress = _noop,
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

    names = [layer.name for layer in layers]
    with torch.no_grad(), layer_inputs(model, names) as inputs, forward_hooks(model, names, hook):
        for i, batch in enumerate(batches):
            if device is not None:
                batch = batch_to(batch, device)
            out = run_checked(model, batch, first_index + i)
            _check_fp_outputs(out, first_index + i)
            if i == 0 and outputs is not None:
                outputs(out)
            progress()
    return observers


def _all_finite(t: torch.Tensor) -> bool:
    """One cheap reduction first (a finite sum proves every element finite); the elementwise check only
    when the sum is not finite (a NaN/Inf, or merely a float overflow)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _check_fp_outputs(out: Any, index: int) -> None:
    for key, t in flatten_outputs(out).items():
        if not _all_finite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise FPModelError(
                f"the FP model itself produced {bad} NaN/Inf values in output '{key}' on batch {index}: "
                "fix the model or its inputs before quantizing"
            )


@dataclass
class PassResult:
    """Accumulated errors: isolated per (layer, candidate), cumulative per layer, per model output."""

    iso: dict[tuple[str, str], ErrorStats] = field(default_factory=lambda: defaultdict(ErrorStats))
    cum: dict[str, ErrorStats] = field(default_factory=lambda: defaultdict(ErrorStats))
    out: dict[str, ErrorStats] = field(default_factory=lambda: defaultdict(ErrorStats))
    first_nonfinite: str | None = None
    first_nonfinite_rank: float = math.inf
    #: target layers that ran (in the quantized model) up to the first non-finite value, in order
    nonfinite_upstream: list[str] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def output_stats(self) -> ErrorStats:
        total = ErrorStats()
        for s in self.out.values():
            total.merge(s)
        return total


def _micro_batch(layers: Sequence[LayerInfo], batch: Batch, budget_mb: float) -> int:
    """Samples per piece so that one piece's stored FP outputs (every target layer's, kept until the
    quantized pass of the same piece) stay within `budget_mb`; 0 = do not split. Uses the output shapes the
    calibration pass recorded (per sample: dim 0 is the batch)."""
    n = batch_len(batch)
    if not n or budget_mb <= 0 or not layers or not all(li.out_shape for li in layers):
        return 0
    per_sample = 0.0
    for li in layers:
        numel = 1
        for d in li.out_shape[1:]:
            numel *= d
        per_sample += 4.0 * numel * max(li.calls, 1)
    fits = int(budget_mb * 2**20 // max(per_sample, 1.0))
    return 0 if fits >= n else max(1, fits)


def _inside(name: str, targets: set[str]) -> bool:
    """Is `name` a submodule of one of `targets`? (its ancestors looked up in the set: linear in depth)"""
    parts = name.split(".")
    return any(".".join(parts[:i]) in targets for i in range(1, len(parts)))


def _leaf_names(model: nn.Module, targets: set[str]) -> list[str]:
    """Modules to watch for NaN/Inf: target layers and childless modules outside them (not quantizers)."""
    out = []
    for name, mod in eager_modules(model):
        if not name:
            continue
        if name in targets or (next(mod.children(), None) is None and not _inside(name, targets)):
            out.append(name)
    return out


def compare_pass(
    fp_model: nn.Module,
    q_model: nn.Module,
    layers: Sequence[LayerInfo],
    batches: Sequence[Batch],
    *,
    candidates: dict[str, dict[str, Candidate]] | None = None,
    observers: dict[str, LayerObserver] | None = None,
    histograms: dict[str, RangeHistogram] | None = None,
    outputs: OutputSelector | None = None,
    progress: Progress = _noop,
    first_index: int = 0,
    result: PassResult | None = None,
    device: torch.device | str | None = None,
    stored_budget_mb: float = 128.0,
) -> PassResult:
    """Per batch: FP pass (isolated candidates, observers) then quantized pass (cumulative vs FP)."""
    res = result if result is not None else PassResult()
    names = [layer.name for layer in layers]
    candidates = candidates or {}
    stored: dict[str, deque[torch.Tensor]] = defaultdict(deque)
    target_set = set(names)
    inputs = LayerInputs({})
    select = outputs or OutputSelector()

    def fp_hook(name: str, mod: nn.Module, args: tuple, out: Any) -> None:
        y = as_tensor(out)
        if y is None:
            return
        if observers is not None or histograms is not None:
            x = inputs(name, args)
            if x is not None and observers is not None:
                observers[name].observe(x)
            if x is not None and histograms is not None:
                histograms[name].update(x)
        cands = candidates.get(name, {})
        sums = reference_sums(y) if cands else None
        for cname, fn in cands.items():
            yc = as_tensor(fn(args))
            if yc is not None:  # the candidate's output is ours: its memory holds the difference
                res.iso[(name, cname)].update(y, yc, ref_sums=sums, consume_test=True)
        stored[name].append(y.detach().clone())

    counter = [0]
    nonfinite_at: list[tuple[int, str]] = []
    targets_called: list[str] = []
    upstream: list[str] = []

    def q_hook(name: str, mod: nn.Module, args: tuple, out: Any) -> None:
        y = as_tensor(out)
        if y is None:
            return
        queue = stored.get(name)
        if not queue:
            return
        ref = queue.popleft()
        res.cum[name].update(ref, y)
        res.calls[name] += 1
        targets_called.append(name)

    def leaf_hook(name: str, mod: nn.Module, args: tuple, out: Any) -> None:
        counter[0] += 1
        y = as_tensor(out)
        if y is not None and y.is_floating_point() and not nonfinite_at and not _all_finite(y):
            nonfinite_at.append((counter[0], name))
            upstream[:] = list(dict.fromkeys(targets_called))

    leaves = _leaf_names(q_model, target_set)
    with torch.no_grad():
        micro = _micro_batch(layers, batches[0], stored_budget_mb) if batches else 0
        pieces = [(first_index + i, piece) for i, b in enumerate(batches) for piece in split_batch(b, micro)]
        last_index = [first_index - 1]
        for index, batch in pieces:
            if device is not None:
                batch = batch_to(batch, device)
            with layer_inputs(fp_model, names) as inputs, forward_hooks(fp_model, names, fp_hook):
                fp_out = run_checked(fp_model, batch, index)
            _check_fp_outputs(fp_out, index)
            counter[0] = 0
            nonfinite_at.clear()
            targets_called.clear()
            upstream.clear()
            with forward_hooks(q_model, names, q_hook), forward_hooks(q_model, leaves, leaf_hook):
                q_out = run_checked(q_model, batch, index)
            ref_flat = select(fp_out)
            q_flat = select(q_out)
            for key, ref in ref_flat.items():
                if key in q_flat:
                    res.out[key].update(ref, q_flat[key])
            bad_outputs = [k for k, t in q_flat.items() if not _all_finite(t)]
            found: tuple[float, str] | None = None
            if nonfinite_at:
                found = (float(nonfinite_at[0][0]), nonfinite_at[0][1])
            elif bad_outputs:
                found = (math.inf, f"output:{bad_outputs[0]}")
                upstream[:] = list(dict.fromkeys(targets_called))
            if found is not None and (res.first_nonfinite is None or found[0] < res.first_nonfinite_rank):
                res.first_nonfinite_rank, res.first_nonfinite = found
                res.nonfinite_upstream = list(upstream)
            stored.clear()
            if index != last_index[0]:
                last_index[0] = index
                progress()
    return res
