"""Layer families: the built-in dense family, a registered one, and refusing unknown plugin layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sensitivity.errors import SensitivityError
from sensitivity.quant import registry
from sensitivity.quant.modules import QuantConv2d, QuantLinear
from tests.subclass_models import StdConv2d


def test_dense_family() -> None:
    assert registry.quant_class_for(nn.Conv2d(2, 2, 1)) is QuantConv2d
    assert registry.quant_class_for(nn.Linear(2, 2)) is QuantLinear
    assert issubclass(registry.quant_class_for(StdConv2d(2, 2, 1)), StdConv2d)  # type: ignore[arg-type]
    assert registry.quant_class_for(nn.ReLU()) is None
    assert (
        registry.input_channel_axis(nn.Linear(2, 2)) == -1
        and registry.input_channel_axis(nn.Conv1d(2, 2, 1)) == 1
    )
    assert registry.layer_macs(nn.Conv2d(2, 4, 3), (1, 2, 5, 5), (1, 4, 3, 3)) == 4 * 3 * 3 * 2 * 9
    assert registry.layer_macs(nn.Linear(3, 5), (7, 3), (7, 5)) == 15


class Fancy(nn.Module):
    """A layer of some other package (here: this test's own family)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2, 2))


def test_a_registered_family_is_used_for_its_layers() -> None:
    family = registry.Family(
        "fancy", owns=lambda m: isinstance(m, Fancy), quant_class=lambda m: QuantLinear, input_channel_axis=lambda m: 0,
        foldable=lambda m: False, macs=lambda m, i, o, out: 42,
    )  # fmt: skip
    registry.register_family(family)
    try:
        assert registry.quant_class_for(Fancy()) is QuantLinear and registry.layer_macs(Fancy(), (), ()) == 42
        registry.register_family(family)  # idempotent by name
        assert sum(f.name == "fancy" for f in registry._FAMILIES) == 1
    finally:
        registry._FAMILIES[:] = [f for f in registry._FAMILIES if f.name != "fancy"]


def test_plugin_layers_without_their_family_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = type("SubMConv3d", (nn.Module,), {"__module__": "spconv.pytorch.conv"})
    monkeypatch.setattr(registry, "_FAMILIES", [registry.DENSE])
    with pytest.raises(SensitivityError, match=r"spconv layers .* support is not loaded"):
        registry.check_registered(nn.Sequential(fake()))
