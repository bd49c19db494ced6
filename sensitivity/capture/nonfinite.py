"""Where a quantized pass first turns non-finite: the first leaf module whose output holds a NaN/Inf, and
the target layers that ran before it (where the non-finite repair looks for the cause)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from sensitivity.capture.outputs import all_finite, as_tensor
from sensitivity.graph import eager_modules

__all__ = ["NonfiniteWatch", "leaf_names"]


def _inside(name: str, targets: set[str]) -> bool:
    """Is `name` a submodule of one of `targets`? (its ancestors looked up in the set: linear in depth)"""
    parts = name.split(".")
    return any(".".join(parts[:i]) in targets for i in range(1, len(parts)))


def leaf_names(model: nn.Module, targets: set[str]) -> list[str]:
    """Modules to watch for NaN/Inf: target layers and childless modules outside them (not quantizers)."""
    out = []
    for name, mod in eager_modules(model):
        if not name:
            continue
        if name in targets or (next(mod.children(), None) is None and not _inside(name, targets)):
            out.append(name)
    return out


class NonfiniteWatch:
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
        if y is not None and y.is_floating_point() and self.first is None and not all_finite(y):
            self.first = (self.counter, name)
            self.upstream = list(dict.fromkeys(self.called))

    def found(self, q_flat: dict[str, torch.Tensor]) -> tuple[float, str, list[str]] | None:
        """(rank, where, upstream layers) of this piece's first non-finite value, or None."""
        if self.first is not None:
            return float(self.first[0]), self.first[1], self.upstream
        bad_outputs = [k for k, t in q_flat.items() if not all_finite(t)]
        if bad_outputs:
            return math.inf, f"output:{bad_outputs[0]}", list(dict.fromkeys(self.called))
        return None
