"""Eager dataflow recording: which module or function produced and consumed each tensor.

Folding BN into a conv, or a SmoothQuant division into a producer, is exact only when the producer's
output feeds that one consumer. Tracing (torch.fx) fails on data-dependent control flow, which detectors
have; instead we run the model once eagerly, with hooks on leaf modules and a TorchFunctionMode for
everything called outside them, and identify tensors by (serial, version): an in-place op makes a new value.
A serial is given to each tensor object on first sight and found again through its id while a weak reference
says the object is still the same one; keeping every tensor alive instead (so that ids are not reused) held
a whole forward's activations at once: 4x the memory and time of a plain forward on OpenPCDet's CenterPoint.
"""

from __future__ import annotations

import itertools
import weakref
from collections import defaultdict
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from sensitivity.errors import CalibrationDataError
from sensitivity.io.batches import Batch, first_sample, run_checked
from sensitivity.quant.wrapped import call_as_caller

__all__ = ["Dataflow", "Node", "eager_modules", "record_dataflow", "without_folded"]

ValueKey = tuple[int, int]


@dataclass
class Node:
    """One call: a leaf module (`kind="module"`) or a torch function outside any leaf module."""

    index: int
    kind: str
    name: str
    inputs: list[ValueKey] = field(default_factory=list)
    outputs: list[ValueKey] = field(default_factory=list)
    module: nn.Module | None = None


@dataclass
class Dataflow:
    nodes: list[Node]
    producer: dict[ValueKey, int]
    consumers: dict[ValueKey, list[int]]
    outputs: set[ValueKey]
    _calls: dict[str, list[Node]] | None = field(default=None, repr=False)

    def module_calls(self, name: str) -> list[Node]:
        if self._calls is None:  # index once: folding asks for every layer (linear, not quadratic)
            index: dict[str, list[Node]] = {}
            for n in self.nodes:
                if n.kind == "module":
                    index.setdefault(n.name, []).append(n)
            self._calls = index
        return self._calls.get(name, [])

    def module_order(self) -> list[str]:
        """Leaf module names in first-call order."""
        seen: dict[str, None] = {}
        for n in self.nodes:
            if n.kind == "module":
                seen.setdefault(n.name, None)
        return list(seen)

    def written_outputs(self, names: Collection[str]) -> set[str]:
        """The named modules whose output the model writes into in place after some call (a later version
        of the same tensor exists: `ReLU(inplace=True)`, `out += identity`)."""
        latest: dict[int, int] = {}
        for node in self.nodes:
            for serial, version in (*node.inputs, *node.outputs):
                latest[serial] = max(latest.get(serial, version), version)
        return {
            name
            for name in names
            for node in self.module_calls(name)
            if any(latest[serial] > version for serial, version in node.outputs)
        }

    def sole_consumer(self, value: ValueKey) -> int | None:
        """The one node consuming `value`, or None if it has several, none, or is a model output."""
        users = self.consumers.get(value, [])
        if len(users) != 1 or value in self.outputs:
            return None
        return users[0]

    def producer_chain(self, node: Node, passthrough: tuple[type[nn.Module], ...] = ()) -> Node | None:
        """The module node that produced `node`'s single input, skipping sole-consumer `passthrough` modules."""
        if len(node.inputs) != 1:
            return None
        value = node.inputs[0]
        while True:
            idx = self.producer.get(value)
            if idx is None or self.sole_consumer(value) is None:
                return None
            prod = self.nodes[idx]
            if prod.kind != "module":
                return None
            if passthrough and isinstance(prod.module, passthrough) and len(prod.inputs) == 1:
                value = prod.inputs[0]
                continue
            return prod


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)
    elif hasattr(obj, "features") and isinstance(getattr(obj, "features", None), torch.Tensor):
        yield obj.features  # spconv SparseConvTensor


class _Recorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.nodes: list[Node] = []
        #: id(tensor) -> (weak reference, serial); a dead reference means the id was reused (every torch
        #: tensor, subclasses and Parameters too, takes weak references)
        self.serials: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}
        self.count = itertools.count()
        self.depth = 0
        self.internal = False

    def key(self, t: torch.Tensor) -> ValueKey:
        entry = self.serials.get(id(t))
        if entry is None or entry[0]() is not t:
            entry = (weakref.ref(t), next(self.count))
            self.serials[id(t)] = entry
        return (entry[1], t._version)

    def add(self, kind: str, name: str, inputs: Any, outputs: Any, module: nn.Module | None = None) -> None:
        self.internal = True
        try:
            node = Node(len(self.nodes), kind, name, module=module)
            node.inputs = [self.key(t) for t in _tensors(inputs)]
            node.outputs = [self.key(t) for t in _tensors(outputs)]
            self.nodes.append(node)
        finally:
            self.internal = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.internal:
            return func(*args, **kwargs)
        if self.depth:
            return call_as_caller(func, args, kwargs)
        before = [self.key(t) for t in _tensors((args, kwargs))]
        out = call_as_caller(func, args, kwargs)
        outs = list(_tensors(out))
        if outs:  # size()/shape/dim() read a tensor without consuming its values
            node = Node(len(self.nodes), "function", getattr(func, "__name__", str(func)))
            node.inputs = before
            node.outputs = [self.key(t) for t in outs]
            self.nodes.append(node)
        return out


def eager_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """`model.named_modules()` without TorchScript modules and what they hold: scripted code runs no
    Python hooks (registering one raises), so it is opaque to the scan."""
    scripted: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(p + ".") for p in scripted):
            continue
        if isinstance(mod, torch.jit.ScriptModule):
            scripted.append(name)
            continue
        yield name, mod


def record_dataflow(model: nn.Module, batch: Batch, leaves: Collection[str] = ()) -> Dataflow:
    """Run `model` once on `batch` and return its eager dataflow (leaf modules + top-level functions).

    Modules without children are leaves, and so are the modules named in `leaves` (target layers whose
    class has submodules of its own, like a conv subclass holding its padding module)."""
    small = first_sample(batch)
    rec = _Recorder()
    names = {m: n for n, m in model.named_modules()}
    handles = []
    pending: dict[int, list[ValueKey]] = {}

    def pre(mod: nn.Module, args: tuple) -> None:
        if rec.depth == 0:
            rec.internal = True
            pending[id(mod)] = [rec.key(t) for t in _tensors(args)]
            rec.internal = False
        rec.depth += 1

    def post(mod: nn.Module, args: tuple, out: Any) -> None:
        rec.depth -= 1
        if rec.depth == 0:
            rec.internal = True
            node = Node(len(rec.nodes), "module", names[mod], module=mod)
            node.inputs = pending.pop(id(mod), [])
            node.outputs = [rec.key(t) for t in _tensors(out)]
            rec.nodes.append(node)
            rec.internal = False

    leaf_set = set(leaves)
    for name, mod in eager_modules(model):
        if next(mod.children(), None) is None or name in leaf_set:
            handles.append(mod.register_forward_pre_hook(pre))
            handles.append(mod.register_forward_hook(post))
    try:
        with torch.no_grad(), rec:
            try:
                out = run_checked(model, small, 0)
            except CalibrationDataError:
                if small is not batch:
                    run_checked(model, batch, 0)  # the error message should describe the user's batch
                raise
            rec.internal = True
            out_keys = {rec.key(t) for t in _tensors(out)}
            rec.internal = False
    finally:
        for h in handles:
            h.remove()
    rec.serials.clear()
    return _indexed(rec.nodes, out_keys)


def _indexed(nodes: list[Node], outputs: set[ValueKey]) -> Dataflow:
    """The dataflow of `nodes`: each value's producer and consumers."""
    producer: dict[ValueKey, int] = {}
    consumers: dict[ValueKey, list[int]] = defaultdict(list)
    for node in nodes:
        if node.kind == "module" and node.outputs and set(node.outputs) <= set(node.inputs):
            continue  # returns its input object unchanged (Identity, eval Dropout, folded BN): transparent
        for v in node.inputs:
            if node.index not in consumers[v]:
                consumers[v].append(node.index)
        for v in node.outputs:
            if v not in node.inputs:
                producer[v] = node.index
    return Dataflow(nodes, producer, dict(consumers), outputs)


def without_folded(flow: Dataflow, model: nn.Module, folded: Collection[str]) -> Dataflow:
    """`flow` as a recording of `model` after the BatchNorms named in `folded` became `nn.Identity`, without
    running it again: each such call returns its input object, so its output value is the input's, and an
    in-place op on it later bumps the input's version instead (a recording of the folded model sees exactly
    that). Folding requires the BN to be called once, on the sole output of its conv."""
    names = set(folded)
    renamed: dict[int, tuple[int, int]] = {}  # BN output serial -> (its input serial, version offset)
    nodes: list[Node] = []
    for node in flow.nodes:
        new = Node(node.index, node.kind, node.name, _renamed(node.inputs, renamed), [], node.module)
        if node.kind == "module" and node.name in names and len(node.inputs) == 1 == len(node.outputs):
            (src, version), (out, out_version) = new.inputs[0], node.outputs[0]
            renamed[out] = (src, version - out_version)
            new.module = model.get_submodule(node.name)
            new.outputs = [new.inputs[0]]
        else:
            new.outputs = _renamed(node.outputs, renamed)
        nodes.append(new)
    return _indexed(nodes, set(_renamed(list(flow.outputs), renamed)))


def _renamed(keys: list[ValueKey], renamed: dict[int, tuple[int, int]]) -> list[ValueKey]:
    out = []
    for serial, version in keys:
        if serial in renamed:
            src, offset = renamed[serial]
            serial, version = src, version + offset
        out.append((serial, version))
    return out
