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
upstream leaves, and those still move the model's outputs. The kept layers are those that save the most
multiply-adds per byte kept (their input and output), within a memory budget."""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sensitivity.capture.recorded import RecordedCall
from sensitivity.io.batches import Batch, batch_to, run_checked
from sensitivity.prepare import LayerInfo

__all__ = ["MIN_MACS_PER_VALUE", "KeptOutputs", "Serving"]

#: a layer is worth keeping when it does at least this many multiply-adds per output value (a kept output
#: costs comparing the input and copying the output, a few passes over memory; a depthwise 3x3 conv does 9)
MIN_MACS_PER_VALUE = 128


def _same(x: torch.Tensor, kept: torch.Tensor) -> bool:
    return (
        x.shape == kept.shape and x.dtype == kept.dtype and x.device == kept.device and torch.equal(x, kept)
    )


def _input_of(args: tuple) -> torch.Tensor | None:
    """The layer's one tensor argument (None for any other call: those always run)."""
    return args[0] if len(args) == 1 and type(args[0]) is torch.Tensor else None


@dataclass
class _Call:
    x: torch.Tensor
    #: the output, or the recorded call that gives it (computed again there where it was not kept)
    source: torch.Tensor | RecordedCall

    @property
    def out(self) -> torch.Tensor:
        return self.source if isinstance(self.source, torch.Tensor) else self.source.output()


def _worth(layers: Sequence[LayerInfo], budget_mb: float, samples: int) -> list[str]:
    """The layers to keep: most multiply-adds per value kept (input and output) first, in execution order
    among equals, while `samples` samples of all their calls fit `budget_mb` (a layer that does not fit
    leaves room for a smaller one); never layers of unknown shape or few multiply-adds per output value."""
    scored: list[tuple[float, int, str, float]] = []
    for li in layers:
        if not li.out_shape or not li.in_shape or li.macs <= 0:
            continue
        outs, ins = math.prod(li.out_shape[1:]), math.prod(li.in_shape[1:])
        if li.macs >= MIN_MACS_PER_VALUE * outs:  # `macs`: one call of one sample
            mb = 4.0 * (outs + ins) * max(li.calls, 1) * samples / 2**20
            scored.append((-li.macs / (outs + ins), li.order, li.name, mb))
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
            if x is not None and type(out) is torch.Tensor:
                current[name].append(_Call(x.detach().clone(), out.detach().clone()))

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
        kept = cls(_worth(layers, budget_mb, samples))
        chosen = set(kept.names)
        current: dict[str, list[_Call]] = defaultdict(list)
        for call in calls:
            x = _input_of(call.args)
            if call.name in chosen and x is not None and (call.out is None or type(call.out) is torch.Tensor):
                current[call.name].append(_Call(x, call if call.out is None else call.out))
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
        #: layer -> the kept output its last call returned a copy of (None: that call ran)
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
                self.served[name] = calls[i].out
                return calls[i].out.clone()
            self.kept.misses += 1
            self.served[name] = None
            return run(*args, **kwargs)

        return forward
