"""The exclusion budget's loop, with a metric that needs no model."""

from __future__ import annotations

import math

from sensitivity.policy.budget import BudgetStep, greedy_exclusion


def test_moves_layers_until_the_target_is_reached() -> None:
    gains = {"a": 0.5, "b": 0.25, "c": 0.125}  # exact in binary: the metric values compare exactly
    steps = greedy_exclusion(["a", "b", "c"], lambda fp: sum(gains[n] for n in fp), start=0.0, target=0.7)
    assert steps == [BudgetStep(1, "a", 0.0, 0.5), BudgetStep(2, "b", 0.5, 0.75)]


def test_nothing_moves_when_already_there_and_nan_never_arrives() -> None:
    assert greedy_exclusion(["a"], lambda fp: 1.0, start=1.0, target=0.9) == []
    steps = greedy_exclusion(["a", "b"], lambda fp: math.nan, start=math.nan, target=0.9)
    assert [s.layer for s in steps] == ["a", "b"]
