"""Where SmoothQuant's input division can be folded into the producer of a layer's input, exactly.

x / s can move into the producer (a conv / Linear / BN scaling its output channel c by 1/s_c) only when
nothing else sees the producer's output and everything in between commutes with a positive per-channel
scale. ReLU does (relu(x / s) = relu(x) / s for s > 0); ReLU6, clamps, residual adds and poolings that mix
channels do not, so there the division stays a per-channel multiply before the input quantizer.
The evidence is the eager dataflow (`sensitivity.graph`), so a layer used twice or an input consumed by a
functional op elsewhere is seen and refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sensitivity.graph import Dataflow, Node
from sensitivity.quant.registry import DENSE, family_of

__all__ = ["FoldSite", "find_fold_site"]

_PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PASS_MODULES = (nn.ReLU, nn.Identity, nn.Dropout)
_PASS_FUNCTIONS = {"relu", "relu_", "dropout", "contiguous", "clone"}


def _plugin_producer(module: nn.Module | None) -> bool:
    """A registered family's layer that takes a folded scale (spconv's sparse convs): dense producers are
    the exact torch types above (a subclass's own forward may not commute with the scale)."""
    family = family_of(module) if module is not None else None
    return family is not None and family is not DENSE and family.foldable(module)  # type: ignore[arg-type]


@dataclass(frozen=True)
class FoldSite:
    """`producer` is the module whose output channels absorb 1/s (None: keep the multiply), and why."""

    producer: str | None
    reason: str


def find_fold_site(flow: Dataflow, layer: str) -> FoldSite:
    calls = flow.module_calls(layer)
    if len(calls) != 1:
        return FoldSite(None, f"{layer} runs {len(calls)} times per forward")
    node: Node = calls[0]
    if len(node.inputs) != 1:
        return FoldSite(None, "the layer takes several tensors")
    value = node.inputs[0]
    between: list[str] = []
    while True:
        if value in flow.outputs:
            return FoldSite(None, "the input is also a model output")
        users = flow.consumers.get(value, [])
        if len(users) != 1:
            return FoldSite(None, f"the input feeds {len(users)} consumers (e.g. a residual branch)")
        idx = flow.producer.get(value)
        if idx is None:
            return FoldSite(None, "the input is the model input")
        prod = flow.nodes[idx]
        if prod.kind == "function":
            if prod.name in _PASS_FUNCTIONS and len(prod.inputs) == 1:
                between.append(prod.name)
                value = prod.inputs[0]
                continue
            return FoldSite(None, f"'{prod.name}' between producer and layer does not commute with scaling")
        mod = prod.module
        if isinstance(mod, _PASS_MODULES) and len(prod.inputs) == 1:
            between.append(type(mod).__name__)
            value = prod.inputs[0]
            continue
        if type(mod) in _PRODUCERS or _plugin_producer(mod):
            if len(flow.module_calls(prod.name)) != 1:
                return FoldSite(None, f"producer {prod.name} runs several times")
            via = f" through {', '.join(reversed(between))}" if between else ""
            return FoldSite(prod.name, f"folds into {prod.name}{via}")
        return FoldSite(
            None, f"{type(mod).__name__} ({prod.name}) between producer and layer is not scale-equivariant"
        )
