"""Naming a model's outputs: every floating tensor by its path, chosen keys, or a user function."""

from __future__ import annotations

import pytest
import torch

from sensitivity.capture.outputs import OutputSelector, flatten_outputs
from sensitivity.errors import SensitivityError, SpecError


def test_nested_outputs_flatten_to_paths_and_skip_integers() -> None:
    out = {
        "hm": torch.zeros(1),
        "boxes": [torch.ones(2), {"reg": torch.ones(3)}],
        "ids": torch.zeros(1, dtype=torch.long),
    }
    assert list(flatten_outputs(out)) == ["hm", "boxes.0", "boxes.1.reg"]
    assert list(flatten_outputs(out, ["boxes"])) == ["boxes.0", "boxes.1.reg"]
    with pytest.raises(SensitivityError, match="--outputs nope not found"):
        flatten_outputs(out, ["nope"])


def test_a_function_names_the_outputs() -> None:
    y = torch.arange(12.0).reshape(1, 6, 2)
    select = OutputSelector(fn=lambda t: {"boxes": t[:, :4], "scores": t[:, 4:]})
    named = select(y)
    assert list(named) == ["boxes", "scores"] and named["scores"].shape == (1, 2, 2)
    assert list(OutputSelector(fn=lambda t: t * 2)(y)) == ["output"]
    with pytest.raises(SpecError, match="must return a dict"):
        OutputSelector(fn=lambda t: "text")(y)
