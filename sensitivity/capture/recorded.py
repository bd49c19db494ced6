"""The probes' forward kept call by call, so the FP pass can replay it instead of running a second forward;
the check that says when it cannot (a tensor written after the call: version counters); and what a model
kept of the autograd forward on its modules, found and detached (`holds_graph`, `release_graph_`).

Where one piece's layer outputs alone exceed the memory budget (a LiDAR frame), the outputs of layers whose
forward is torch's own conv / linear are not kept: the replay computes them again from the kept arguments
(`RecordedCall.output`), the same values bit for bit, at the cost of one layer call each, so the probes'
backward runs without them (on the real OpenPCDet CenterPoint 507 of the 654 MiB of one frame's outputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sensitivity.capture.outputs import as_tensor

__all__ = [
    "RecordedCall", "RecordedForward", "detached", "holds_graph", "recomputable", "release_graph_", "versions",
]  # fmt: skip

#: forwards that compute their output from their arguments and parameters alone (no state, no side effect)
_PURE_FORWARDS = frozenset(
    kind.forward
    for kind in (
        nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    )
)  # fmt: skip


def recomputable(module: nn.Module) -> bool:
    """Whether a call of `module` can be computed again from its arguments (torch's own forward, not one
    the instance or a subclass replaced)."""
    return type(module).forward in _PURE_FORWARDS and "forward" not in module.__dict__


def versions(*values: Any) -> tuple[int, ...]:
    """In-place write counters of the tensors (a SparseConvTensor: its features) among `values`."""
    out = []
    for v in values:
        t = as_tensor(v)
        if t is not None:
            out.append(t._version)
    return tuple(out)


def detached(value: Any) -> Any:
    """`value` cut from autograd: tensors detached, a SparseConvTensor through `replace_feature` (which
    keeps its `indice_dict`: later layers read the rule books stored there)."""
    if isinstance(value, Tensor):
        return value.detach()
    replace, feats = getattr(value, "replace_feature", None), getattr(value, "features", None)
    if callable(replace) and isinstance(feats, Tensor):
        return replace(feats.detach())
    return value


@dataclass
class RecordedCall:
    """One target layer call of the probes' forward, kept so the FP pass's per-layer work can run on it
    afterwards instead of in a second forward: the module, its arguments, its output (a tensor the rest of
    the model never saw: it got a clone, or None where it was not kept: `output`) and the tensor its op
    received, all cut from autograd."""

    name: str
    module: nn.Module
    args: tuple
    out: Any
    x: Tensor | None
    versions: tuple[int, ...]
    recomputed: Tensor | None = None

    def intact(self) -> bool:
        """Nothing wrote into the arguments or the output since the call (an in-place op later in the
        model would make a replayed candidate see other values than the layer did)."""
        return versions(*self.args, self.x, self.out) == self.versions

    def output(self) -> Any:
        """The call's output: the kept one, else computed again from the arguments, once (`recomputable`
        modules only: the same op on the same values)."""
        if self.out is not None:
            return self.out
        if self.recomputed is None:
            with torch.no_grad():
                self.recomputed = self.module.forward(*self.args)
        return self.recomputed


@dataclass
class RecordedForward:
    """The probes' FP forward, call by call, and the model's output (detached)."""

    calls: list[RecordedCall]
    output: Any

    def intact(self) -> bool:
        return all(c.intact() for c in self.calls)


def _graph_tensor(value: Any, depth: int = 0) -> bool:
    t = as_tensor(value)  # a tensor, or a SparseConvTensor's features
    if t is not None:
        return t.grad_fn is not None
    if depth >= 4:
        return False
    if isinstance(value, dict):
        return any(_graph_tensor(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_graph_tensor(v, depth + 1) for v in value)
    return False


#: what every nn.Module carries (its registries of parameters, buffers, submodules and hooks): no graph there
_TORCH_OWN = frozenset(vars(nn.Module()))


def holds_graph(model: nn.Module) -> bool:
    """Some module kept a tensor of the autograd forward as an attribute (OpenPCDet's heads store their
    `forward_ret_dict`): it would keep that forward's graph alive and make the model impossible to
    deep-copy (`release_graph_` detaches it). Every attribute a model adds counts, private ones too
    (`self._last = y`); torch's own (the registries of parameters, buffers, submodules, hooks) are
    skipped."""
    return any(_graph_tensor(v) for m in model.modules() for k, v in vars(m).items() if k not in _TORCH_OWN)


def _released(value: Any, depth: int = 0) -> Any:
    """`value` with every autograd tensor in it `detached` (a SparseConvTensor keeps its rule books), lists
    and dicts changed in place (they are the forward's own), tuples rebuilt."""
    t = as_tensor(value)  # a tensor, or a SparseConvTensor's features
    if t is not None:
        return detached(value) if t.grad_fn is not None else value
    if depth >= 4:
        return value
    if isinstance(value, dict):
        for k, v in list(value.items()):
            value[k] = _released(v, depth + 1)
    elif isinstance(value, list):
        value[:] = [_released(v, depth + 1) for v in value]
    elif type(value) is tuple:
        return tuple(_released(v, depth + 1) for v in value)
    return value


def release_graph_(model: nn.Module) -> bool:
    """Detach what `holds_graph` finds, in place: the values are those a no-grad forward of the same batch
    would have left (the probes' forward computed them; its taps change no value), without the graph.
    True when the model holds no graph afterwards; False where some container could not be changed (the
    caller then runs a no-grad forward, which overwrites it)."""
    for m in model.modules():
        for k, v in list(vars(m).items()):
            if k not in _TORCH_OWN and _graph_tensor(v):
                try:
                    setattr(m, k, _released(v))
                except (TypeError, AttributeError, RuntimeError):
                    return False
                if _graph_tensor(getattr(m, k)):  # a container `_released` does not rebuild
                    return False
    return True
