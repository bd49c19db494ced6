"""FP layer outputs kept once, so that a configuration with few quantized layers skips every FP layer whose
input is still the FP model's own.

Why: an exact check quantizes one layer and runs the whole model over the held-out batches. Every layer
that runs before it, and every later one its change does not reach (the other heads of a detector), then
computes what the FP model computed. On the real OpenPCDet CenterPoint a dozen such checks were a third of
the scan, nearly all of it spent recomputing the BEV backbone and the other heads.

Which layers can be skipped is decided per call, from the data, not from the recorded dataflow: a layer in
FP whose input equals the FP model's input of the same call bit for bit returns the kept output (a copy:
the model may write into it); a quantized layer, or one whose input differs, runs. The input is compared
whole (`torch.equal`): a fingerprint such as its sum misses the last-bit changes a quantized layer far
upstream leaves, and those still move the model's outputs. A sparse layer's input is compared by its active
sites and features (spconv: the BEV backbone's input, and every sparse layer before a quantized one, is then
served too). The kept layers are those that save the most time per byte kept (their input and output;
each layer's own time in the calibration pass), within a memory budget."""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sensitivity.capture.outputs import as_tensor
from sensitivity.capture.recorded import RecordedCall
from sensitivity.io.batches import Batch, batch_to, run_checked
from sensitivity.prepare import LayerInfo

__all__ = ["MIN_MACS_PER_VALUE", "KeptOutputs", "Serving"]

#: a layer is worth keeping when it does at least this many multiply-adds per output value (a kept output
#: costs comparing the input and copying the output, a few passes over memory; a depthwise 3x3 conv does 9)
MIN_MACS_PER_VALUE = 128


def _same_tensor(x: torch.Tensor, kept: torch.Tensor) -> bool:
    return (
        x.shape == kept.shape and x.dtype == kept.dtype and x.device == kept.device and torch.equal(x, kept)
    )


def _sparse(value: Any) -> bool:
    """A spconv SparseConvTensor (duck-typed): features at active sites, their indices, `replace_feature`."""
    return (
        isinstance(getattr(value, "features", None), torch.Tensor)
        and isinstance(getattr(value, "indices", None), torch.Tensor)
        and callable(getattr(value, "replace_feature", None))
    )


def _same(x: Any, kept: Any) -> bool:
    """The same input bit for bit: a tensor, or a sparse tensor's active sites, grid and features (the rule
    books a kept output carries were built for those sites: a layer after it that runs finds the ones its
    own call would have built)."""
    if type(x) is torch.Tensor or type(kept) is torch.Tensor:
        return type(x) is torch.Tensor and type(kept) is torch.Tensor and _same_tensor(x, kept)
    return (
        _sparse(x)
        and list(x.spatial_shape) == list(kept.spatial_shape)
        and x.batch_size == kept.batch_size
        and _same_tensor(x.indices, kept.indices)
        and _same_tensor(x.features, kept.features)
    )


def _servable(value: Any) -> bool:
    """A plain tensor or a sparse tensor: what a kept call's input and output may be."""
    return type(value) is torch.Tensor or _sparse(value)


def _input_of(args: tuple) -> Any:
    """The layer's one argument, a tensor or a sparse tensor (None for any other call: those always run)."""
    return args[0] if len(args) == 1 and _servable(args[0]) else None


def _copy(value: Any) -> Any:
    """A copy of a kept tensor (a sparse one: of its features; its sites are never written into)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return value.replace_feature(value.features.detach().clone())


def _numel(value: Any) -> int:
    t = as_tensor(value)
    return t.numel() if t is not None else 0


@dataclass
class _Call:
    x: Any
    #: the output (a tensor or a sparse tensor), or the recorded call that gives it (computed again there
    #: where it was not kept)
    source: Any

    @property
    def out(self) -> Any:
        return self.source.output() if isinstance(self.source, RecordedCall) else self.source


def _worth(
    layers: Sequence[LayerInfo],
    budget_mb: float,
    samples: int,
    values: dict[str, tuple[int, int]] | None = None,
) -> list[str]:
    """The layers to keep: most time saved per value kept (input and output) first, in execution order
    among equals, while `samples` samples of all their calls fit `budget_mb` (a layer that does not fit
    leaves room for a smaller one); never layers of unknown shape or few multiply-adds per output value.
    The time is each layer's own, timed in the calibration pass, or its multiply-adds where any layer was
    not timed (a resumed calibration). `values`: (inputs, outputs) counted on the kept calls themselves,
    per layer whose shapes do not give them (a sparse layer's first dim is its active sites, not the batch)."""
    scored: list[tuple[float, int, str, float]] = []
    values = values or {}
    timed = all(li.seconds > 0 for li in layers)
    for li in layers:
        if not li.out_shape or not li.in_shape or li.macs <= 0:
            continue
        # `macs`, `seconds`: one call of one sample (a sparse layer's: over the active sites of the call)
        calls = max(li.calls, 1)
        ins, outs = values.get(li.name) or (
            math.prod(li.in_shape[1:]) * calls * samples,
            math.prod(li.out_shape[1:]) * calls * samples,
        )
        if li.macs * calls * samples >= MIN_MACS_PER_VALUE * outs:
            cost = li.seconds if timed else float(li.macs)
            scored.append(
                (-cost * calls * samples / (outs + ins), li.order, li.name, 4.0 * (outs + ins) / 2**20)
            )
    kept, used = [], 0.0
    for _, _, name, mb in sorted(scored):
        if used + mb <= budget_mb:
            kept.append(name)
            used += mb
    return kept


class KeptOutputs:
    """The FP model's inputs and outputs of the chosen layers on each piece, call by call."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        #: per piece (position in the pieces' list): layer -> its calls in order
        self.pieces: list[dict[str, list[_Call]]] = []
        self.hits = 0
        self.misses = 0

    @classmethod
    def record(
        cls, fp: nn.Module, layers: Sequence[LayerInfo], pieces: Sequence[tuple[int, Batch]], samples: int,
        budget_mb: float, device: str | torch.device | None = None,
    ) -> KeptOutputs:  # fmt: skip
        """One FP forward over `pieces` (`samples` in the largest) keeping the outputs of the layers worth it."""
        kept = cls(_worth(layers, budget_mb, samples))
        if not kept.names:
            return kept
        current: dict[str, list[_Call]] = defaultdict(list)

        def hook(name: str, mod: nn.Module, args: tuple, out: Any) -> None:
            x = _input_of(args)
            if x is not None and _servable(out):
                current[name].append(_Call(_copy(x), _copy(out)))

        with contextlib.ExitStack() as stack, torch.no_grad():
            for name in kept.names:
                mod = fp.get_submodule(name)
                stack.callback(mod.register_forward_hook(lambda m, a, o, _n=name: hook(_n, m, a, o)).remove)
            for index, piece in pieces:
                batch = batch_to(piece, device) if device is not None else piece
                run_checked(fp, batch, index)
                kept.pieces.append(dict(current))
                current.clear()
        return kept

    @classmethod
    def of_calls(
        cls, layers: Sequence[LayerInfo], calls: Sequence[RecordedCall], samples: int, budget_mb: float
    ) -> KeptOutputs:
        """The same from a forward already recorded call by call (the output probes' forward of the only
        held-out piece): no forward runs, and the kept tensors are that forward's own, not copies (nothing
        may write into them afterwards: `RecordedForward.intact` says so); an output the forward did not
        keep is the one its replay computes again (`RecordedCall.output`)."""
        values: dict[str, tuple[int, int]] = {}
        for call in calls:  # a sparse layer's size is its active sites': counted here, not from shapes
            if call.out is not None and _sparse(call.out) and _sparse(_input_of(call.args)):
                ins, outs = values.get(call.name, (0, 0))
                values[call.name] = (ins + _numel(call.args[0]), outs + _numel(call.out))
        kept = cls(_worth(layers, budget_mb, samples, values))
        chosen = set(kept.names)
        current: dict[str, list[_Call]] = defaultdict(list)
        for call in calls:
            x, out = _input_of(call.args), call.out
            if call.name in chosen and x is not None and (out is None or _servable(out)):
                current[call.name].append(_Call(x, call if out is None else out))
        kept.pieces.append(dict(current))
        return kept

    @contextlib.contextmanager
    def serving(self, model: nn.Module, fp_names: set[str]) -> Iterator[Serving]:
        """Within the block, the kept layers of `model` that are in FP (`fp_names`) return the kept output
        wherever their input is the FP one; `serving.piece(i)` before each piece's forward."""
        serving = Serving(self)
        mods = [(n, model.get_submodule(n)) for n in self.names if n in fp_names]
        own = {id(mod): mod.__dict__["forward"] for _, mod in mods if "forward" in mod.__dict__}
        try:
            for name, mod in mods:
                mod.forward = serving.wrap(name, mod)  # type: ignore[method-assign]
            yield serving
        finally:
            for _, mod in mods:  # a forward the module had as its own attribute is put back
                mod.__dict__.pop("forward", None)
                if id(mod) in own:
                    mod.forward = own[id(mod)]  # type: ignore[method-assign]


class Serving:
    """The kept outputs handed out during one `KeptOutputs.serving` block, piece by piece."""

    def __init__(self, kept: KeptOutputs) -> None:
        self.kept = kept
        self.calls: dict[str, list[_Call]] = {}
        self.count: dict[str, int] = defaultdict(int)
        #: layer -> the kept output (a sparse one's features) its last call returned a copy of (None: it ran)
        self.served: dict[str, torch.Tensor | None] = {}

    def piece(self, position: int) -> None:
        self.calls = self.kept.pieces[position] if position < len(self.kept.pieces) else {}
        self.count.clear()
        self.served.clear()

    def pristine(self, name: str) -> torch.Tensor | None:
        """The kept output behind `name`'s last call, never handed to the model (a forward hook of that call
        may keep it instead of copying the output the model is about to write into); None if it ran."""
        return self.served.get(name)

    def wrap(self, name: str, mod: nn.Module) -> Any:
        run = mod.forward  # the module's own forward attribute where it has one, else its class's

        def forward(*args: Any, **kwargs: Any) -> Any:
            calls = self.calls.get(name, ())
            i = self.count[name]
            self.count[name] = i + 1
            x = _input_of(args)
            if i < len(calls) and not kwargs and x is not None and _same(x, calls[i].x):
                self.kept.hits += 1
                out = calls[i].out
                self.served[name] = as_tensor(out)
                return _copy(out)
            self.kept.misses += 1
            self.served[name] = None
            return run(*args, **kwargs)

        return forward
