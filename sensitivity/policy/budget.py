"""The exclusion budget: keep layers in FP, most sensitive first, until the user's metric is within a
budget of FP. Pure: the caller measures the metric (`metric(fp_layers)` runs the model with those layers
in FP and evaluates it), so this is one loop with its stopping rule, tested without a model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["BudgetStep", "greedy_exclusion"]


@dataclass(frozen=True)
class BudgetStep:
    step: int
    layer: str
    before: float  # the metric before this layer went to FP
    after: float  # ... and after


def greedy_exclusion(
    order: Sequence[str], metric: Callable[[list[str]], float], start: float, target: float
) -> list[BudgetStep]:
    """Move `order`'s layers to FP one at a time (each step one `metric` call with all moved so far)
    until the metric reaches `target`. A NaN metric (a broken quantized model) never reaches it."""
    current = start
    moved: list[str] = []
    steps: list[BudgetStep] = []
    for layer in order:
        if current >= target:
            break
        moved.append(layer)
        before, current = current, metric(list(moved))
        steps.append(BudgetStep(len(steps) + 1, layer, before, current))
    return steps
