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
from sensitivity.errors import FPModelError
from sensitivity.graph import eager_modules
from sensitivity.io.batches import Batch, batch_len, batch_to, run_checked, split_batch
from sensitivity.methods.base import Candidate
from sensitivity.metrics import ErrorStats, reference_sums
from sensitivity.prepare import LayerInfo
from sensitivity.quant.registry import layer_macs
from sensitivity.spec import QuantSpec

__all__ = ["PassResult", "calibrate", "compare_pass"]

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


class _NonfiniteWatch:
    """Where, in the quantized pass, the first NaN/Inf appears: the first leaf module (in call order) whose
    output is not finite, and the target layers that ran before it (where the cause must be)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.counter = 0
        self.first: tuple[int, str] | None = None
        self.called: list[str] = []
        self.upstream: list[str] = []

    def leaf_hook(self, name: str, mod: nn.Module, args: tuple, out: Any) -> None:
        self.counter += 1
        y = as_tensor(out)
        if y is not None and y.is_floating_point() and self.first is None and not _all_finite(y):
            self.first = (self.counter, name)
            self.upstream = list(dict.fromkeys(self.called))

    def found(self, q_flat: dict[str, torch.Tensor]) -> tuple[float, str, list[str]] | None:
        """(rank, where, upstream layers) of this piece's first non-finite value, or None."""
        if self.first is not None:
            return float(self.first[0]), self.first[1], self.upstream
        bad_outputs = [k for k, t in q_flat.items() if not _all_finite(t)]
        if bad_outputs:
            return math.inf, f"output:{bad_outputs[0]}", list(dict.fromkeys(self.called))
        return None


class _Compare:
    """One comparison pass's hooks and accumulators (see `compare_pass`)."""

    def __init__(
        self, res: PassResult, names: list[str], candidates: dict[str, dict[str, Candidate]],
        observers: dict[str, LayerObserver] | None, histograms: dict[str, RangeHistogram] | None,
    ) -> None:  # fmt: skip
        self.res, self.names, self.candidates = res, names, candidates
        self.observers, self.histograms = observers, histograms
        self.stored: dict[str, deque[torch.Tensor]] = defaultdict(deque)
        self.inputs = LayerInputs({})
        self.watch = _NonfiniteWatch()

    def fp_hook(self, name: str, mod: nn.Module, args: tuple, out: Any) -> None:
        y = as_tensor(out)
        if y is None:
            return
        if self.observers is not None or self.histograms is not None:
            x = self.inputs(name, args)
            if x is not None and self.observers is not None:
                self.observers[name].observe(x)
            if x is not None and self.histograms is not None:
                self.histograms[name].update(x)
        cands = self.candidates.get(name, {})
        sums = reference_sums(y) if cands else None
        for cname, fn in cands.items():
            yc = as_tensor(fn(args))
            if yc is not None:  # the candidate's output is ours: its memory holds the difference
                self.res.iso[(name, cname)].update(y, yc, ref_sums=sums, consume_test=True)
        self.stored[name].append(y.detach().clone())

    def q_hook(self, name: str, mod: nn.Module, args: tuple, out: Any) -> None:
        y = as_tensor(out)
        queue = self.stored.get(name)
        if y is None or not queue:
            return
        self.res.cum[name].update(queue.popleft(), y)
        self.res.calls[name] += 1
        self.watch.called.append(name)

    def outputs(self, fp_out: Any, q_out: Any, select: OutputSelector) -> None:
        """Model-output errors per named output, and the first non-finite value of the piece."""
        ref_flat, q_flat = select(fp_out), select(q_out)
        for key, ref in ref_flat.items():
            if key in q_flat:
                self.res.out[key].update(ref, q_flat[key])
        found = self.watch.found(q_flat)
        if found is not None and (
            self.res.first_nonfinite is None or found[0] < self.res.first_nonfinite_rank
        ):
            self.res.first_nonfinite_rank, self.res.first_nonfinite = found[0], found[1]
            self.res.nonfinite_upstream = list(found[2])
        self.stored.clear()


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
    run = _Compare(res, names, candidates or {}, observers, histograms)
    select = outputs or OutputSelector()
    leaves = _leaf_names(q_model, set(names))
    with torch.no_grad():
        micro = _micro_batch(layers, batches[0], stored_budget_mb) if batches else 0
        pieces = [(first_index + i, piece) for i, b in enumerate(batches) for piece in split_batch(b, micro)]
        last_index = first_index - 1
        for index, batch in pieces:
            if device is not None:
                batch = batch_to(batch, device)
            with layer_inputs(fp_model, names) as run.inputs, forward_hooks(fp_model, names, run.fp_hook):
                fp_out = run_checked(fp_model, batch, index)
            _check_fp_outputs(fp_out, index)
            run.watch.reset()
            with (
                forward_hooks(q_model, names, run.q_hook),
                forward_hooks(q_model, leaves, run.watch.leaf_hook),
            ):
                q_out = run_checked(q_model, batch, index)
            run.outputs(fp_out, q_out, select)
            if index != last_index:
                last_index = index
                progress()
    return res
